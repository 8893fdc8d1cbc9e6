"""What TopK and BatchTopK share: a fixed number of active latents, unit-norm decoder rows, and AuxK.

Sparsity is set by k, not by a penalty, so the only term besides the reconstruction is AuxK (Gao et al. 2024):
the top-aux_k latents among the dead ones reconstruct the main reconstruction's error, which hands dead
latents a gradient towards directions the live ones miss. Its squared error is divided by the
error's variance over the batch (as dictionary_learning does) and it is zero when no latent is dead.
Subclasses only say which latents are active (`select`).
"""

import torch

from instructsae.errors import UserError
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.sparse_codes import decode_codes, gather_codes, scatter_codes


def row_topk_coordinates(scores_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k largest entries of each row, row-major sorted.

    Sorts are stable ones: on CPU torch's default sort of int64 indices measured 10-100× slower here."""
    cols_BK = scores_BF.topk(k, dim=1, sorted=False).indices.sort(dim=1, stable=True).values
    rows_BK = torch.arange(len(scores_BF), device=scores_BF.device)[:, None].expand_as(cols_BK)
    return rows_BK.flatten(), cols_BK.flatten()


class TopKBase(SparseAutoencoder):
    unit_norm_decoder = True
    exported_settings = ("k", "aux_k", "aux_coeff")
    has_sparsity_penalty = False  # k sets the sparsity

    @classmethod
    def check_config(cls, cfg, d_in: int) -> None:
        if cfg.k > cfg.expansion * d_in:
            raise UserError(f"k {cfg.k} exceeds d_sae {cfg.expansion * d_in} (expansion {cfg.expansion} × d_in {d_in})")

    @classmethod
    def sweep_label(cls, cfg) -> str:
        return f"k{cfg.k}"

    @classmethod
    def decoder_rows_per_token(cls, cfg, d_sae: int) -> int:
        return min(cfg.k, d_sae)  # the sparse decoder product touches only the chosen rows

    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coeff: float = 1 / 32):
        super().__init__(d_in, d_sae)
        if not 0 < k <= d_sae:
            raise ValueError(f"k {k} must lie in 1..d_sae {d_sae}")
        self.k, self.aux_coeff = k, aux_coeff
        self.aux_k = aux_k or d_in // 2  # sparsify's default

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the active latents, row-major sorted."""
        raise NotImplementedError

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_activations(x_BD)
        rows, cols = self.select(pre_BF)
        return scatter_codes(pre_BF[rows, cols].clamp_min(0), rows, cols, pre_BF.shape)

    def training_loss(self, x_BD: torch.Tensor, sparsity_coeff: float, dead_F: torch.Tensor | None = None,
                      target_BD: torch.Tensor | None = None) -> LossOutput:
        """MSE + aux_coeff · AuxK; sparsity_coeff is unused (k sets the sparsity), `sparsity` reports AuxK."""
        target_BD = x_BD if target_BD is None else target_BD
        centred_BD = self.encoder_input(x_BD)
        with torch.no_grad():
            pre_BF = torch.addmm(self.b_enc, centred_BD, self.W_enc)
        rows, cols = self.select(pre_BF)
        values_N = gather_codes(centred_BD, self.W_enc, self.b_enc, pre_BF, rows, cols)
        reconstruction, mse, recon_BD = self.reconstruction_loss(target_BD, values_N, rows, cols)
        aux = self.auxk_loss(centred_BD, pre_BF, (target_BD - recon_BD).detach(), dead_F)
        latents_BF = scatter_codes(values_N.detach(), rows, cols, pre_BF.shape)
        return LossOutput(reconstruction + self.aux_coeff * aux, mse, aux.detach(), latents_BF, recon_BD)

    def reconstruction_loss(self, x_BD: torch.Tensor, values_N: torch.Tensor, rows: torch.Tensor,
                            cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the loss's reconstruction term, the squared error, the reconstruction) from the active latents."""
        recon_BD = decode_codes(values_N, self.W_dec, rows, cols, len(x_BD)) + self.b_dec
        mse = self.squared_error(x_BD, recon_BD)
        return mse, mse, recon_BD

    def auxk_loss(self, centred_BD: torch.Tensor, pre_BF: torch.Tensor, error_BD: torch.Tensor,
                  dead_F: torch.Tensor | None) -> torch.Tensor:
        """‖error − W_decᵀ·top-aux_k(dead latents)‖² / ‖error − mean error‖², both as batch means."""
        dead_cols = dead_F.nonzero().squeeze(1) if dead_F is not None else pre_BF.new_zeros(0, dtype=torch.long)
        if len(dead_cols) == 0:
            return pre_BF.new_zeros(())
        aux_rows, dead_positions = row_topk_coordinates(pre_BF[:, dead_cols], min(self.aux_k, len(dead_cols)))
        aux_cols = dead_cols[dead_positions]
        aux_values_N = gather_codes(centred_BD, self.W_enc, self.b_enc, pre_BF, aux_rows, aux_cols)
        aux_recon_BD = decode_codes(aux_values_N, self.W_dec, aux_rows, aux_cols, len(error_BD))
        variance = (error_BD - error_BD.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(1e-12)
        return self.squared_error(error_BD, aux_recon_BD) / variance
