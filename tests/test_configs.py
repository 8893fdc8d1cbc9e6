"""Configs: YAML files in configs/ stay valid; precedence is defaults < preset < YAML < CLI flags."""

from pathlib import Path

import pytest

from instructsae.cli_options import build, read_yaml
from instructsae.errors import UserError
from instructsae.schemas import ExtractConfig
from instructsae.train.config import resolve_train_config

CONFIGS = Path(__file__).parent.parent / "instructsae" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("train-*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_parse(path):
    cfg = resolve_train_config(read_yaml(str(path)), None, {"store": "s", "out": "o"}, {}, {})
    assert cfg.sae.arch in path.name


def test_shipped_extract_config_parses():
    cfg = build(ExtractConfig, read_yaml(str(CONFIGS / "extract-fast.yaml")), {"out": "x"})
    assert cfg.layers == (15,) and cfg.mode == "fast"


def test_precedence_preset_then_yaml_then_flags():
    cfg = resolve_train_config({"optim": {"lr": 1e-4}, "sae": {"arch": "standard"}}, "fast-paper",
                               {"store": "s", "out": "o", "batch_size": None}, {"expansion": 4}, {"beta2": 0.99})
    assert cfg.sae.arch == "standard" and cfg.sae.sparsity_coeff == 5.0  # preset, per architecture
    assert cfg.optim.lr == 1e-4  # YAML over preset
    assert cfg.optim.lr_end == 7e-6 and cfg.optim.beta1 == 0.9 and cfg.batch_size == 128  # preset
    assert cfg.optim.beta2 == 0.99 and cfg.sae.expansion == 4  # flags over all


def test_defaults_are_gemma_scope():
    cfg = resolve_train_config({}, None, {"store": "s", "out": "o"}, {}, {})
    assert cfg.sae.arch == "jumprelu" and cfg.optim.lr == 7e-5 and cfg.optim.beta1 == 0.0
    assert cfg.batch_size == 4096 and cfg.sae.bandwidth == 1e-3 and cfg.sae.init_threshold == 1e-3


def test_option_of_another_architecture_is_refused():
    with pytest.raises(UserError, match="bandwidth"):
        resolve_train_config({}, None, {"store": "s", "out": "o"}, {"arch": "standard", "bandwidth": 0.1}, {})
