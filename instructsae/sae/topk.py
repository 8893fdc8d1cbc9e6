"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): latents = ReLU(top-k(pre)).

Each token keeps exactly its k largest pre-activations (fewer are non-zero only where one of them is negative),
so L0 is fixed by construction and needs no penalty or warm-up. Inference is the same rule.
"""

import torch

from instructsae.sae.topk_base import TopKBase, row_topk_coordinates


class TopKSAE(TopKBase):
    architecture = "topk"
    saelens_architecture = "topk"

    def saelens_fields(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}  # our latents are not rescaled

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return row_topk_coordinates(pre_BF, self.k)
