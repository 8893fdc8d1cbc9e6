"""Per-feature statistics accumulated over a stream of SAE latents. Pure tensor code: tests need no model.

A feature fires on a token when its latent is > 0; its activation mass is the sum of its latents. The
running top-N keeps, per feature, the N largest latents seen so far and the store rows they came from.
"""

from dataclasses import dataclass

import torch


def merge_top_n(top_acts_FN: torch.Tensor, top_rows_FN: torch.Tensor, latents_BF: torch.Tensor,
                rows_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The N largest of (the kept N, the new B) per feature, with their rows: equal to a top-N over all at once."""
    n_kept = top_acts_FN.shape[1]
    acts_FM = torch.cat([top_acts_FN, latents_BF.T], dim=1)
    acts_FN, picked_FN = acts_FM.topk(n_kept, dim=1)
    # index the rows instead of concatenating them: an F x B int64 copy would cost twice the latents
    from_kept_FN = picked_FN < n_kept
    kept_rows_FN = top_rows_FN.gather(1, picked_FN.clamp(max=n_kept - 1))
    new_rows_FN = rows_B[(picked_FN - n_kept).clamp(min=0)]
    return acts_FN, torch.where(from_kept_FN, kept_rows_FN, new_rows_FN)


@dataclass
class FeatureStats:
    """Running sums (float64) and the running top-N of every feature."""

    n_tokens: int
    fire_count_F: torch.Tensor
    act_sum_F: torch.Tensor
    role_mass_RF: torch.Tensor
    special_mass_F: torch.Tensor
    top_acts_FN: torch.Tensor
    top_rows_FN: torch.Tensor

    @classmethod
    def empty(cls, d_sae: int, n_roles: int, top_n: int) -> "FeatureStats":
        return cls(
            n_tokens=0,
            fire_count_F=torch.zeros(d_sae, dtype=torch.int64),
            act_sum_F=torch.zeros(d_sae, dtype=torch.float64),
            role_mass_RF=torch.zeros(n_roles, d_sae, dtype=torch.float64),
            special_mass_F=torch.zeros(d_sae, dtype=torch.float64),
            top_acts_FN=torch.full((d_sae, top_n), -torch.inf),
            top_rows_FN=torch.full((d_sae, top_n), -1, dtype=torch.int64),
        )

    def add(self, latents_BF: torch.Tensor, rows_B: torch.Tensor, roles_B: torch.Tensor,
            special_B: torch.Tensor) -> None:
        """Count one batch: latents of B tokens, their store rows, role codes and special-token mask."""
        latents64_BF = latents_BF.double()
        self.n_tokens += len(latents_BF)
        self.fire_count_F += (latents_BF > 0).sum(dim=0)
        self.act_sum_F += latents64_BF.sum(dim=0)
        self.role_mass_RF.index_add_(0, roles_B.long(), latents64_BF)
        self.special_mass_F += latents64_BF[special_B].sum(dim=0)
        self.top_acts_FN, self.top_rows_FN = merge_top_n(self.top_acts_FN, self.top_rows_FN, latents_BF, rows_B)

    @property
    def live_F(self) -> torch.Tensor:
        return self.fire_count_F > 0

    @property
    def density_F(self) -> torch.Tensor:
        return self.fire_count_F.double() / max(self.n_tokens, 1)

    @property
    def mean_activation_F(self) -> torch.Tensor:
        """Mean latent over the tokens where the feature fires (0 for a dead feature)."""
        return self.act_sum_F / self.fire_count_F.clamp(min=1)

    @property
    def role_share_RF(self) -> torch.Tensor:
        """Share of each feature's activation mass per role: columns sum to 1 (0 for a dead feature)."""
        return self.role_mass_RF / self.act_sum_F.clamp(min=torch.finfo(torch.float64).tiny)

    @property
    def special_share_F(self) -> torch.Tensor:
        return self.special_mass_F / self.act_sum_F.clamp(min=torch.finfo(torch.float64).tiny)
