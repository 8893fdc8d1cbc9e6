"""SAELens's config names (training_tokens, l0_coefficient, lr_warm_up_steps, ...) work beside ours, in YAML and as
flags; --d-sae beside --expansion; an unknown setting is named with a "did you mean"."""

import json
import re

import pytest
import yaml
from helpers import assert_one_line_error, run_cli, write_dialogues
from safetensors.torch import load_file

from instructsae.errors import UserError
from instructsae.schemas.base import other_names
from instructsae.schemas.train import SAE_CONFIGS, JumpReLUConfig, OptimConfig, StandardConfig, TrainConfig
from instructsae.train.config import resolve_train_config

OURS = {"store": "s", "out": "o", "tokens": 640, "batch_size": 64, "dead_window": 50, "dead_threshold": 1e-6,
        "sae": {"arch": "jumprelu", "expansion": 2, "sparsity_coeff": 0.003, "bandwidth": 0.002,
                "init_threshold": 0.002},
        "optim": {"lr": 0.003, "lr_warmup_steps": 2, "beta1": 0.9, "beta2": 0.99, "sparsity_warmup_steps": 5}}
# the same run as SAELens's runner config spells it: flat, in its names
SAELENS = {"store": "s", "out": "o", "training_tokens": 640, "train_batch_size_tokens": 64,
           "dead_feature_window": 50, "dead_feature_threshold": 1e-6, "lr": 0.003, "lr_warm_up_steps": 2,
           "adam_beta1": 0.9, "adam_beta2": 0.99, "l0_warm_up_steps": 5, "expansion_factor": 2,
           "sae": {"arch": "jumprelu", "l0_coefficient": 0.003, "jumprelu_bandwidth": 0.002,
                   "jumprelu_init_threshold": 0.002}}


def resolve(from_yaml: dict, sae_flags: dict | None = None, optim_flags: dict | None = None) -> TrainConfig:
    return resolve_train_config(json.loads(json.dumps(from_yaml)), None, {}, sae_flags or {}, optim_flags or {})


def test_saelens_names_resolve_to_the_same_config():
    assert resolve(SAELENS) == resolve(OURS)
    assert resolve(SAELENS).sae.expansion == 2 and resolve(SAELENS).optim.beta1 == 0.9


def test_every_other_name_is_one_of_saelens_and_maps_to_a_field():
    names = {**other_names(TrainConfig), **other_names(OptimConfig)}
    for config in SAE_CONFIGS:
        names.update(other_names(config))
    assert {"training_tokens", "train_batch_size_tokens", "lr_warm_up_steps", "expansion_factor",
            "l1_coefficient", "l0_coefficient", "adam_beta1", "jumprelu_bandwidth"} <= set(names)
    assert other_names(StandardConfig)["l1_coefficient"] == other_names(JumpReLUConfig)["l0_coefficient"] \
        == "sparsity_coeff"


@pytest.mark.parametrize("settings, expected", [
    ({**OURS, "training_tokens": 10}, "tokens and training_tokens name the same setting"),
    ({**OURS, "sae": {"arch": "jumprelu", "expansion": 2, "d_sae": 100}}, "give expansion (2) or d_sae (100)"),
    ({**OURS, "trainig_tokens": 10}, "unknown setting trainig_tokens; did you mean training_tokens"),
    ({**OURS, "lr_warmup_step": 10}, "did you mean lr_warmup_steps"),
    ({**OURS, "sae": {"arch": "jumprelu", "l1_coefficient": 1.0}}, "unknown setting sae.jumprelu.l1_coefficient; "
                                                                  "did you mean l0_coefficient"),
])
def test_bad_names_are_one_line_with_a_hint(settings, expected):
    with pytest.raises(UserError, match=re.escape(expected)) as caught:
        resolve(settings)
    assert "\n" not in str(caught.value)


def test_a_later_width_replaces_an_earlier_one():
    assert resolve(OURS, sae_flags={"d_sae": 100}).sae.width(64) == 100
    assert resolve({**OURS, "sae": {**OURS["sae"], "expansion": None, "d_sae": 100}},
                   sae_flags={"expansion": 3}).sae.width(64) == 192
    assert resolve({"store": "s", "out": "o"}).sae.width(64) == 16 * 64  # neither: expansion 16


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    from instructsae.extract.run import run_extract
    from instructsae.schemas import ExtractConfig

    folder = tmp_path_factory.mktemp("names")
    dataset = write_dialogues(folder / "dialogues.jsonl", 10)
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(dataset), layers=(1,), chunk_tokens=64,
                              dtype="float32", out=str(folder / "store")), show_progress=False)
    return folder / "store"


def train(monkeypatch, capsys, tmp_path, name: str, settings: dict, *flags: str) -> dict:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({key: value for key, value in settings.items() if key not in ("store", "out")}))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(config), "--store", str(settings["store"]),
                           "--out", str(tmp_path / name), "--buffer-tokens", "256", *flags)
    assert code == 0, err
    return load_file(str(tmp_path / name / "sae_weights.safetensors"))


def test_a_yaml_in_saelens_names_trains_the_same_sae_bit_for_bit(store, tmp_path, monkeypatch, capsys):
    ours = train(monkeypatch, capsys, tmp_path, "ours", {**OURS, "store": store})
    theirs = train(monkeypatch, capsys, tmp_path, "theirs", {**SAELENS, "store": store})
    assert ours.keys() == theirs.keys() == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert all((ours[name] == theirs[name]).all() for name in ours)
    # and as flags: --d-sae 128 is --expansion 2 at d_model 64, SAELens's flag names for the rest
    flags = train(monkeypatch, capsys, tmp_path, "flags", {"store": store, "sae": {"arch": "jumprelu"}},
                  "--d-sae", "128", "--training-tokens", "640", "--train-batch-size-tokens", "64",
                  "--dead-feature-window", "50", "--dead-feature-threshold", "1e-6", "--lr", "0.003",
                  "--lr-warm-up-steps", "2", "--adam-beta1", "0.9", "--adam-beta2", "0.99", "--l0-warm-up-steps",
                  "5", "--l0-coefficient", "0.003", "--jumprelu-bandwidth", "0.002", "--jumprelu-init-threshold",
                  "0.002")
    assert all((ours[name] == flags[name]).all() for name in ours)


def test_both_widths_as_flags_is_one_line(store, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(store), "--out", str(tmp_path / "x"),
                           "--expansion", "2", "--d-sae", "100")
    assert_one_line_error(code, err, "give expansion (2) or d_sae (100), not both")
    assert not (tmp_path / "x").exists()


def test_a_sweep_takes_saelens_names_in_its_base_and_grid():
    from instructsae.schemas.sweep import SweepConfig
    from instructsae.train.sweep import resolve_grid

    sweep = SweepConfig(store="s", out="o", base={"training_tokens": 640, "lr_warm_up_steps": 3},
                        grid={"sae": [{"arch": "standard", "l1_coefficient": [0.1, 0.2], "d_sae": 100}]})
    configs = [cfg for _, cfg in resolve_grid(sweep)]
    assert [cfg.sae.sparsity_coeff for cfg in configs] == [0.1, 0.2]
    assert {(cfg.tokens, cfg.optim.lr_warmup_steps, cfg.sae.width(64)) for cfg in configs} == {(640, 3, 100)}
