"""A sweep of K SAEs trained in one pass over a store ÷ the same K SAEs trained one after another.

Both read the same store with the same settings, side by side in one run; every SAE ends with the same weights
either way (tests/test_sweep.py), so only the time differs. Also prints the share of each wall time spent
reading and shuffling (the stream), which the one-pass sweep pays once instead of K times.

    .venv/bin/python bench/sweep_vs_sequential.py --store runs/demo/stores/fast-train
"""

import argparse
import tempfile
import time
from pathlib import Path

from instructsae.cli_options import read_yaml
from instructsae.schemas.sweep import SweepConfig
from instructsae.train.run import train_saes
from instructsae.train.sweep import expand_sweep

DEMO_SWEEP = Path(__file__).parent.parent / "instructsae" / "configs" / "sweep-demo.yaml"


def timed(configs, folder: Path) -> tuple[float, float]:
    """(wall seconds, seconds in the stream) of training these SAEs together."""
    started = time.perf_counter()
    summaries = train_saes(configs, folder / "checkpoint.pt")
    return time.perf_counter() - started, summaries[0]["stream_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--config", default=str(DEMO_SWEEP), help="sweep YAML (default: the demo sweep)")
    parser.add_argument("--tokens", type=int, default=40_000, help="training tokens per SAE")
    args = parser.parse_args()

    settings = read_yaml(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep = SweepConfig(store=args.store, out=str(root / "one-pass"), preset=settings.get("preset"),
                            base={**settings.get("base", {}), "tokens": args.tokens}, grid=settings["grid"])
        configs = expand_sweep(sweep)
        print(f"{len(configs)} SAEs, {args.tokens:,} tokens each, store {args.store}")
        one_pass_s, one_pass_stream_s = timed(configs, root / "one-pass")
        sequential_s, sequential_stream_s = 0.0, 0.0
        for index, cfg in enumerate(configs):
            folder = root / "sequential" / str(index)
            wall, stream = timed([cfg.model_copy(update={"out": str(folder)})], folder)
            sequential_s += wall
            sequential_stream_s += stream

    print(f"\none pass:        {one_pass_s:7.1f} s, reading + shuffling {one_pass_stream_s:6.1f} s "
          f"({one_pass_stream_s / one_pass_s:.1%})")
    print(f"one after other: {sequential_s:7.1f} s, reading + shuffling {sequential_stream_s:6.1f} s "
          f"({sequential_stream_s / sequential_s:.1%})")
    print(f"one pass ÷ one after another (wall time): {one_pass_s / sequential_s:.2f}")


if __name__ == "__main__":
    main()
