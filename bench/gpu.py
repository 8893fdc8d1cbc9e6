"""The GPU figures in one command, under an 8-minute wall clock (skips with one line where there is no CUDA device):

    .venv/bin/python bench/gpu.py [--model HF_ID_OR_FOLDER] [--dialogues 300] [--limit-s 480]

1. extraction ÷ bare truncated forward: `run_extract` FAST (bf16 model, SDPA, token-budgeted batches, bf16 store),
   timed whole, against the model cut after the stored layer running exactly the same batches and nothing else;
2. FAST ÷ BT(F) tokens/s on the same dialogues;
3. SAE training tokens/s, JumpReLU and TopK (k 32) at d_sae = 16 × d_model, batch 4096, on batches already on
   the GPU (the trainer's own step: loss, backward, decoder projection, clipping, Adam, dead-feature counts);
4. the shuffled stream's tokens/s from the FAST store through the mixing buffer to the GPU (prefetch thread on,
   as `train` runs it with an accelerator).

The model: the first 1.5-3B instruct model found in the local Hugging Face cache (no download), else --model,
else the embedded SmolLM2-135M-Instruct (said so in the output: its ratios understate a large model's).
Each section checks the time left and is skipped, with a line, when it would overrun the limit.
"""

import argparse
import shutil
import sys
import tempfile
import time

import torch

CANDIDATES = ("Qwen/Qwen2.5-1.5B-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-3B-Instruct",
              "google/gemma-2-2b-it", "meta-llama/Llama-3.2-3B-Instruct", "stabilityai/stablelm-2-1_6b-chat")


def cached_model() -> str | None:
    """The first candidate whose config is in the local HF cache (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    for repo in CANDIDATES:
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return repo
    return None


class Clock:
    def __init__(self, limit_s: float):
        self.deadline = time.perf_counter() + limit_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, needed_s: float, what: str) -> bool:
        if self.left() >= needed_s:
            return True
        print(f"skipped: {what} (needs ~{needed_s:.0f} s, {self.left():.0f} s left of the limit)", flush=True)
        return False


def timed(fn) -> tuple[object, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


@torch.no_grad()
def bare_forward(lm, cfg, instances) -> int:
    """The forward passes run_extract makes (same groups, same batches), the model cut after the stored layer."""
    from instructsae.extract import run as extract_run
    from instructsae.extract.plan import grouped
    from instructsae.lm.batches import batch_budget, length_batches, padded_batch
    from instructsae.lm.models import decoder_layers
    from instructsae.store.layout import default_chunk_tokens

    layers = decoder_layers(lm.model)
    base = lm.model.base_model
    attribute = next(name for name in ("layers", "h", "blocks") if getattr(base, name, None) is layers)
    setattr(base, attribute, torch.nn.ModuleList(list(layers)[: max(cfg.layers) + 1]))
    pad_id = lm.tokenizer.pad_token_id or 0
    chunk_tokens = cfg.chunk_tokens or default_chunk_tokens(lm.d_model, cfg.dtype)
    try:
        for group in grouped(instances, extract_run.group_tokens(cfg, chunk_tokens)):
            lengths = [len(instance.token_ids) for instance in group]
            for batch in length_batches(lengths, batch_budget(cfg.batch_tokens, cfg.device)):
                base(input_ids=padded_batch(group, batch, pad_id).to(cfg.device), use_cache=False)
    finally:
        setattr(base, attribute, layers)
    return sum(len(instance.token_ids) - 1 for instance in instances)


def extraction(model: str, dialogues: int, folder: str, clock: Clock) -> str | None:
    """Sections 1 and 2; the FAST store's path for section 4."""
    from instructsae.extract import run as extract_run
    from instructsae.extract.data import DatasetReader
    from instructsae.extract.plan import planned_instances
    from instructsae.lm.batches import batch_budget
    from instructsae.lm.models import load_model
    from instructsae.schemas import ExtractConfig

    probe = ExtractConfig(model=model, out=f"{folder}/probe")
    cfg = extract_run.resolved(probe)
    lm = load_model(cfg.model, cfg.model_dtype, cfg.device)
    layer = lm.n_layers // 2
    fast = cfg.model_copy(update={"layers": (layer,), "max_instances": dialogues, "out": f"{folder}/fast"})
    instances = list(planned_instances(fast, lm.tokenizer, DatasetReader.from_options(fast)))
    print(f"model {model}: {lm.n_layers} layers, d_model {lm.d_model}, layer {layer}, {cfg.model_dtype} on "
          f"{torch.cuda.get_device_name()}; {len(instances)} ShareGPT dialogues, batches of "
          f"{batch_budget(fast.batch_tokens, fast.device)} padded tokens", flush=True)
    bare_forward(lm, fast, instances[:8])  # warm-up: kernels chosen, memory pools grown
    n_tokens, bare_s = timed(lambda: bare_forward(lm, fast, instances))
    print(f"bare truncated forward      {n_tokens:>9} tok {bare_s:7.1f} s {n_tokens / bare_s:9.0f} tok/s", flush=True)
    del lm
    torch.cuda.empty_cache()
    if not clock.allows(3 * bare_s + 30, "run_extract FAST and BT(F)"):
        return None
    manifest, fast_s = timed(lambda: extract_run.run_extract(fast, show_progress=False))
    print(f"run_extract FAST, whole     {manifest.n_tokens:>9} tok {fast_s:7.1f} s "
          f"{manifest.n_tokens / fast_s:9.0f} tok/s  (model load included)", flush=True)
    bt = fast.model_copy(update={"mode": "bt", "out": f"{folder}/bt"})
    bt_manifest, bt_s = timed(lambda: extract_run.run_extract(bt, show_progress=False))
    print(f"run_extract BT(F), whole    {bt_manifest.n_tokens:>9} tok {bt_s:7.1f} s "
          f"{bt_manifest.n_tokens / bt_s:9.0f} tok/s", flush=True)
    print(f"  extraction time / bare forward time: {fast_s / bare_s * n_tokens / manifest.n_tokens:.2f} "
          f"(per stored token)")
    print(f"  FAST tok/s / BT(F) tok/s:            "
          f"{(manifest.n_tokens / fast_s) / (bt_manifest.n_tokens / bt_s):.2f}", flush=True)
    return fast.out


def sae_training(d_model: int, clock: Clock, steps: int = 50) -> None:
    """Section 3: the trainer's step on synthetic unit-norm batches already on the GPU."""
    from instructsae.schemas import JumpReLUConfig, OptimConfig, TopKConfig
    from instructsae.train.dead import DeadFeatureTracker
    from instructsae.sae import build_sae
    from instructsae.train.trainer import Trainee

    batch_BD = torch.nn.functional.normalize(torch.randn(4096, d_model, device="cuda"), dim=1) * d_model ** 0.5
    for label, sae_cfg in (("jumprelu", JumpReLUConfig(expansion=16)), ("topk k=32", TopKConfig(expansion=16, k=32))):
        if not clock.allows(30, f"SAE training {label}"):
            return
        sae = build_sae(sae_cfg, d_model).cuda()
        trainee = Trainee(sae, OptimConfig(lr_warmup_steps=0, sparsity_warmup_steps=0),
                          getattr(sae_cfg, "sparsity_coeff", 0.0), DeadFeatureTracker(sae.d_sae), lambda r: None)
        for step in range(5):
            trainee.step(batch_BD, step, steps, False, 0)
        _, seconds = timed(lambda: [trainee.step(batch_BD, step, steps, False, 0) for step in range(steps)])
        print(f"SAE training {label:<10} d_sae {sae.d_sae:>6}  {steps * len(batch_BD) / seconds:11.0f} tok/s",
              flush=True)
        del sae, trainee
        torch.cuda.empty_cache()


def stream(store: str, clock: Clock, tokens: int = 4_000_000) -> None:
    """Section 4: the shuffled stream as `train` runs it on an accelerator, batches moved to the GPU."""
    from instructsae.store.reader import open_store
    from instructsae.train.stream import ShuffledStream, prefetch_depth

    if not clock.allows(60, "stream"):
        return
    reader = open_store(store)
    layer = reader.layers[0]
    buffer_tokens = 262_144
    # as `train` reads on an accelerator: chunks as stored, batches gathered into pinned memory, float32 on the GPU
    batches = ShuffledStream(lambda index: reader.read_acts_chunk_as_stored(layer, index), range(reader.n_chunks),
                             reader.chunk_tokens, 4096, buffer_tokens, 0, tokens,
                             prefetch_depth(buffer_tokens, reader.chunk_tokens), pin_memory=True)
    seen, seconds = timed(lambda: sum(len(batch.to("cuda", non_blocking=True).float()) for batch in batches))
    print(f"stream to the GPU           {seen:>9} tok {seconds:7.1f} s {seen / seconds:9.0f} tok/s "
          f"({reader.n_tokens:,}-token store, several epochs)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="HF id (from the local cache) or folder (default: a cached 1.5-3B "
                                        "instruct model, else the embedded smollm2)")
    parser.add_argument("--dialogues", type=int, default=300)
    parser.add_argument("--limit-s", type=float, default=480, help="wall-clock limit of the whole benchmark")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: skipped: no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    clock = Clock(args.limit_s - 20)  # a margin for start-up and clean-up
    model = args.model or cached_model()
    if model is None:
        model = "smollm2"
        print("no 1.5-3B instruct model in the local HF cache: using the embedded SmolLM2-135M-Instruct "
              "(a small model's ratios understate a large one's)")
    folder = tempfile.mkdtemp(prefix="gpu-bench-")
    try:
        store = extraction(model, args.dialogues, folder, clock)
        from instructsae.store.reader import read_manifest

        d_model = read_manifest(store).identity.d_model if store else 2048
        sae_training(d_model, clock)
        if store:
            stream(store, clock)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
