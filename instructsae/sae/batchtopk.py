"""BatchTopK SAE (Bussmann et al. 2024): the k·batch largest pre-activations of a whole batch stay active.

Tokens that need more latents get more, at the same mean L0 of k. Selecting over a batch makes a token's latents
depend on its neighbours, so inference instead keeps every latent above one global threshold: a running mean
of the smallest activation each training batch kept, as dictionary_learning's BatchTopKTrainer estimates it.
The threshold is a buffer of d_sae equal entries, so the exported folder carries `threshold` [d_sae] and a
JumpReLU loader computes the same latents. It acts on pre-activations, which the export's input-scale fold
leaves unchanged, so it is exported as it is.
"""

import torch

from instructsae.sae.topk_base import TopKBase

THRESHOLD_DECAY = 0.99  # of the running mean; short enough to settle within a demo's few hundred steps


class BatchTopKSAE(TopKBase):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"  # its inference rule: every latent above one threshold
    batch_split_refusal = "it picks the top k·batch latents over the whole batch"
    extra_parameters = ("threshold",)
    in_latent_units = ("threshold",)

    def __init__(self, d_in: int, d_sae: int, k: int, aux_k: int | None = None, aux_coeff: float = 1 / 32):
        super().__init__(d_in, d_sae, k, aux_k, aux_coeff)
        # −1: not estimated yet (the first training batch sets it); until then inference is a plain ReLU
        self.register_buffer("threshold", torch.full((d_sae,), -1.0))

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In training, the batch's top k·batch, and (like BatchNorm's running statistics) a threshold update."""
        if not self.training:
            return (pre_BF > self.threshold.clamp_min(0)).nonzero(as_tuple=True)
        flat_N = pre_BF.flatten().topk(self.k * len(pre_BF), sorted=False).indices.sort(stable=True).values
        rows, cols = flat_N // self.d_sae, flat_N % self.d_sae
        self.update_threshold(pre_BF[rows, cols])
        return rows, cols

    @torch.no_grad()
    def export_tensors(self, input_scale: float, output_scale: float | None = None) -> dict[str, torch.Tensor]:
        """A threshold not estimated yet (−1) means a plain ReLU: written as 0, which SAELens's JumpReLU runs so."""
        tensors = super().export_tensors(input_scale, output_scale)
        tensors["threshold"] = tensors["threshold"].clamp_min(0)
        return tensors

    @torch.no_grad()
    def update_threshold(self, kept_N: torch.Tensor) -> None:
        positive_N = kept_N[kept_N > 0]
        if len(positive_N) == 0:
            return
        smallest = positive_N.min()
        if self.threshold[0] < 0:
            self.threshold.fill_(smallest)
        else:
            self.threshold.mul_(THRESHOLD_DECAY).add_((1 - THRESHOLD_DECAY) * smallest)
