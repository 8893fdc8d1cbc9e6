"""Dead-feature bookkeeping: how long since each feature last fired."""

import torch


class DeadFeatureTracker:
    """A feature is dead when it has not exceeded `threshold` in the last min(window, steps seen) steps."""

    def __init__(self, d_sae: int, threshold: float = 1e-8, window: int = 1000):
        self.threshold, self.window = threshold, window
        self.steps_since_fired_F = torch.zeros(d_sae, dtype=torch.long)
        self.firing_counts_F = torch.zeros(d_sae, dtype=torch.long)
        self.steps = 0
        self.tokens = 0

    @torch.no_grad()
    def update(self, latents_BF: torch.Tensor) -> None:
        fired_BF = latents_BF > self.threshold
        fired_F = fired_BF.any(dim=0).cpu()
        self.firing_counts_F += fired_BF.sum(dim=0).cpu()
        self.steps_since_fired_F += 1
        self.steps_since_fired_F[fired_F] = 0
        self.steps += 1
        self.tokens += latents_BF.shape[0]

    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired_F >= min(self.window, max(self.steps, 1))

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean()) if self.steps else 0.0

    def firing_frequency(self) -> torch.Tensor:
        """Share of tokens on which each feature fired, since the start."""
        return self.firing_counts_F.double() / max(self.tokens, 1)
