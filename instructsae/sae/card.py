"""An SAE's cfg.json as the SAE object carries it (`sae.cfg`): still the dict, plus the attributes SAEBench's
custom-SAE contract reads (cfg.d_in, cfg.d_sae, cfg.hook_name, cfg.hook_layer, cfg.model_name, cfg.dtype, ...).

SAELens 6 keeps hook_name, model_name, context_size and their kin in cfg.json's `metadata`; SAEBench reads them
at the top of its config, so an attribute is looked up at the top, then in the metadata, then derived.
"""

# SAEBench's CustomSAEConfig fields that a folder may not carry, with the values SAEBench itself defaults to.
SAEBENCH_DEFAULTS = {"hook_head_index": None, "context_size": None, "finetuning_scaling_factor": False,
                     "apply_b_dec_to_input": True, "normalize_activations": "none", "prepend_bos": True,
                     "model_from_pretrained_kwargs": {}, "dataset_path": "", "dataset_trust_remote_code": True,
                     "seqpos_slice": (None,), "training_tokens": -100_000, "sae_lens_training_version": None,
                     "neuronpedia_id": None}


class SAECard(dict):
    def __init__(self, cfg: dict, layer: int | None, model_name: str | None):
        super().__init__(cfg)
        self._derived = {"hook_layer": layer, "model_name": model_name,
                         "activation_fn_str": "topk" if cfg.get("architecture") == "topk" else "relu"}

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self:
            return self[name]
        metadata = self.get("metadata") if isinstance(self.get("metadata"), dict) else {}
        if metadata.get(name) is not None:
            return metadata[name]
        if name in self._derived:
            return self._derived[name]
        if name in SAEBENCH_DEFAULTS:
            return SAEBENCH_DEFAULTS[name]
        raise AttributeError(f"SAE cfg has no {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:  # SAEBench sets cfg.dtype and the like; they land in the dict, where they are read back
            self[name] = value

    def to_dict(self) -> dict:
        return dict(self)
