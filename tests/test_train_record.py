"""What a run records stays true: cfg.json's training config is the one that ran (fitted settings included), and
results and charts say "held out" only when something was held out."""

import pytest
from test_train_run import FakeReader, use_reader

from instructsae.errors import UserError
from instructsae.sae.export import load_sae, provenance
from instructsae.schemas import TrainConfig
from instructsae.schemas.sweep import SweepConfig
from instructsae.train import sweep_report
from instructsae.train.run import run_training
from instructsae.train.sweep import run_sweep


def unfitted(out, **overrides) -> TrainConfig:
    """A config that leaves the batch, lr and warm-ups to be fitted to a 2-step run."""
    return TrainConfig(**{"store": "fake-store", "out": str(out), "layer": 3, "tokens": 2048, "buffer_tokens": 2048,
                          "sae": {"arch": "jumprelu", "expansion": 2}, "geometric_median_tokens": 0, **overrides})


def test_cfg_json_records_the_settings_that_ran(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader(n_chunks=40, last=64))
    summary = run_training(unfitted(tmp_path / "run"))
    own = provenance(load_sae(tmp_path / "run")[1])
    ran, given, schedule = own["train_config"], own["given_config"], summary["schedule"]

    assert (ran["batch_size"], schedule["batch_size"], given["batch_size"]) == (1024, 1024, 4096)
    assert ran["optim"]["lr"] == schedule["lr"] == 1e-3 and given["optim"]["lr"] == 7e-5
    assert ran["optim"]["lr_warmup_steps"] == schedule["lr_warmup_steps"] == 0
    assert ran["optim"]["sparsity_warmup_steps"] == schedule["sparsity_warmup_steps"] == 1
    assert given["optim"]["lr_warmup_steps"] == 1000 and ran["tokens"] == 2048
    assert own["fitted"]["lr"] == {"default": 7e-5, "used": 1e-3}
    assert own["fitted"]["batch_size"] == {"default": 4096, "used": 1024}

    # the same config again is the same SAE; another one is described against what was given, not what ran
    assert run_training(unfitted(tmp_path / "run")) == summary
    with pytest.raises(UserError, match=r"optim.lr: 7e-05 -> 0.002"):
        run_training(unfitted(tmp_path / "run", optim={"lr": 2e-3}))


def sweep(out, grid_sae) -> SweepConfig:
    base = {"batch_size": 32, "buffer_tokens": 128, "geometric_median_tokens": 0, "tokens": 256,
            "optim": {"lr": 3e-3, "lr_warmup_steps": 2, "sparsity_warmup_steps": 4}}
    return SweepConfig(store="fake-store", out=str(out), base=base, grid={"sae": grid_sae, "layer": [3]})


@pytest.mark.parametrize("n_chunks, held_out", [(1, False), (5, True)])
def test_held_out_is_said_only_when_something_was_held_out(n_chunks, held_out, tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader(n_chunks=n_chunks, last=50))
    charts = []
    monkeypatch.setattr(sweep_report, "plot_frontier", lambda *args, **kwargs: charts.append(kwargs))
    rows = run_sweep(sweep(tmp_path / "sweep", [{"arch": "topk", "expansion": 2, "k": [2, 4]}]))

    assert [row["held_out"] for row in rows] == [held_out, held_out]
    text = (tmp_path / "sweep" / "results.md").read_text()
    csv_text = (tmp_path / "sweep" / "results.csv").read_text()
    if held_out:
        assert "held-out chunks" in text and charts == [{"measured_on": "held out"}]
    else:
        assert "held" not in text.replace("nothing was held out", "")
        assert "nothing was held out" in text
        assert charts == [{"measured_on": "training chunks: nothing was held out"}]
    assert csv_text.splitlines()[0].endswith(",held_out")


def test_measured_on_names_a_mixed_sweep():
    assert sweep_report.measured_on([{"held_out": True}, {"held_out": False}]).startswith("held out where")
    assert sweep_report.measured_on([]) == "held out"
