"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

BatchTopK picks the active latents as usual; besides the whole dictionary's reconstruction, each nested prefix
of it (latents 0..m−1 for every size m in `prefixes`) must reconstruct the input alone, with the latents it
holds. Early latents are thus pushed to carry the broad, frequent directions, and a feature cannot be absorbed
into a more specific later one without hurting the short prefixes. The loss is the sum of the prefixes' and
the whole dictionary's squared errors plus AuxK, as SAELens's MatryoshkaBatchTopKTrainingSAE computes it.
Inference is BatchTopK's (one global threshold), so it is exported as SAELens does: `architecture: jumprelu`.
"""

import torch

from instructsae.errors import UserError
from instructsae.sae.batchtopk import BatchTopKSAE
from instructsae.sae.sparse_codes import decode_codes

DEFAULT_PREFIX_SHARES = (1 / 16, 1 / 4)  # of d_sae, when no sizes are given


def prefix_sizes(d_sae: int, prefixes) -> tuple[int, ...]:
    """The nested prefix sizes below d_sae: the ones given, or d_sae/16 and d_sae/4."""
    if prefixes is None:
        return tuple(sorted({max(1, int(d_sae * share)) for share in DEFAULT_PREFIX_SHARES} - {d_sae}))
    return tuple(prefixes)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    architecture = "matryoshka_batchtopk"
    exported_settings = ("k", "aux_k", "aux_coeff", "prefixes")

    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coeff: float = 1 / 32,
                 prefixes=None):
        super().__init__(d_in, d_sae, k, aux_k, aux_coeff)
        self.prefixes = prefix_sizes(d_sae, prefixes)
        if any(not 0 < m < d_sae for m in self.prefixes) or list(self.prefixes) != sorted(set(self.prefixes)):
            raise ValueError(f"prefixes {list(self.prefixes)} must increase strictly within 1..d_sae-1 ({d_sae - 1})")

    @classmethod
    def check_config(cls, cfg, d_in: int) -> None:
        super().check_config(cfg, d_in)
        d_sae = cfg.expansion * d_in
        sizes = prefix_sizes(d_sae, cfg.prefixes)
        if not sizes or any(not 0 < m < d_sae for m in sizes) or list(sizes) != sorted(set(sizes)):
            raise UserError(f"prefixes {list(sizes)} must be sizes that increase strictly, each between 1 and "
                            f"d_sae - 1 = {d_sae - 1} (the whole dictionary is always the last level)")

    @classmethod
    def sweep_label(cls, cfg) -> str:
        sizes = "" if cfg.prefixes is None else "-p" + ".".join(map(str, cfg.prefixes))
        return f"k{cfg.k}{sizes}"

    def reconstruction_loss(self, x_BD: torch.Tensor, values_N: torch.Tensor, rows: torch.Tensor,
                            cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole dictionary's squared error plus each prefix's, reconstructing with its own latents only."""
        loss, mse, recon_BD = super().reconstruction_loss(x_BD, values_N, rows, cols)
        for size in self.prefixes:
            inside = cols < size  # coordinates stay row-major sorted when some are dropped
            prefix_BD = decode_codes(values_N[inside], self.W_dec, rows[inside], cols[inside], len(x_BD)) + self.b_dec
            loss = loss + self.squared_error(x_BD, prefix_BD)
        return loss, mse, recon_BD
