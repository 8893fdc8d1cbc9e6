"""The Python front door: `import instructsae as isae`, its functions on in-memory data, the README's example."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli

import instructsae as isae
from instructsae.errors import UserError
from instructsae.evaluate.dialogues import replayed_instances
from instructsae.lm.models import load_model

README = Path(__file__).parent.parent / "README.md"


def python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_import_is_cheap_and_names_load_on_use():
    result = python("-c", "import sys, instructsae as isae; print(sorted(m for m in ('torch', 'transformers', "
                          "'zarr', 'pydantic') if m in sys.modules)); isae.TrainConfig; print('pydantic' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]
    assert {"extract_activations", "train_sae", "train_sweep", "evaluate_sae", "open_store", "load_sae"} <= set(dir(isae))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        isae.nope  # noqa: B018


def test_python_dash_m_and_version():
    result = python("-m", "instructsae", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"instructsae {isae.__version__}", result.stderr
    assert "extract" in python("-m", "instructsae", "--help").stdout


def test_extract_from_a_list_of_message_lists_equals_the_same_jsonl(tiny_model_dir, dialogues_jsonl, tmp_path):
    rows = [json.loads(line) for line in dialogues_jsonl.read_text().splitlines()]
    common = dict(model=str(tiny_model_dir), layers=(1,), chunk_tokens=64, dtype="float32", show_progress=False)
    from_list = isae.extract_activations(dialogues=[row["messages"] for row in rows], out=str(tmp_path / "a"),
                                         **common)
    from_file = isae.extract_activations(isae.ExtractConfig(dataset=str(dialogues_jsonl), out=str(tmp_path / "b"),
                                                            **{k: v for k, v in common.items()
                                                               if k != "show_progress"}), show_progress=False)
    assert from_list.n_tokens == from_file.n_tokens and from_list.identity.dataset.startswith("in-memory:")
    a, b = isae.open_store(str(tmp_path / "a")), isae.open_store(str(tmp_path / "b"))
    assert (a.read_column("token_id") == b.read_column("token_id")).all()
    torch.testing.assert_close(a.read_acts(1, 0, a.n_tokens), b.read_acts(1, 0, b.n_tokens))
    # the LM view replays a store's dataset: dialogues held in Python must be given again as a file
    with pytest.raises(UserError, match="dialogues given in Python .*pass --dataset"):
        replayed_instances(a, None, None)
    replayed = list(replayed_instances(a, load_model(str(tiny_model_dir)), str(dialogues_jsonl)))
    assert sum(len(ids) - 1 for ids in replayed) == a.n_tokens  # the first token of each put back


def test_extract_from_a_datasets_dataset(tiny_model_dir, dialogues_jsonl, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in dialogues_jsonl.read_text().splitlines()]
    manifest = isae.extract_activations(dialogues=datasets.Dataset.from_list(rows[:3]), model=str(tiny_model_dir),
                                        layers=(0,), out=str(tmp_path / "s"), show_progress=False)
    assert manifest.n_instances == 3 and manifest.complete


def test_train_on_a_tensor_and_on_an_iterator(tmp_path):
    torch.manual_seed(0)
    basis_KD = torch.randn(12, 32)
    codes_NK = torch.relu(torch.randn(3000, 12))
    acts_ND = codes_NK @ basis_KD * 5 + 3  # sparse structure on a large mean, like a residual stream
    common = dict(sae={"arch": "topk", "k": 4, "expansion": 2}, batch_size=100, tokens=12_000,
                  optim={"lr": 3e-3}, buffer_tokens=1000)
    summary = isae.train_sae(activations=acts_ND, out=str(tmp_path / "tensor"), layer=7, **common)
    assert summary["nmse"] < 0.5 and summary["layer"] == 7
    sae = isae.load_sae(str(tmp_path / "tensor"))
    assert sae.cfg["metadata"]["hook_name"] == "blocks.7.hook_resid_post"
    assert ((sae.encode(acts_ND[:10]) > 0).sum(dim=1) <= 4).all()
    from_iterator = isae.train_sae(activations=iter(acts_ND.split(300)), out=str(tmp_path / "iterator"), **common)
    assert from_iterator["nmse"] == pytest.approx(summary["nmse"])  # the same rows: the same store, the same SAE


def test_bad_settings_are_the_clis_one_line(tmp_path):
    with pytest.raises(UserError, match="invalid batch_size"):
        isae.train_sae(activations=torch.randn(10, 4), out=str(tmp_path / "r"), batch_size=-1)
    with pytest.raises(UserError, match="not a non-empty"):
        isae.train_sae(activations=[torch.randn(4)], out=str(tmp_path / "r"))
    with pytest.raises(UserError, match="not a list of messages"):
        isae.extract_activations(dialogues=["just a string"], out=str(tmp_path / "s"))
    nan_acts = torch.randn(10, 4)
    nan_acts[3, 1] = float("nan")
    with pytest.raises(UserError, match="item 0 holds 1 NaN/inf values"):
        isae.train_sae(activations=nan_acts, out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_train_sae_over_a_finished_run_as_train_does(tmp_path, capsys):
    """Same config: its summary back, untrained; another config: refused naming what differs, unless overwrite."""
    torch.manual_seed(0)
    common = dict(activations=torch.randn(2000, 16), out=str(tmp_path / "r"), batch_size=100, tokens=2000,
                  buffer_tokens=500)
    first = isae.train_sae(sae={"arch": "topk", "k": 4, "expansion": 2}, **common)
    capsys.readouterr()
    again = isae.train_sae(sae={"arch": "topk", "k": 4, "expansion": 2}, **common)
    assert again["config_key"] == first["config_key"] and "already trained" in capsys.readouterr().err
    with pytest.raises(UserError, match="another config .*sae.k: 4 -> 6"):
        isae.train_sae(sae={"arch": "topk", "k": 6, "expansion": 2}, **common)
    replaced = isae.train_sae(sae={"arch": "topk", "k": 6, "expansion": 2}, overwrite=True, **common)
    assert replaced["config_key"] != first["config_key"]
    assert isae.load_sae(str(tmp_path / "r")).k == 6 and not (tmp_path / "r.partial").exists()


def test_the_cli_and_the_api_write_the_same_sae(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    isae.extract_activations(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), layers=(1,), chunk_tokens=64,
                             out=str(store), show_progress=False)
    settings = ["--expansion", "2", "--batch-size", "64", "--tokens", "1280", "--buffer-tokens", "256"]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(tmp_path / "cli"),
                           *settings)
    assert code == 0, err
    isae.train_sae(store=str(store), out=str(tmp_path / "api"), sae={"arch": "jumprelu", "expansion": 2},
                   batch_size=64, tokens=1280, buffer_tokens=256)
    cli, api = isae.load_sae(str(tmp_path / "cli")), isae.load_sae(str(tmp_path / "api"))
    torch.testing.assert_close(cli.W_enc, api.W_enc, rtol=0, atol=0)


def readme_python_example() -> str:
    # the one unindented Python block (the section "Python"); indented ones are snippets inside a list
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert len(blocks) == 1, "README.md has one Python example"
    return blocks[0]


def test_the_readme_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    code = readme_python_example()
    assert 'MODEL, LAYER = "smollm2", 15\n' in code
    code = code.replace('MODEL, LAYER = "smollm2", 15\n', f'MODEL, LAYER = {str(tiny_model_dir)!r}, 1\n')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs/py/sae/cfg.json").exists() and (tmp_path / "runs/py/from-tensor/cfg.json").exists()
