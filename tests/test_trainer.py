"""The training loop learns; schedules, geometric median and dead-feature counts behave."""

import torch

from instructsae.schemas import JumpReLUConfig, OptimConfig, StandardConfig
from instructsae.train.dead import DeadFeatureTracker
from instructsae.train.init import geometric_median
from instructsae.sae import build_sae
from instructsae.train.trainer import Trainee, learning_rate, sparsity_coefficient, train


def sparse_data(n_batches: int, d: int = 16, n_atoms: int = 32, seed: int = 0):
    """Activations built from a few of many unit directions: a dictionary an SAE can recover."""
    generator = torch.Generator().manual_seed(seed)
    atoms_AD = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=generator), dim=1)
    for _ in range(n_batches):
        mask = torch.rand(128, n_atoms, generator=generator) < 0.08
        yield (torch.rand(128, n_atoms, generator=generator) * mask) @ atoms_AD


def test_reconstruction_improves_with_training():
    for cfg in (StandardConfig(expansion=4, sparsity_coeff=0.05), JumpReLUConfig(expansion=4, sparsity_coeff=1e-3)):
        torch.manual_seed(0)
        sae = build_sae(cfg, 16)
        records = []
        optim = OptimConfig(lr=3e-3, lr_warmup_steps=10, beta1=0.9, sparsity_warmup_steps=50)
        trainee = Trainee(sae, optim, cfg.sparsity_coeff, DeadFeatureTracker(64), records.append)
        stats = train([trainee], sparse_data(400), 400, log_every=20)
        assert stats["tokens_seen"] == 400 * 128
        assert records[-1]["nmse"] < 0.5 * records[0]["nmse"], (cfg.arch, records[0], records[-1])
        assert records[-1]["nmse"] < 0.2, (cfg.arch, records[-1])


def test_schedules():
    cfg = OptimConfig(lr=1.0, lr_end=0.1, lr_warmup_steps=10)
    assert learning_rate(0, 100, cfg) == 0.1 and learning_rate(9, 100, cfg) == 1.0
    assert abs(learning_rate(99, 100, cfg) - 0.1) < 1e-9  # the last step of 100 ends the decay
    assert 0.1 < learning_rate(98, 100, cfg) < learning_rate(50, 100, cfg) < 1.0
    assert learning_rate(50, 100, OptimConfig(lr=1.0, lr_warmup_steps=10)) == 1.0
    assert sparsity_coefficient(4, 2.0, 10) == 1.0 and sparsity_coefficient(50, 2.0, 10) == 2.0


def test_geometric_median_resists_outliers():
    points = torch.zeros(100, 3)
    points[:99] = torch.randn(99, 3) * 0.01
    points[99] = torch.tensor([1e6, 0, 0])
    assert geometric_median(points).norm() < 0.05
    assert points.mean(dim=0).norm() > 1e3
    # four corners of a square: the centre
    square = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2]])
    torch.testing.assert_close(geometric_median(square), torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)


def test_dead_tracker_window():
    tracker = DeadFeatureTracker(d_sae=3, threshold=1e-8, window=4)
    for step in range(6):
        latents = torch.zeros(2, 3)
        latents[0, 0] = 1.0  # feature 0 always fires
        if step == 3:
            latents[1, 1] = 1.0  # feature 1 fires once, then stops
        tracker.update(latents)
    assert tracker.dead_mask().tolist() == [False, False, True]
    for _ in range(2):
        tracker.update(torch.zeros(2, 3))
    assert tracker.dead_mask().tolist() == [False, True, True]
    assert abs(tracker.dead_fraction() - 2 / 3) < 1e-6


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_refused(tmp_path):
    import pytest

    from instructsae.errors import UserError
    from instructsae.train.metrics_log import MetricsLog

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"st')
    assert MetricsLog.read(log) == [{"step": 0}, {"step": 1}]
    log.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        MetricsLog.read(log)
