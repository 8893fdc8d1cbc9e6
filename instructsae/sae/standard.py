"""Standard SAE: ReLU latents, L1 penalty weighted by decoder row norms (Anthropic's April 2024 update).

Weighting by ||W_dec_f|| stops the SAE from shrinking latents and growing decoder rows to dodge the L1,
so the decoder needs no norm constraint.
"""

import torch

from instructsae.sae.base import LossOutput, SparseAutoencoder


class StandardSAE(SparseAutoencoder):
    architecture = "standard"
    saelens_architecture = "standard"

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_activations(x_BD))

    def training_loss(self, x_BD: torch.Tensor, sparsity_coeff: float, dead_F: torch.Tensor | None = None,
                      target_BD: torch.Tensor | None = None) -> LossOutput:
        latents_BF = self.encode(x_BD)
        recon_BD = self.decode(latents_BF)
        mse = self.squared_error(x_BD if target_BD is None else target_BD, recon_BD)
        sparsity = (latents_BF * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return LossOutput(mse + sparsity_coeff * sparsity, mse, sparsity, latents_BF, recon_BD)
