"""Sweeps: K SAEs from one read of the store, each equal to its own standalone run; reruns train only new points;
bad grids are refused before any training."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_train_run import CHUNK, FakeReader, use_reader

from instructsae.errors import UserError
from instructsae.schemas.sweep import SweepConfig
from instructsae.train.run import run_training
from instructsae.train.sweep import expand_sweep, run_sweep

BASE = {"batch_size": 32, "buffer_tokens": 128, "holdout_fraction": 0.2, "geometric_median_tokens": 0,
        "log_every": 2, "optim": {"lr": 3e-3, "lr_warmup_steps": 2, "beta1": 0.9, "sparsity_warmup_steps": 4}}
GRID = {"sae": [{"arch": "jumprelu", "expansion": 2, "sparsity_coeff": [1e-3, 3e-3]},
                {"arch": "standard", "expansion": 2, "sparsity_coeff": [0.05, 0.1]},
                {"arch": "topk", "expansion": 2, "k": 4}, {"arch": "batchtopk", "expansion": 2, "k": 4}],
        "layer": [3]}


def sweep_cfg(out, grid=GRID, **base) -> SweepConfig:
    return SweepConfig(store="fake-store", out=str(out), base={**BASE, **base}, grid=grid)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def test_a_sweep_of_six_reads_each_training_token_once(tmp_path, monkeypatch):
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    rows = run_sweep(sweep_cfg(tmp_path / "sweep"))

    assert len(rows) == 6 and {row["arch"] for row in rows} == {"jumprelu", "standard", "topk", "batchtopk"}
    # chunks 0-3 train (read once, by the stream), chunk 4 is held out (read once, for all six summaries)
    assert sorted(reader.reads) == [(3, chunk) for chunk in range(5)]
    with open(tmp_path / "sweep" / "results.csv") as file:
        table = list(csv.DictReader(file))
    assert len(table) == 6 and all(0 < float(row["nmse"]) < 2 for row in table)
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 0
    assert (tmp_path / "sweep" / "results.md").read_text().count("| jumprelu |") == 2
    assert not (tmp_path / "sweep" / "checkpoint.pt").exists()


def test_each_sae_of_a_sweep_equals_its_standalone_run(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    sweep = sweep_cfg(tmp_path / "sweep", geometric_median_tokens=64)
    run_sweep(sweep)
    for cfg in expand_sweep(sweep):
        alone = tmp_path / "alone" / Path(cfg.out).name
        run_training(cfg.model_copy(update={"out": str(alone)}))
        swept, single = weights(tmp_path / "sweep" / cfg.out.split("/")[-1]), weights(alone)
        for name in single:
            assert torch.equal(swept[name], single[name]), (cfg.sae.arch, name)


def test_a_rerun_trains_only_new_grid_points(tmp_path, monkeypatch):
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    run_sweep(sweep_cfg(tmp_path / "sweep"))
    finished = {path.parent.name: path.stat().st_mtime_ns for path in (tmp_path / "sweep").glob("*/summary.json")}

    reader.reads.clear()
    bigger = {**GRID, "sae": [*GRID["sae"], {"arch": "standard", "expansion": 2, "sparsity_coeff": 0.2}]}
    rows = run_sweep(sweep_cfg(tmp_path / "sweep", grid=bigger))
    assert len(rows) == 7
    again = {path.parent.name: path.stat().st_mtime_ns for path in (tmp_path / "sweep").glob("*/summary.json")}
    assert {name: again[name] for name in finished} == finished  # untouched
    assert len(again) == 7
    assert sorted(reader.reads) == [(3, chunk) for chunk in range(5)]  # the one new SAE's training and summary


def test_a_sweep_over_layers_reads_each_layer_once(tmp_path, monkeypatch):
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    grid = {"sae": [{"arch": "standard", "expansion": 2, "sparsity_coeff": 0.05}], "layer": [1, 3]}
    rows = run_sweep(sweep_cfg(tmp_path / "sweep", grid=grid))
    assert sorted(row["layer"] for row in rows) == [1, 3]
    assert sorted(reader.reads) == sorted((layer, chunk) for layer in (1, 3) for chunk in range(5))


def write_sweep_yaml(path, grid, **base) -> str:
    path.write_text(yaml.safe_dump({"base": {**BASE, **base}, "grid": grid}))
    return str(path)


@pytest.mark.parametrize("grid_sae, layer, expected", [
    ({"arch": "gated"}, 3, ["grid.sae[0]", "unknown architecture 'gated'"]),
    ({"arch": "standard", "sparsity_coeff": [0.1, -1.0]}, 3, ["grid point 2", "sparsity_coeff"]),
    ({"arch": "standard"}, 7, ["grid point 1", "layer 7", "1, 3"]),
    ({"arch": "standard", "expansion": 0}, 3, ["expansion"]),
    ({"arch": "topk", "expansion": 2, "k": [4, 17]}, 3, ["grid point 2", "k 17 exceeds d_sae 16"]),
])
def test_bad_grids_are_refused_before_training(grid_sae, layer, expected, tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    config = write_sweep_yaml(tmp_path / "sweep.yaml", {"sae": [grid_sae], "layer": [layer]})
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", config, "--store", "fake-store",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, *expected)
    assert not (tmp_path / "out").exists()


def test_a_sweep_that_cannot_fit_in_memory_says_how_many_fit(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    monkeypatch.setattr("instructsae.train.memory.free_bytes", lambda device: 10 * 2**20)  # 10 MiB free
    # each SAE: 2 * 8 * 8192 weights (+ biases) x 4 copies x 4 bytes ~ 2.1 MiB; the batch and buffer take little
    grid = {"sae": [{"arch": "standard", "expansion": 1024, "sparsity_coeff": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}]}
    config = write_sweep_yaml(tmp_path / "sweep.yaml", grid, batch_size=16)
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", config, "--store", "fake-store",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "6 SAE(s) need", "at most 3 fit")


def test_a_crashed_sweep_resumes_to_the_same_saes(tmp_path, monkeypatch):
    reader = FakeReader(n_chunks=9, last=CHUNK)
    use_reader(monkeypatch, reader)
    settings = dict(tokens=40 * 32, checkpoint_every=5 * 32, geometric_median_tokens=64)
    run_sweep(sweep_cfg(tmp_path / "whole", **settings))

    reader.fail_after = len(reader.reads) + 12  # the disk goes away in the middle of the second sweep
    with pytest.raises(OSError, match="disk gone"):
        run_sweep(sweep_cfg(tmp_path / "crashed", **settings))
    assert (tmp_path / "crashed" / "checkpoint.pt").exists()
    reader.fail_after = None

    with pytest.raises(UserError, match="pass --resume"):
        run_sweep(sweep_cfg(tmp_path / "crashed", **settings))
    with pytest.raises(UserError, match="other SAE settings"):
        run_sweep(sweep_cfg(tmp_path / "crashed", **{**settings, "seed": 1}), resume=True)
    run_sweep(sweep_cfg(tmp_path / "crashed", **settings), resume=True)

    for folder in (tmp_path / "whole").glob("*/sae_weights.safetensors"):
        resumed = load_file(str(tmp_path / "crashed" / folder.parent.name / folder.name))
        for name, tensor in load_file(str(folder)).items():
            assert torch.equal(resumed[name], tensor), (folder.parent.name, name)
    assert not (tmp_path / "crashed" / "checkpoint.pt").exists()


@pytest.mark.parametrize("grid, expected", [
    ({"sae": [{"arch": "standard", "expansion": 2}], "expansion": [4]}, ["grid.sae[0]", "keep one"]),
    ({"sae": [{"arch": "topk", "expansion": 2, "k": []}]}, ["grid.sae[0]", "axis k", "empty"]),
    ({"sae": [{"arch": "standard", "expansion": 2}], "lr": []}, ["grid.lr"]),
])
def test_grids_that_say_nothing_or_too_much_are_refused(grid, expected, tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    config = write_sweep_yaml(tmp_path / "sweep.yaml", {**grid, "layer": [3]})
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", config, "--store", "fake-store",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, *expected)


def test_an_out_that_is_a_file_gets_one_line(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    (tmp_path / "out").write_text("mine")
    config = write_sweep_yaml(tmp_path / "sweep.yaml", {"sae": [{"arch": "standard", "expansion": 2}], "layer": [3]})
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", config, "--store", "fake-store",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "is a file")
    assert (tmp_path / "out").read_text() == "mine"


def test_damaged_and_foreign_folders_do_not_stop_a_rerun(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    grid = {"sae": [{"arch": "standard", "expansion": 2, "sparsity_coeff": [0.05, 0.1]}], "layer": [3]}
    rows = run_sweep(sweep_cfg(tmp_path / "sweep", grid=grid))
    damaged = tmp_path / "sweep" / rows[0]["name"] / "summary.json"
    damaged.write_text('{"config_k')  # a kill while it was written, say
    foreign = tmp_path / "sweep" / "notes"
    foreign.mkdir()
    (foreign / "summary.json").write_text("{}")
    rerun = run_sweep(sweep_cfg(tmp_path / "sweep", grid=grid))
    assert sorted(row["name"] for row in rerun) == sorted(row["name"] for row in rows)
    assert json.loads(damaged.read_text())["config_key"]  # retrained and whole again


def test_a_seed_axis_trains_every_seed_in_one_pass_and_aggregates(tmp_path, monkeypatch):
    """grid.seeds: 3 is three SAEs per setting from one read of the store; each equals its standalone run (the
    stream follows the base's seed, the weights their own sae_seed); results aggregate over the seeds."""
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    grid = {"sae": [{"arch": "jumprelu", "expansion": 2, "sparsity_coeff": [1e-3, 3e-3]}], "layer": [3],
            "seeds": 3}
    sweep = sweep_cfg(tmp_path / "sweep", grid=grid, geometric_median_tokens=64)
    configs = expand_sweep(sweep)
    assert sorted((cfg.sae.sparsity_coeff, cfg.sae_seed) for cfg in configs) == [
        (c, s) for c in (1e-3, 3e-3) for s in (0, 1, 2)]
    assert {cfg.seed for cfg in configs} == {0}  # one stream for all six
    listed = sweep_cfg(tmp_path / "sweep", grid={**grid, "seeds": None, "seed": [0, 1, 2]}, geometric_median_tokens=64)
    assert expand_sweep(listed) == configs

    reader.reads.clear()
    rows = run_sweep(sweep)
    assert len(rows) == 6
    # one b_dec sample (chunk 0) for all six, then one pass: chunks 0-3 by the stream, 4 for the summaries
    assert sorted(reader.reads) == [(3, 0)] + [(3, chunk) for chunk in range(5)]
    first = {name: weights(tmp_path / "sweep" / cfg.out.split("/")[-1]) for name, cfg in
             ((cfg.sae_seed, cfg) for cfg in configs if cfg.sae.sparsity_coeff == 1e-3)}
    assert not torch.equal(first[0]["W_enc"], first[1]["W_enc"])  # seeds differ in their weights
    seeded = next(cfg for cfg in configs if cfg.sae_seed == 2)
    run_training(seeded.model_copy(update={"out": str(tmp_path / "alone")}))
    for name, tensor in weights(tmp_path / "alone").items():
        assert torch.equal(tensor, first[2][name])

    with open(tmp_path / "sweep" / "results-over-seeds.csv") as file:
        aggregated = list(csv.DictReader(file))
    assert len(aggregated) == 2 and {row["n_seeds"] for row in aggregated} == {"3"}
    for row in aggregated:
        members = [r["nmse"] for r in rows if r["setting"] == row["setting"]]
        assert float(row["nmse_mean"]) == pytest.approx(sum(members) / 3)
        assert float(row["nmse_std"]) > 0
    assert "Over seeds" in (tmp_path / "sweep" / "results.md").read_text()


def test_seed_and_seeds_together_are_refused(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    config = write_sweep_yaml(tmp_path / "sweep.yaml", {"sae": [{"arch": "standard"}], "seed": [0], "seeds": 2})
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", config, "--store", "fake-store",
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "grid.seed", "not both")
