"""Is bf16 (or fp16) compute worth it on this CPU? One SAE-sized product per dtype, side by side in one run.

    .venv/bin/python bench/matmul_dtypes.py

Times [4096, 576] @ [576, 9216] (a JumpReLU encoder forward at d_sae 16 × 576, batch 4096) in fp32, in bf16,
and in fp32 inputs under torch.autocast(bfloat16), and prints GFLOP/s and the ratio to fp32.
"""

import time

import torch


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    B, D, F = 4096, 576, 9216
    flops = 2 * B * D * F
    x32, w32 = torch.randn(B, D), torch.randn(D, F)
    x16, w16 = x32.bfloat16(), w32.bfloat16()

    def autocast_product():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return x32 @ w32

    print(f"[{B}, {D}] @ [{D}, {F}], {torch.get_num_threads()} threads, torch {torch.__version__}")
    fp32 = seconds(lambda: x32 @ w32, repeats=5)
    results = {"fp32": fp32, "bf16": seconds(lambda: x16 @ w16, repeats=1),
               "fp32 under autocast(bf16)": seconds(autocast_product, repeats=1)}
    for label, value in results.items():
        print(f"{label:<28} {value * 1000:9.0f} ms {flops / value / 1e9:7.1f} GFLOP/s {fp32 / value:8.3f}x fp32")


if __name__ == "__main__":
    main()
