"""The training loop. Every batch that leaves the mixing buffer feeds every SAE being trained (a sweep), so the
store is read once however many SAEs there are. The loop sees batches and nothing of where they come from."""

import math
import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from instructsae.schemas.train import OptimConfig
from instructsae.train.dead import DeadFeatureTracker
from instructsae.train.parallel import DataParallel
from instructsae.sae import SparseAutoencoder


def learning_rate(step: int, n_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then constant, or cosine down to lr_end when it is set."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_end is None:
        return cfg.lr
    # the last step that runs is n_steps - 1: it gets lr_end
    progress = (step - cfg.lr_warmup_steps) / max(n_steps - 1 - cfg.lr_warmup_steps, 1)
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sparsity_coefficient(step: int, final: float, warmup_steps: int) -> float:
    """Ramped up from 0 so features form before the penalty bites (else many die early)."""
    return final * min(1.0, (step + 1) / warmup_steps) if warmup_steps else final


class Trainee:
    """One SAE under training: its optimiser, dead-feature counts and metrics log."""

    def __init__(self, sae: SparseAutoencoder, cfg: OptimConfig, final_sparsity_coeff: float,
                 dead: DeadFeatureTracker, log: Callable[[dict], None], layer_index: int = 0,
                 parallel: DataParallel | None = None, target_index: int | None = None):
        self.sae, self.cfg, self.final_sparsity_coeff = sae, cfg, final_sparsity_coeff
        self.dead, self.log, self.layer_index = dead, log, layer_index  # layer_index: which slot of a batch it reads
        # which slot it reconstructs (a transcoder's target; None: its input)
        self.target_index = None if target_index in (None, layer_index) else target_index
        self.parallel = parallel  # data-parallel: this rank steps on its slice of every batch
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.seconds = 0.0

    def step(self, x_BD: torch.Tensor, step: int, n_steps: int, log_this_step: bool, tokens: int,
             target_BD: torch.Tensor | None = None) -> dict:
        started = time.perf_counter()
        weight = 1.0
        if self.parallel is not None:
            x_BD, weight = self.parallel.slice(x_BD)
            target_BD = None if target_BD is None else self.parallel.slice(target_BD)[0]
        lr = learning_rate(step, n_steps, self.cfg)
        coeff = sparsity_coefficient(step, self.final_sparsity_coeff, self.cfg.sparsity_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        out = self.sae.training_loss(x_BD, coeff, self.dead.dead_mask().to(x_BD.device), target_BD)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.parallel is not None:
            self.parallel.reduce_gradients(self.sae.parameters(), weight)
        self.sae.before_optimizer_step()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.sae.after_optimizer_step()
        if self.parallel is None:
            fired_counts_F, n_tokens = self.dead.update(out.latents_BF), len(out.latents_BF)
        else:  # the whole batch's, so every rank's counts (and what the SAE makes of them) agree
            fired_counts_F, n_tokens = self.parallel.fired_counts(out.latents_BF, self.dead.threshold, weight)
            self.dead.add(fired_counts_F, n_tokens)
        self.sae.observe_batch_l0(float(fired_counts_F.sum()) / max(n_tokens, 1))

        record = {}
        if log_this_step:
            loss, mse, sparsity, nmse, l0 = self._batch_metrics(x_BD if target_BD is None else target_BD, out, weight)
            record = {"step": step, "tokens": tokens, "loss": loss, "mse": mse,
                      "sparsity": sparsity, "nmse": nmse, "l0": l0,
                      "dead_fraction": self.dead.dead_fraction(), "lr": lr, "sparsity_coeff": coeff,
                      "firing_histogram": self.dead.firing_histogram(), **self.sae.training_metrics()}
        self.seconds += time.perf_counter() - started
        if record:
            record["elapsed_s"] = round(self.seconds, 3)
            self.log(record)
        return record

    @torch.no_grad()
    def _batch_metrics(self, x_BD: torch.Tensor, out, weight: float) -> tuple[float, ...]:
        """loss, mse, sparsity, NMSE and L0 of the batch (data-parallel: of the whole batch, the slices added)."""
        if self.parallel is None:
            nmse = float(out.mse * len(x_BD) / x_BD.pow(2).sum().clamp_min(1e-12))
            l0 = float((out.latents_BF > 0).float().sum(dim=-1).mean())
            return out.loss.item(), out.mse.item(), out.sparsity.item(), nmse, l0
        l0_sum = float((out.latents_BF > 0).float().sum())
        # slice means weighted by the slice's share add up to batch means; sums add up as they are
        loss, mse, sparsity, sq_sum, l0_sum, n = self.parallel.batch_means(
            [weight * out.loss.item(), weight * out.mse.item(), weight * out.sparsity.item(),
             float(x_BD.pow(2).sum()) if weight else 0.0, l0_sum if weight else 0.0, len(x_BD) if weight else 0],
            x_BD.device)
        return loss, mse, sparsity, mse * n / max(sq_sum, 1e-12), l0_sum / max(n, 1)

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "sae_training_state": self.sae.training_state(),
                "optimizer": self.optimizer.state_dict(), "dead": self.dead.state_dict(), "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.sae.load_training_state(state["sae_training_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dead.load_state_dict(state["dead"])
        self.seconds = state["seconds"]


def train(trainees: list[Trainee], batches: Iterator[torch.Tensor], n_steps: int, log_every: int = 25,
          device: str = "cpu", first_step: int = 0, tokens: int = 0,
          after_step: Callable[[int, int], None] | None = None) -> dict:
    """Steps first_step..n_steps-1. A batch is [batch, d_model] or [batch, slots, d_model] (several (layer, site)s).

    after_step(step, tokens) runs after every step (the run uses it to checkpoint)."""
    started, tokens_before = time.perf_counter(), tokens
    desc = f"train {trainees[0].sae.architecture}" if len(trainees) == 1 else f"train {len(trainees)} SAEs"
    bar = tqdm(total=n_steps, initial=first_step, desc=desc, unit="step", dynamic_ncols=True)
    for step, batch in zip(range(first_step, n_steps), batches):
        batch = batch.to(device, non_blocking=True)
        tokens += len(batch)
        log_this_step = step % log_every == 0 or step == n_steps - 1
        for trainee in trainees:
            x_BD = batch if batch.dim() == 2 else batch[:, trainee.layer_index].contiguous()
            target_BD = None if trainee.target_index is None else batch[:, trainee.target_index].contiguous()
            record = trainee.step(x_BD, step, n_steps, log_this_step, tokens, target_BD)
        bar.update(1)
        if log_this_step and len(trainees) == 1:
            bar.set_postfix(loss=f"{record['loss']:.4g}", nmse=f"{record['nmse']:.3f}", l0=f"{record['l0']:.1f}",
                            dead=f"{record['dead_fraction']:.2f}")
        if after_step is not None:
            after_step(step, tokens)
    bar.close()
    seconds = time.perf_counter() - started
    return {"tokens_seen": tokens, "n_steps": bar.n, "train_seconds": seconds,
            "tokens_per_s": (tokens - tokens_before) / max(seconds, 1e-9)}
