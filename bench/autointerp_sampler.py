"""The store pass that draws autointerp's quantile-sampled contexts, against a plain encode pass over the same
activations: what the per-feature reservoir (bottom-k random keys, merged per batch) adds.

    .venv/bin/python bench/autointerp_sampler.py [--tokens 65536] [--d-model 576] [--d-sae 4608] [--features 128]

Random activations and a random ReLU encoder stand in for a store and an SAE (the sampler only reads chunks and
calls encode); one thread, so the two timings compare on a shared machine.
"""

import argparse
import time

import numpy as np
import torch

from instructsae.evaluate.context_sampler import LATENT_BUDGET, RESERVOIR, firing_sample

CHUNK_TOKENS = 8192


class RandomSAE:
    def __init__(self, d_model: int, d_sae: int):
        self.d_sae, self.W_enc_DF = d_sae, torch.randn(d_model, d_sae) / d_model ** 0.5

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.relu(x_ND @ self.W_enc_DF - 1.5)


class InMemoryStore:
    chunk_tokens = CHUNK_TOKENS

    def __init__(self, x_ND: torch.Tensor):
        self.x_ND, self.n_tokens = x_ND, len(x_ND)

    def read_acts(self, layer: int, start: int, stop: int) -> torch.Tensor:
        return self.x_ND[start:stop]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--features", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    store, sae = InMemoryStore(torch.randn(args.tokens, args.d_model)), RandomSAE(args.d_model, args.d_sae)
    batch = max(1, LATENT_BUDGET // sae.d_sae)
    start = time.perf_counter()
    for chunk in range(0, store.n_tokens, CHUNK_TOKENS):
        x_ND = store.read_acts(0, chunk, chunk + CHUNK_TOKENS)
        for offset in range(0, len(x_ND), batch):
            sae.encode(x_ND[offset:offset + batch])
    plain_s = time.perf_counter() - start
    ids = np.random.default_rng(0).choice(sae.d_sae, args.features, replace=False)
    start = time.perf_counter()
    rows_KS, _ = firing_sample(sae, store, 0, ids, RESERVOIR, store.n_tokens, seed=0)
    sample_s = time.perf_counter() - start
    print(f"{args.tokens:,} tokens, d_sae {args.d_sae:,}, {args.features} features, reservoir {RESERVOIR}: "
          f"encode only {plain_s:.2f} s, firing_sample {sample_s:.2f} s (ratio {sample_s / plain_s:.2f}); "
          f"firing rows kept per feature {(rows_KS >= 0).sum(axis=1).mean():.0f}")


if __name__ == "__main__":
    main()
