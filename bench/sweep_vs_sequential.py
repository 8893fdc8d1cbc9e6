"""A sweep of K SAEs trained in one pass over a store ÷ the same K SAEs trained one after another.

Both read the same store with the same settings, side by side in one run; every SAE ends with the same weights
either way (tests/test_sweep.py), so only the time differs. Also prints the share of each wall time spent
reading and shuffling (the stream), which the one-pass sweep pays once instead of K times.

Two rounds: warm (the store sits in the page cache, as a small store does after its first read) and, where
the page cache can be dropped (Linux, root), cold: the cache is dropped before every training run, so each
one reads the store from disk, as it would a store larger than RAM.

    .venv/bin/python bench/sweep_vs_sequential.py --store runs/demo/stores/fast-train
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from instructsae.cli_options import read_yaml
from instructsae.schemas.sweep import SweepConfig
from instructsae.train.run import train_saes
from instructsae.train.sweep import expand_sweep

DEMO_SWEEP = Path(__file__).parent.parent / "instructsae" / "configs" / "sweep-demo.yaml"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_page_cache() -> bool:
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("1\n")  # 1: the page cache only


def timed(configs, folder: Path, cold: bool) -> tuple[float, float]:
    """(wall seconds, seconds in the stream) of training these SAEs together."""
    if cold:
        drop_page_cache()
    started = time.perf_counter()
    summaries = train_saes(configs, folder / "checkpoint.pt")
    return time.perf_counter() - started, summaries[0]["stream_seconds"]


def compare(configs, root: Path, cold: bool) -> None:
    one_pass_s, one_pass_stream_s = timed(configs, root / "one-pass", cold)
    sequential_s, sequential_stream_s = 0.0, 0.0
    for index, cfg in enumerate(configs):
        folder = root / "sequential" / str(index)
        wall, stream = timed([cfg.model_copy(update={"out": str(folder)})], folder, cold)
        sequential_s += wall
        sequential_stream_s += stream

    label = "cold (page cache dropped before every run)" if cold else "warm (store in the page cache)"
    print(f"\n{label}")
    print(f"  one pass:        {one_pass_s:7.1f} s, reading + shuffling {one_pass_stream_s:6.1f} s "
          f"({one_pass_stream_s / one_pass_s:.1%})")
    print(f"  one after other: {sequential_s:7.1f} s, reading + shuffling {sequential_stream_s:6.1f} s "
          f"({sequential_stream_s / sequential_s:.1%})")
    print(f"  one pass ÷ one after another (wall time): {one_pass_s / sequential_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--config", default=str(DEMO_SWEEP), help="sweep YAML (default: the demo sweep)")
    parser.add_argument("--tokens", type=int, default=40_000, help="training tokens per SAE")
    args = parser.parse_args()

    settings = read_yaml(args.config)
    rounds = [False, True] if can_drop_page_cache() else [False]
    if len(rounds) == 1:
        print("the page cache cannot be dropped here (needs Linux and root): warm round only")
    for cold in rounds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            sweep = SweepConfig(store=args.store, out=str(root / "one-pass"), preset=settings.get("preset"),
                                base={**settings.get("base", {}), "tokens": args.tokens}, grid=settings["grid"])
            configs = expand_sweep(sweep)
            if not cold:
                print(f"{len(configs)} SAEs, {args.tokens:,} tokens each, store {args.store}")
            compare(configs, root, cold)


if __name__ == "__main__":
    main()
