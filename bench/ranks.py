"""1 process against 2 torchrun ranks (gloo), extraction and a 4-SAE sweep, side by side in one run:

    .venv/bin/python bench/ranks.py [--tokens 12000] [--part-tokens 1500] [--sweep-tokens 40000] [--rounds 1]

Extraction: the embedded SmolLM2 on ShareGPT, FAST, layer 15, bf16 store; the single process uses all the
machine's threads, each rank one thread each per core share (torchrun's default is one). Sweep: the four SAEs
of instructsae/configs/sweep-demo.yaml (JumpReLU ×2, TopK ×2, expansion 8) for --sweep-tokens tokens on the
single-process store. Wall time of each whole command, model loading and process start included.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def timed(command: list[str], threads: int | None) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def launch(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "instructsae"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m",
            "instructsae"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=12_000)
    parser.add_argument("--part-tokens", type=int, default=1_500)
    parser.add_argument("--sweep-tokens", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ranks-bench-"))
    sweep = yaml.safe_load((REPO / "instructsae/configs/sweep-demo.yaml").read_text())
    sweep["base"]["tokens"] = args.sweep_tokens
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    cores = os.cpu_count()
    print(f"{cores} cores; extraction of {args.tokens:,} tokens (units of {args.part_tokens:,} under torchrun), "
          f"sweep of 4 SAEs over {args.sweep_tokens:,} tokens", flush=True)
    try:
        for round_ in range(args.rounds):
            times = {}
            for ranks in (1, 2):
                extract = ["extract", "--layers", "15", "--max-tokens", str(args.tokens), "--out",
                           str(folder / f"store{ranks}-{round_}")]
                if ranks > 1:
                    extract += ["--part-tokens", str(args.part_tokens)]
                times[("extract", ranks)] = timed(launch(ranks) + extract, None if ranks == 1 else cores // ranks)
                print(f"round {round_ + 1}: extract on {ranks} rank(s): {times[('extract', ranks)]:.1f} s "
                      f"({args.tokens / times[('extract', ranks)]:.0f} tok/s)", flush=True)
            for ranks in (1, 2):
                command = ["sweep", "--config", str(folder / "sweep.yaml"), "--store", str(folder / f"store1-{round_}"),
                           "--out", str(folder / f"sweep{ranks}-{round_}")]
                times[("sweep", ranks)] = timed(launch(ranks) + command, None if ranks == 1 else cores // ranks)
                print(f"round {round_ + 1}: 4-SAE sweep on {ranks} rank(s): {times[('sweep', ranks)]:.1f} s",
                      flush=True)
            for stage in ("extract", "sweep"):
                print(f"round {round_ + 1}: {stage} 1 process / 2 ranks (time): "
                      f"{times[(stage, 1)] / times[(stage, 2)]:.2f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
