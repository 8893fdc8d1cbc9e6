"""`run_training` against a fake store reader: the run folder, held-out chunks, refusals, and crash safety."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from instructsae.errors import UserError
from instructsae.metrics import reconstruction_metrics
from instructsae.schemas import JumpReLUConfig, LayerStats, OptimConfig, StandardConfig, TrainConfig
from instructsae.schemas.train import BatchTopKConfig, MatryoshkaBatchTopKConfig, TopKConfig
from instructsae.sae.export import load_sae, provenance
from instructsae.train.run import run_training, split_chunks
from instructsae.sae import SAE_CLASSES, build_sae

D_MODEL, CHUNK = 8, 64
RUN_FILES = {"cfg.json", "sae_weights.safetensors", "metrics.jsonl", "summary.json", "training_curves.png"}
CONFIGS = {"standard": StandardConfig(expansion=2, sparsity_coeff=0.05), "jumprelu": JumpReLUConfig(expansion=2),
           "topk": TopKConfig(expansion=2, k=4), "batchtopk": BatchTopKConfig(expansion=2, k=4),
           "matryoshka_batchtopk": MatryoshkaBatchTopKConfig(expansion=2, k=4, prefixes=(2, 8))}


class FakeReader:
    """The store reader's attributes over in-memory sparse activations, at a large raw scale; logs its reads."""

    def __init__(self, n_chunks: int = 5, last: int = 40, layers=(1, 3), complete: bool = True):
        generator = torch.Generator().manual_seed(0)
        atoms_AD = torch.nn.functional.normalize(torch.randn(24, D_MODEL, generator=generator), dim=1)
        self.n_tokens = CHUNK * (n_chunks - 1) + last
        active_NA = torch.rand(self.n_tokens, 24, generator=generator) < 0.1
        codes_NA = torch.rand(self.n_tokens, 24, generator=generator) * active_NA
        self.acts_ND = 30.0 * codes_NA @ atoms_AD + 5.0  # an offset, so b_dec has something to learn
        self.chunk_tokens, self.n_chunks = CHUNK, n_chunks
        self.layers, self.d_model = tuple(layers), D_MODEL
        self.sites, self.acts_keys = ("resid_post",), [(layer, "resid_post") for layer in layers]
        stats = LayerStats(count=self.n_tokens, sum_sq_norm=float(self.acts_ND.double().pow(2).sum()))
        self.manifest = SimpleNamespace(
            identity=SimpleNamespace(layers=self.layers, d_model=D_MODEL, model="fake-model", mode="fast",
                                     max_len=CHUNK, block_len=CHUNK, keep_first_token=False, dataset="fake-data"),
            layer_stats={str(layer): stats for layer in layers}, fingerprint="f1ngerprint", complete=complete)
        self.reads: list[tuple[int, int]] = []
        self.fail_after: int | None = None

    def chunk_bounds(self, chunk_index: int) -> tuple[int, int]:
        return chunk_index * CHUNK, min((chunk_index + 1) * CHUNK, self.n_tokens)

    def read_acts_chunk(self, layer: int, chunk_index: int, site: str = "resid_post") -> torch.Tensor:
        return self.read_acts_chunk_as_stored(layer, chunk_index)  # a float32 store

    def read_acts_chunk_as_stored(self, layer: int, chunk_index: int, site: str = "resid_post") -> torch.Tensor:
        if self.fail_after is not None and len(self.reads) >= self.fail_after:
            raise OSError("disk gone")
        self.reads.append((layer, chunk_index))
        return self.acts_ND[chunk_index * CHUNK:(chunk_index + 1) * CHUNK].clone()


def use_reader(monkeypatch, reader: FakeReader) -> None:
    fake_open = lambda path: reader  # noqa: E731
    monkeypatch.setattr("instructsae.store.reader.open_store", fake_open)
    monkeypatch.setattr("instructsae.train.run.open_store", fake_open, raising=False)


def train_cfg(out, arch: str = "standard", **overrides) -> TrainConfig:
    optim = OptimConfig(lr=3e-3, lr_warmup_steps=2, beta1=0.9, sparsity_warmup_steps=4)
    values = dict(store="fake-store", out=str(out), layer=3, sae=CONFIGS[arch], optim=optim, batch_size=32,
                  buffer_tokens=128, holdout_fraction=0.2, geometric_median_tokens=64, log_every=2)
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_a_run_writes_a_finished_folder(arch, tmp_path, monkeypatch):
    reader = FakeReader()
    use_reader(monkeypatch, reader)
    summary = run_training(train_cfg(tmp_path / "run", arch))

    assert {p.name for p in (tmp_path / "run").iterdir()} == RUN_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no RUN.partial, no lock left beside it
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert summary["architecture"] == arch and summary["evaluated_on"] == "held-out chunks"
    assert summary["tokens_seen"] == 4 * CHUNK and summary["n_steps"] == 4 * CHUNK // 32
    for key in ("nmse", "explained_variance", "mse", "l0", "dead_fraction_heldout", "dead_fraction_train",
                "tokens_per_s"):
        assert math.isfinite(summary[key]), key
    # the last of 5 chunks is held out: read once, for the summary, and never for training; only layer 3 is read
    assert reader.reads.count((3, 4)) == 1 and reader.reads[-1] == (3, 4)
    assert {layer for layer, _ in reader.reads} == {3}

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6, 7]
    expected_keys = {"tokens", "loss", "mse", "sparsity", "nmse", "l0", "dead_fraction", "lr", "sparsity_coeff"}
    assert expected_keys <= set(records[0])

    # the summary is measured on raw activations with the exported SAE
    sae, cfg = load_sae(tmp_path / "run")
    assert provenance(cfg)["store_fingerprint"] == "f1ngerprint" and provenance(cfg)["layer"] == 3
    mean_sq_norm = reader.manifest.layer_stats["3"].mean_sq_norm
    assert provenance(cfg)["input_scale"] == pytest.approx(1 / math.sqrt(mean_sq_norm))
    direct = reconstruction_metrics(sae, [reader.acts_ND[4 * CHUNK:]])
    assert summary["nmse"] == pytest.approx(direct["nmse"]) and summary["l0"] == pytest.approx(direct["l0"])


def test_training_lowers_the_error_on_raw_activations(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader(n_chunks=9, last=CHUNK))
    summary = run_training(train_cfg(tmp_path / "run", tokens=64 * 32, holdout_fraction=0.12))
    assert summary["n_steps"] == 64 and summary["tokens_seen"] == 64 * 32  # several epochs over 8 chunks
    # with b_dec at the geometric median and ~64 steps, much better than predicting the mean
    assert summary["explained_variance"] > 0.5, summary


def test_one_chunk_is_evaluated_on_training_data(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader(n_chunks=1, last=50))
    summary = run_training(train_cfg(tmp_path / "run"))
    assert summary["evaluated_on"].startswith("training chunks") and summary["heldout_tokens"] == 50


def test_refuses_a_layer_the_store_lacks(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    with pytest.raises(UserError, match=r"layer 5 .*1, 3"):
        run_training(train_cfg(tmp_path / "run", layer=5))
    assert not (tmp_path / "run").exists()


def test_refuses_an_incomplete_store(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader(complete=False))
    with pytest.raises(UserError, match="incomplete"):
        run_training(train_cfg(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_never_wipes_a_folder_it_did_not_write(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="notes.txt"):
        run_training(train_cfg(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_holdout_split():
    assert split_chunks(10, 0.05) == (list(range(9)), [9])  # ceil, at least one
    assert split_chunks(10, 0.25) == (list(range(7)), [7, 8, 9])
    assert split_chunks(1, 0.5) == ([0], [])
    assert split_chunks(2, 0.9) == ([0], [1])  # a chunk always stays for training


def test_reconstruction_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    sae = build_sae(StandardConfig(expansion=2), 6)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)  # some latents off, some on
    x_ND = torch.randn(50, 6) + 2.0
    metrics = reconstruction_metrics(sae, [x_ND[:20], x_ND[20:]])  # streamed in two batches
    with torch.no_grad():
        latents_NF = sae.encode(x_ND)
        error_ND = (sae.decode(latents_NF) - x_ND).double()
    x_ND = x_ND.double()
    assert metrics["n_tokens"] == 50
    assert metrics["mse"] == pytest.approx(float(error_ND.pow(2).mean()))
    assert metrics["nmse"] == pytest.approx(float(error_ND.pow(2).sum() / x_ND.pow(2).sum()))
    variance = (x_ND - x_ND.mean(dim=0)).pow(2).sum()
    assert metrics["explained_variance"] == pytest.approx(float(1 - error_ND.pow(2).sum() / variance))
    assert metrics["l0"] == pytest.approx(float((latents_NF > 0).sum(dim=1).double().mean()))
    assert metrics["dead_fraction"] == pytest.approx(float((latents_NF <= 0).all(dim=0).double().mean()))


class RecordingWandb:
    """Stands in for the optional wandb package: a module object that keeps what it was given."""

    def __init__(self):
        self.runs = []

    def init(self, **options):
        run = SimpleNamespace(options=options, logged=[], finished=False)
        run.log = lambda record, step: run.logged.append((step, record))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_gets_every_metrics_record_when_asked(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    wandb = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run_training(train_cfg(tmp_path / "run", wandb=True, wandb_project="sweeps"))
    (run,) = wandb.runs
    assert run.options["project"] == "sweeps" and run.options["config"]["batch_size"] == 32 and run.finished
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record for _, record in run.logged] == records
    assert [step for step, _ in run.logged] == [record["step"] for record in records]


def test_wandb_is_never_needed_unless_asked(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    run_training(train_cfg(tmp_path / "run"))
    with pytest.raises(UserError, match="pip install"):
        run_training(train_cfg(tmp_path / "other", wandb=True))


def test_metrics_carry_a_firing_histogram(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    run_training(train_cfg(tmp_path / "run"))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(last["firing_histogram"].values()) == 16  # every feature in one bin (d_sae = 2 x 8)


def test_resume_without_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", "fake-store", "--out", str(tmp_path / "run"),
                           "--resume")
    assert_one_line_error(code, err, "no checkpoint", "without --resume")
