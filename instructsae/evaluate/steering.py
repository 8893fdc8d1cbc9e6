"""`instructsae steer`: add α × a feature's decoder direction to the residual stream while the model generates.

The FAST paper's special-token steering experiment: the vector is added where the SAE's decoder writes (after its
decoder layer, resid_post; a transcoder's: the MLP's output) at every position, prompt and generated tokens alike, and
decoding is greedy so each run is reproducible.
"""

import json
import shutil
import textwrap
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from instructsae.errors import UserError
from instructsae.fileio import write_text_atomically
from instructsae.lm.models import LoadedModel, decoder_layers, load_model
from instructsae.schemas.steer import SteerConfig
from instructsae.evaluate.splice import INPUT_SITES
from instructsae.lm.hooks import site_module
from instructsae.sae.folder import load_sae, sae_layer, sae_model, sae_sites


def steering_direction(W_dec_FD: torch.Tensor, feature: int) -> torch.Tensor:
    """The feature's decoder row scaled to unit norm: saved weights fold in the training scale, so the raw
    row's norm is arbitrary, while α × a unit vector is in residual-stream units as in the FAST paper."""
    if not 0 <= feature < W_dec_FD.shape[0]:
        raise UserError(f"feature {feature} is out of range: the SAE has {W_dec_FD.shape[0]} features "
                        f"(0..{W_dec_FD.shape[0] - 1})")
    row_D = W_dec_FD[feature].float()
    if row_D.norm() == 0:
        raise UserError(f"feature {feature} has an all-zero decoder row: it has no direction to steer along")
    return row_D / row_D.norm()


@contextmanager
def residual_added(model: torch.nn.Module, layer: int, vector_D: torch.Tensor, site: str = "resid_post"):
    """While open, `site` of decoder layer `layer` (its output by default) is shifted by vector_D at every
    position."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + vector_D.to(output[0].dtype),) + output[1:]
        return output + vector_D.to(output.dtype)

    def pre_hook(_module, args, kwargs):
        if args:
            return (args[0] + vector_D.to(args[0].dtype), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden + vector_D.to(hidden.dtype)}

    module = site_module(decoder_layers(model)[layer], site)
    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True) if site in INPUT_SITES else \
        module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, seq] token ids: the prompt as one user turn of the chat template, or the raw text."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template: use --no-chat to steer on raw text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    # the template already holds the special tokens; adding them again would double the BOS
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def greedy_generate(loaded: LoadedModel, input_ids_1S: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The new token ids of a greedy continuation (the argmax at every step), stopping at the end-of-turn token.

    The model's own generation_config may ask for a repetition penalty or n-gram blocking (Qwen2.5-Instruct's
    does): those are switched off here, or "greedy" would depend on the checkpoint."""
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output_1T = loaded.model.generate(
        input_ids=input_ids_1S, attention_mask=torch.ones_like(input_ids_1S), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
        repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None,
        begin_suppress_tokens=None, min_new_tokens=None, min_length=0, sequence_bias=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
    )
    return output_1T[0, input_ids_1S.shape[1]:].tolist()


def steer_generations(loaded: LoadedModel, layer: int, direction_D: torch.Tensor, alphas: tuple[float, ...],
                      input_ids_1S: torch.Tensor, max_new_tokens: int, site: str = "resid_post") -> list[dict]:
    """One greedy generation per α, in the order given."""
    generations = []
    device = next(loaded.model.parameters()).device
    for alpha in tqdm(alphas, desc="steer", unit="α", dynamic_ncols=True):
        with residual_added(loaded.model, layer, alpha * direction_D.to(device), site):
            new_ids = greedy_generate(loaded, input_ids_1S.to(device), max_new_tokens)
        # special tokens stay visible: steering a template feature may make the model emit them
        generations.append({"alpha": alpha, "text": loaded.tokenizer.decode(new_ids), "token_ids": new_ids})
    return generations


def _model_of(cfg: dict, sae_dir: str, model_flag: str | None) -> str:
    model = model_flag or sae_model(cfg)
    if model is None:
        raise UserError(f"SAE {sae_dir} does not name its model (cfg.json metadata.model_name): pass --model")
    return str(model)


def run_steering(cfg: SteerConfig) -> dict:
    """The generations; written to cfg.out when it names a file (the CLI always names one), else nowhere."""
    out = None if cfg.out is None else Path(cfg.out)
    if out is not None and out.is_dir():  # found now, not after the model has generated
        raise UserError(f"--out {out} is a folder: name a JSON file")
    sae, sae_cfg = load_sae(cfg.sae)
    model_spec, layer = _model_of(sae_cfg, cfg.sae, cfg.model), sae_layer(sae_cfg, cfg.sae)
    direction_D = steering_direction(sae.W_dec.detach(), cfg.feature)
    loaded = load_model(model_spec, device=cfg.device, attn_implementation=cfg.attn_implementation)
    if layer >= loaded.n_layers:
        raise UserError(f"SAE {cfg.sae} reads layer {layer} but model '{model_spec}' "
                        f"has layers 0..{loaded.n_layers - 1}")
    if loaded.d_model != sae.d_in:
        raise UserError(f"SAE {cfg.sae} has d_in {sae.d_in} but model '{model_spec}' has d_model {loaded.d_model}")
    input_ids_1S = prompt_ids(loaded.tokenizer, cfg.prompt, cfg.chat)
    target = sae_sites(sae_cfg)[1]  # where its decoder writes
    generations = steer_generations(loaded, layer, direction_D, cfg.alpha, input_ids_1S, cfg.max_new_tokens, target)
    result = {
        "sae": cfg.sae, "model": model_spec, "layer": layer, "hook_site": target, "feature": cfg.feature,
        "direction": "unit-norm decoder row", "decoder_row_norm": float(sae.W_dec[cfg.feature].norm()),
        "prompt": cfg.prompt, "chat": cfg.chat, "decoding": "greedy", "max_new_tokens": cfg.max_new_tokens,
        "generations": generations,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out, json.dumps(result, indent=2))
    result["out"] = None if out is None else str(out)
    return result


def side_by_side(generations: list[dict], width: int | None = None, max_columns: int = 3) -> str:
    """The generations as wrapped text columns headed by their α, at most `max_columns` per row of columns."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    blocks = []
    for start in range(0, len(generations), max_columns):
        group = generations[start:start + max_columns]
        column_width = max(12, (width - 3 * (len(group) - 1)) // len(group))
        columns = [[f"α = {g['alpha']:g}", "-" * column_width]
                   + textwrap.wrap(" ".join(g["text"].split()) or "(empty)", column_width) for g in group]
        height = max(len(column) for column in columns)
        rows = [" | ".join(column[i].ljust(column_width) if i < len(column) else " " * column_width
                           for column in columns).rstrip() for i in range(height)]
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)
