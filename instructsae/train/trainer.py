"""The training loop. It sees an iterator of batches and nothing of where they come from."""

import math
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from instructsae.schemas.train import OptimConfig
from instructsae.train.dead import DeadFeatureTracker
from instructsae.train.sae import SparseAutoencoder


def learning_rate(step: int, n_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then constant, or cosine down to lr_end when it is set."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_end is None:
        return cfg.lr
    progress = (step - cfg.lr_warmup_steps) / max(n_steps - cfg.lr_warmup_steps, 1)
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sparsity_coefficient(step: int, final: float, warmup_steps: int) -> float:
    """Ramped up from 0 so features form before the penalty bites (else many die early)."""
    return final * min(1.0, (step + 1) / warmup_steps) if warmup_steps else final


def train(
    sae: SparseAutoencoder,
    batches: Iterator[torch.Tensor],
    cfg: OptimConfig,
    final_sparsity_coeff: float,
    n_steps: int,
    dead: DeadFeatureTracker,
    log: Callable[[dict], None],
    log_every: int = 25,
    device: str = "cpu",
) -> dict:
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    tokens, started = 0, time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"train {sae.architecture}", unit="step", dynamic_ncols=True)
    for step, x_BD in zip(range(n_steps), batches):
        x_BD = x_BD.to(device, non_blocking=True)
        lr = learning_rate(step, n_steps, cfg)
        coeff = sparsity_coefficient(step, final_sparsity_coeff, cfg.sparsity_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        out = sae.training_loss(x_BD, coeff, dead.dead_mask().to(x_BD.device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        sae.after_optimizer_step()

        dead.update(out.latents_BF)
        tokens += len(x_BD)
        bar.update(1)
        if step % log_every == 0 or step == n_steps - 1:
            with torch.no_grad():
                nmse = float(out.mse * len(x_BD) / x_BD.pow(2).sum().clamp_min(1e-12))
                l0 = float((out.latents_BF > 0).float().sum(dim=-1).mean())
            record = {"step": step, "tokens": tokens, "loss": out.loss.item(), "mse": out.mse.item(),
                      "sparsity": out.sparsity.item(), "nmse": nmse, "l0": l0, "dead_fraction": dead.dead_fraction(),
                      "lr": lr, "sparsity_coeff": coeff,
                      "elapsed_s": round(time.perf_counter() - started, 3)}
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", nmse=f"{nmse:.3f}", l0=f"{l0:.1f}",
                            dead=f"{record['dead_fraction']:.2f}")
    bar.close()
    seconds = time.perf_counter() - started
    return {"tokens_seen": tokens, "n_steps": bar.n, "train_seconds": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9)}
