"""Dead-feature bookkeeping: how long since each feature last fired, and how often each fires."""

import torch

# log10 firing-frequency bins of the histogram in metrics.jsonl (Anthropic's and SAELens' feature-density plots)
HISTOGRAM_EDGES = (-7, -6, -5, -4, -3, -2, -1, 0)


class DeadFeatureTracker:
    """A feature is dead when it has not exceeded `threshold` in the last min(window, steps seen) steps."""

    def __init__(self, d_sae: int, threshold: float = 1e-8, window: int = 1000):
        self.threshold, self.window = threshold, window
        self.steps_since_fired_F = torch.zeros(d_sae, dtype=torch.long)
        self.firing_counts_F = torch.zeros(d_sae, dtype=torch.long)
        self.steps = 0
        self.tokens = 0

    @torch.no_grad()
    def update(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """One step from its latents; on how many tokens each feature fired."""
        fired_counts_F = (latents_BF > self.threshold).sum(dim=0)
        self.add(fired_counts_F, latents_BF.shape[0])
        return fired_counts_F

    @torch.no_grad()
    def add(self, fired_counts_F: torch.Tensor, n_tokens: int) -> None:
        """One step: on how many of its n_tokens tokens each feature fired (data-parallel ranks add theirs up)."""
        fired_counts_F = fired_counts_F.cpu()
        self.firing_counts_F += fired_counts_F
        self.steps_since_fired_F += 1
        self.steps_since_fired_F[fired_counts_F > 0] = 0
        self.steps += 1
        self.tokens += n_tokens

    def dead_mask(self) -> torch.Tensor:
        return self.steps_since_fired_F >= min(self.window, max(self.steps, 1))

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean()) if self.steps else 0.0

    def firing_frequency(self) -> torch.Tensor:
        """Share of tokens on which each feature fired, since the start."""
        return self.firing_counts_F.double() / max(self.tokens, 1)

    def firing_histogram(self) -> dict[str, int]:
        """Features per log10 firing frequency since the start: {"never": n, "<1e-7": n, "1e-7..1e-6": n, ...}."""
        frequency_F = self.firing_frequency()
        log_F = torch.log10(frequency_F[frequency_F > 0])
        edges = torch.tensor(HISTOGRAM_EDGES, dtype=log_F.dtype)
        # a feature firing on every token (log 0) joins the top bin
        bins = torch.bucketize(log_F, edges, right=True).clamp_max(len(edges) - 1)
        counts = bins.bincount(minlength=len(edges)).tolist()
        labels = [f"<1e{HISTOGRAM_EDGES[0]}"]
        labels += [f"1e{lo}..1e{hi}" for lo, hi in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])]
        return {"never": int((frequency_F == 0).sum()), **dict(zip(labels, counts))}

    def state_dict(self) -> dict:
        return {"steps_since_fired_F": self.steps_since_fired_F.clone(),
                "firing_counts_F": self.firing_counts_F.clone(), "steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_fired_F = state["steps_since_fired_F"].clone()
        self.firing_counts_F = state["firing_counts_F"].clone()
        self.steps, self.tokens = state["steps"], state["tokens"]
