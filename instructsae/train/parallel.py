"""Data-parallel training of one SAE under torchrun: every rank streams the same shuffled batches and steps on its
own slice of each; the slices' gradients, weighted by their share of the batch, are summed over the ranks
before the optimiser step, so every rank applies the same update and the same decoder renormalisation, and the
result equals one process stepping on the whole batch (within float tolerance: the sums are split differently).

What is not a mean over tokens cannot be split this way: an architecture whose class gives a batch_split_refusal
(BatchTopK picks the batch's top k·batch latents) is refused; TopK's AuxK divides by the error's variance over the rank's slice rather than the whole batch
(it only moves dead latents, and only while some are dead).
"""

import torch
import torch.distributed as dist

from instructsae.distributed import Ranks
from instructsae.errors import UserError
from instructsae.sae import sae_class

def check_splittable(arch: str) -> None:
    refusal = sae_class(arch).batch_split_refusal
    if refusal is not None:
        raise UserError(f"{arch} cannot train data-parallel ({refusal}): train it in one process, "
                        "or several SAEs at once with `instructsae sweep` under torchrun")


class DataParallel:
    def __init__(self, place: Ranks):
        self.rank, self.world = place.rank, place.world

    def slice(self, batch_BD: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of the batch and their share of it. A batch with fewer rows than ranks leaves some
        ranks none: they step on one row with weight 0, so every rank still joins every collective."""
        n = len(batch_BD)
        start, stop = n * self.rank // self.world, n * (self.rank + 1) // self.world
        if stop == start:
            return batch_BD[:1], 0.0
        return batch_BD[start:stop], (stop - start) / n

    @torch.no_grad()
    def reduce_gradients(self, parameters, weight: float) -> None:
        """grad ← Σ_ranks weight_r · grad_r: the gradient of the mean loss over the whole batch."""
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.mul_(weight)
                dist.all_reduce(parameter.grad)

    @torch.no_grad()
    def fired_counts(self, latents_BF: torch.Tensor, threshold: float, weight: float) -> tuple[torch.Tensor, int]:
        """Tokens of the whole batch on which each feature fired, and the batch's tokens: every rank's dead-feature
        counts stay equal, so AuxK sees the same dead latents everywhere."""
        counts_F = (latents_BF > threshold).sum(dim=0) if weight else latents_BF.new_zeros(latents_BF.shape[1])
        counts_F = counts_F.long()
        tokens = torch.tensor([len(latents_BF) if weight else 0], device=counts_F.device)
        dist.all_reduce(counts_F)
        dist.all_reduce(tokens)
        return counts_F, int(tokens.item())

    def batch_means(self, sums: list[float], device) -> list[float]:
        """Per-token sums of the slices added over the ranks (for the metrics a log line shows)."""
        values = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(values)
        return values.tolist()
