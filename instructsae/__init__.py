"""instructsae: sparse autoencoders for instruct models (FAST extraction -> zarr store -> SAE sweeps).

    import instructsae as isae
    isae.extract_activations(model="smollm2", dataset="sharegpt", layers=(15,), out="store", max_tokens=50_000)
    isae.train_sae(store="store", out="runs/jumprelu", tokens=300_000)
    sae = isae.load_sae("runs/jumprelu")

The functions and configs load on first use, so `import instructsae` stays cheap (no torch, no transformers).
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    **{name: "instructsae.api" for name in (
        "extract_activations", "train_sae", "train_sweep", "evaluate_sae", "open_store", "load_sae")},
    **{name: "instructsae.api" for name in ("steer", "features", "autointerp", "dedup", "compare")},
    **{name: "instructsae.notebook" for name in ("activations", "latents", "TokenActivations", "TokenLatents")},
    "ExtractConfig": "instructsae.schemas.extract",
    "TrainConfig": "instructsae.schemas.train", "OptimConfig": "instructsae.schemas.train",
    "StandardConfig": "instructsae.schemas.train", "JumpReLUConfig": "instructsae.schemas.train",
    "TopKConfig": "instructsae.schemas.train", "BatchTopKConfig": "instructsae.schemas.train",
    "SweepConfig": "instructsae.schemas.sweep", "LMViewConfig": "instructsae.schemas.evaluate",
    "UserError": "instructsae.errors",
}
_SUBPACKAGES = ("extract", "train", "evaluate", "schemas", "lm", "pipelines", "metrics")

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found once; later lookups do not come here
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"instructsae.{name}")
    raise AttributeError(f"module 'instructsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})
