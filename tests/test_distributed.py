"""torchrun on the CPU (gloo): 2 ranks launched from the test through `python -m torch.distributed.run`, compared
with one process (run here, to spare a start of ~10-20 s). Every process computes on one thread, so the sums are the
same sums."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli
from safetensors.torch import load_file

from instructsae.distributed import balanced_assignment
from instructsae.extract.run import run_extract
from instructsae.schemas import ExtractConfig

TIMEOUT = 300
SWEEP = {
    "base": {"tokens": 2048, "batch_size": 64, "buffer_tokens": 512, "holdout_fraction": 0.1, "log_every": 4,
             "geometric_median_tokens": 128, "optim": {"lr": 3e-3, "lr_warmup_steps": 2, "beta1": 0.9,
                                                       "sparsity_warmup_steps": 4}},
    "grid": {"sae": [{"arch": "jumprelu", "sparsity_coeff": [1e-3, 3e-3]}, {"arch": "topk", "k": 4},
                     {"arch": "standard", "sparsity_coeff": 0.05}], "expansion": [2]},
}


def env() -> dict:
    """One thread per process (torchrun's own default for several ranks), the worktree's code in every rank."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def instructsae(*args: str, ranks: int | None = None) -> subprocess.CompletedProcess:
    """`python -m instructsae ARGS`, or the same under torchrun with `ranks` processes."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                         str(ranks)]
    command = [sys.executable, *launcher, "-m", "instructsae", *args]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture
def one_thread():
    """This process computes as a torchrun rank does (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.fixture(scope="module")
def small_store(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "store"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset="chatterbot", layers=(1,), max_instances=120,
                              dtype="float32", chunk_tokens=64, out=str(out)), show_progress=False)
    return out


def test_balanced_assignment_spreads_cost_not_count():
    # one big SAE and four small ones: the big one alone on a rank
    owners = balanced_assignment([(8.0, 8.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)], 2)
    assert owners[0] != owners[1] and len({owners[i] for i in range(1, 5)}) == 1
    assert balanced_assignment([(1.0, 1.0)] * 4, 2).count(0) == 2
    assert balanced_assignment([(1.0, 2.0)], 3) == [0]  # a rank may get nothing


def test_a_sweep_over_two_ranks_equals_one_process_bit_for_bit(small_store, tmp_path, one_thread, monkeypatch,
                                                               capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(SWEEP))
    code, _, err = run_cli(monkeypatch, capsys, "sweep", "--config", str(config), "--store", str(small_store),
                           "--out", str(tmp_path / "one"))
    assert code == 0, err
    instructsae("sweep", "--config", str(config), "--store", str(small_store), "--out", str(tmp_path / "two"),
                ranks=2)

    folders = sorted(path.parent.name for path in (tmp_path / "one").glob("*/summary.json"))
    assert len(folders) == 4
    assert sorted(path.parent.name for path in (tmp_path / "two").glob("*/summary.json")) == folders
    for name in folders:
        single, spread = weights(tmp_path / "one" / name), weights(tmp_path / "two" / name)
        for tensor in single:
            assert torch.equal(single[tensor], spread[tensor]), (name, tensor)
    for report in ("results.csv", "results.md", "frontier.png"):
        assert (tmp_path / "two" / report).stat().st_size > 0
    assert len((tmp_path / "two" / "results.csv").read_text().strip().splitlines()) == 5
    assert not list((tmp_path / "two").glob("checkpoint*")) and not list(tmp_path.glob("*.lock"))


# a target L0 steers its aim by the whole batch's L0: were it a rank's own slice's, the ranks' losses would differ
@pytest.mark.parametrize("sae_flags", [[], ["--target-l0", "40"]], ids=["jumprelu", "jumprelu-target"])
def test_data_parallel_train_on_two_ranks_matches_one_process(sae_flags, small_store, tmp_path, one_thread,
                                                             monkeypatch, capsys):
    args = ["train", "--store", str(small_store), "--sae", "jumprelu", "--expansion", "2", "--tokens", "2048",
            "--batch-size", "64", "--buffer-tokens", "512", "--geometric-median-tokens", "128", "--lr", "3e-3",
            "--lr-warmup-steps", "2", "--beta1", "0.9", "--sparsity-warmup-steps", "4", "--log-every", "4",
            *sae_flags]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    result = instructsae(*args, "--out", str(tmp_path / "two"), ranks=2)

    assert result.stdout.count('"nmse"') == 1  # rank 0 alone prints the summary
    single, parallel = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "one" / "metrics.jsonl").read_text().count("\n")
    if sae_flags:  # the aim moved, the same on both
        aims = {run: [json.loads(line)["l0_aim"]
                      for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two")}
        assert aims["one"][-1] != 40
        assert aims["two"] == pytest.approx(aims["one"], rel=1e-4)
    # rank 0 built RUN.partial and moved it into place, and released the run folder's lock
    assert not (tmp_path / "two.partial").exists() and not (tmp_path / "two.lock").exists()
    # the same command again: rank 0 finds it trained, and every rank stops
    again = instructsae(*args, "--out", str(tmp_path / "two"), ranks=2)
    assert "already trained" in again.stderr and weights(tmp_path / "two")["W_dec"].equal(parallel["W_dec"])


def test_batchtopk_is_refused_data_parallel():
    from instructsae.errors import UserError
    from instructsae.train.parallel import check_splittable

    with pytest.raises(UserError, match="batchtopk cannot train data-parallel"):
        check_splittable("batchtopk")
    check_splittable("jumprelu")
