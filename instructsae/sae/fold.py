"""Unit-norm decoder rows for an exported SAE, as SAELens's `fold_W_dec_norm` leaves them.

Each latent f is rescaled by its decoder row's norm n_f: W_dec row / n_f, and n_f × everything on the latent's
side (its W_enc column, b_enc entry, and per-architecture tensors in latent units such as a JumpReLU threshold).
ReLU and thresholds commute with a positive scale, so reconstructions are unchanged, and a latent then reads in
raw activation units: latent_f × W_dec[f] is its contribution to the reconstruction, and α × W_dec[f] steers by α
in residual-stream units, as in SAELens and SAEBench (which expect unit-norm rows).

TopK and BatchTopK keep the k largest latents: a scale per latent would change which are largest. Their training
keeps every row at one norm, so one common factor is folded (every pre-activation scaled alike, the same latents
chosen, the same reconstructions), the rows come out unit norm, and SAELens runs them with
rescale_acts_by_decoder_norm false, which is what its fold_W_dec_norm leaves for a TopK SAE trained with it true.
"""

import torch

from instructsae.errors import UserError

SAME_NORM_RTOL = 1e-3  # rows a TopK SAE kept at one norm agree far better than this (float rounding only)


def fold_decoder_norms(tensors: dict[str, torch.Tensor], in_latent_units: tuple[str, ...],
                       one_factor: bool) -> dict[str, torch.Tensor]:
    """The same SAE with unit-norm decoder rows; an all-zero row (a feature that never learned) stays as it is."""
    norms_F = tensors["W_dec"].norm(dim=1)
    if one_factor:
        live_F = norms_F[norms_F > 0]
        if len(live_F) and (live_F.max() - live_F.min()) > SAME_NORM_RTOL * live_F.max():
            raise UserError(f"a rank-selecting SAE's decoder rows differ in norm ({float(live_F.min()):.4g} to "
                            f"{float(live_F.max()):.4g}): folding them would change which latents are chosen")
        norms_F = torch.full_like(norms_F, float(live_F.mean()) if len(live_F) else 1.0)
    norms_F = torch.where(norms_F > 0, norms_F, torch.ones_like(norms_F))
    folded = dict(tensors)
    folded["W_dec"] = tensors["W_dec"] / norms_F[:, None]
    folded["W_enc"] = tensors["W_enc"] * norms_F
    for name in ("b_enc", *in_latent_units):
        folded[name] = tensors[name] * norms_F
    return {name: tensor.contiguous() for name, tensor in folded.items()}
