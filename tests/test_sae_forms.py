"""Matryoshka BatchTopK and JumpReLU towards a target L0: their maths against direct references, a run that ends
near its target, both mixed into one sweep with older SAEs (each equal to its standalone run), their flags."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from reference_jumprelu import reference_jumprelu_loss
from safetensors.torch import load_file
from test_train_run import FakeReader, train_cfg, use_reader

from instructsae.errors import UserError
from instructsae.sae import build_sae, check_sae_config
from instructsae.sae.export import load_sae, provenance
from instructsae.sae.jumprelu import TARGET_L0_BANDWIDTH, TARGET_L0_COEFF_TIMES_T
from instructsae.schemas import JumpReLUConfig
from instructsae.schemas.sweep import SweepConfig
from instructsae.schemas.train import MatryoshkaBatchTopKConfig
from instructsae.train.run import run_training, sparsity_coeff
from instructsae.train.sweep import expand_sweep, run_sweep


def gradients(sae, loss) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {name: param.grad.clone() for name, param in sae.named_parameters()}


# --- JumpReLU towards a target L0 ----------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [False, True])
def test_target_l0_penalty_matches_a_direct_reference(sparse):
    torch.manual_seed(0)
    sae = build_sae(JumpReLUConfig(expansion=4, bandwidth=0.05, target_l0=6), 32)
    x_BD = torch.randn(128, 32)
    with torch.no_grad():  # thresholds that let ~10 latents a token through, some inside the kernel
        pre_BF = torch.relu(sae.pre_activations(x_BD))
        sae.threshold.copy_(pre_BF.quantile(1 - 10 / sae.d_sae, dim=0).clamp_min(1e-3))
    expected = gradients(sae, reference_jumprelu_loss(sae, x_BD, 0.3, target_l0=6))
    sae.last_density = 0.0 if sparse else 1.0
    assert sae.sparse_step_pays(x_BD) == sparse
    out = sae.training_loss(x_BD, 0.3)
    ours = gradients(sae, out.loss)
    l0_B = (out.latents_BF > 0).sum(dim=1).float()
    torch.testing.assert_close(out.sparsity, (2 / 6 * (l0_B - 6) ** 2).mean())
    assert expected["threshold"].abs().sum() > 0  # the estimator is exercised
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_penalty_pulls_l0_towards_the_target_from_either_side():
    """Its gradient on θ has the sign that moves L0 to T: raise θ above the target, lower it below."""
    torch.manual_seed(0)
    x_BD = torch.randn(256, 16)
    for target, direction in ((2.0, 1), (40.0, -1)):  # ~16 latents fire: above T = 2, below T = 40
        sae = build_sae(JumpReLUConfig(expansion=4, bandwidth=0.1, target_l0=target), 16)
        with torch.no_grad():
            sae.threshold.copy_(torch.relu(sae.pre_activations(x_BD)).quantile(0.75, dim=0))
            sae.W_dec.zero_()  # only the penalty has a gradient on θ
        gradient = gradients(sae, sae.training_loss(x_BD, 1.0).loss)["threshold"]
        assert (-gradient.sum() * direction) > 0, target


@pytest.mark.parametrize("target", [3.0, 6.0])
def test_a_target_l0_run_ends_near_its_target(target, tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader(n_chunks=9, last=64))
    cfg = train_cfg(tmp_path / "run", "jumprelu", tokens=150 * 32, holdout_fraction=0.12,
                    sae=JumpReLUConfig(expansion=2, target_l0=target, sparsity_coeff=0.1, init_threshold=0.05,
                                        bandwidth=0.05))
    summary = run_training(cfg)
    assert abs(summary["l0"] - target) < 0.25 * target, summary["l0"]


def test_a_target_without_coefficient_bandwidth_or_warmup_gets_target_defaults_and_cfg_json_says_so(
        tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    given = JumpReLUConfig(expansion=2, target_l0=4)
    cfg = train_cfg(tmp_path / "run", "jumprelu", sae=given, optim={"lr": 1e-3})
    assert sparsity_coeff(cfg) == TARGET_L0_COEFF_TIMES_T / 4 != given.sparsity_coeff
    assert sparsity_coeff(train_cfg(tmp_path, "jumprelu", sae=JumpReLUConfig(target_l0=4, sparsity_coeff=0.5))) == 0.5
    summary = run_training(cfg)
    own = provenance(load_sae(tmp_path / "run")[1])
    assert own["train_config"]["sae"]["sparsity_coeff"] == TARGET_L0_COEFF_TIMES_T / 4
    assert own["fitted"]["sparsity_coeff"] == {"default": given.sparsity_coeff, "used": TARGET_L0_COEFF_TIMES_T / 4}
    assert own["given_config"]["sae"]["sparsity_coeff"] == given.sparsity_coeff
    # the wider kernel of target mode, which the SAE itself carries
    assert own["fitted"]["bandwidth"] == {"default": given.bandwidth, "used": TARGET_L0_BANDWIDTH}
    assert load_sae(tmp_path / "run")[0].bandwidth == TARGET_L0_BANDWIDTH == own["train_config"]["sae"]["bandwidth"]
    # and no sparsity warm-up, where the linear penalty fits one
    assert own["train_config"]["optim"]["sparsity_warmup_steps"] == 0 == summary["schedule"]["sparsity_warmup_steps"]
    linear = train_cfg(tmp_path / "linear", "jumprelu", sae=JumpReLUConfig(expansion=2), optim={"lr": 1e-3})
    assert run_training(linear)["schedule"]["sparsity_warmup_steps"] > 0


def test_the_aim_steers_towards_landing_the_mean_l0_on_the_target():
    sae = build_sae(JumpReLUConfig(expansion=4, target_l0=10, target_l0_gain=0.1), 16)
    assert sae.aim == 10
    sae.observe_batch_l0(14.0)  # above the target: aim lower
    assert sae.aim == pytest.approx(9.6)
    sae.observe_batch_l0(8.0)  # below it: aim higher
    assert sae.aim == pytest.approx(9.8)
    sae.observe_batch_l0(40.0)  # far above (the first steps): no wind-up
    assert sae.aim == pytest.approx(9.8)
    l0_B = torch.tensor([9.8, 11.8])
    torch.testing.assert_close(sae.l0_penalty(l0_B), torch.tensor(2 / 10 * 4 / 2))  # centred on the aim, 2/T scale
    for unsteered in (JumpReLUConfig(expansion=4, target_l0=10, target_l0_gain=0), JumpReLUConfig(expansion=4)):
        sae = build_sae(unsteered, 16)
        sae.observe_batch_l0(14.0)
        assert sae.aim == unsteered.target_l0


def test_steering_lands_a_gentle_coefficient_on_its_target(tmp_path, monkeypatch):
    """The coefficient that reconstructs best leaves L0 well above the target unless the aim is steered."""
    use_reader(monkeypatch, FakeReader(n_chunks=9, last=64))
    results = {}
    for gain in (0.0, 0.05):
        cfg = train_cfg(tmp_path / f"gain{gain}", "jumprelu", tokens=300 * 32, holdout_fraction=0.12,
                        sae=JumpReLUConfig(expansion=2, target_l0=4, sparsity_coeff=0.003, init_threshold=0.05,
                                           bandwidth=0.05, target_l0_gain=gain))
        results[gain] = run_training(cfg)["l0"]
        aims = [record.get("l0_aim") for record in map(json.loads, (tmp_path / f"gain{gain}" / "metrics.jsonl")
                                                       .read_text().splitlines())]
        assert (min(aims) < 4) == (gain > 0), aims
    assert abs(results[0.05] - 4) < 0.25 * 4 < abs(results[0.0] - 4), results


def test_a_target_beyond_the_dictionary_is_refused():
    with pytest.raises(UserError, match="target_l0 40 exceeds d_sae 32"):
        check_sae_config(JumpReLUConfig(expansion=2, target_l0=40), 16)


# --- Matryoshka BatchTopK ------------------------------------------------------------------------------------

def reference_matryoshka_loss(sae, x_BD: torch.Tensor, prefixes) -> torch.Tensor:
    """The batch's top k·batch latents; the whole dictionary's and every prefix's squared error (no dead latents,
    so no AuxK), written densely with plain autograd."""
    pre_BF = torch.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
    keep = pre_BF.flatten().topk(sae.k * len(x_BD)).indices
    latents_BF = torch.zeros_like(pre_BF).flatten().scatter(0, keep, pre_BF.flatten()[keep]).view_as(pre_BF)
    loss = 0
    for size in (*prefixes, sae.d_sae):
        recon_BD = latents_BF[:, :size] @ sae.W_dec[:size] + sae.b_dec
        loss = loss + (recon_BD - x_BD).pow(2).sum(dim=-1).mean()
    return loss


def test_matryoshka_loss_and_gradients_match_a_direct_reference():
    torch.manual_seed(0)
    sae = build_sae(MatryoshkaBatchTopKConfig(expansion=4, k=5, prefixes=(8, 24)), 16)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
    x_BD = torch.randn(64, 16)
    expected_loss = reference_matryoshka_loss(sae, x_BD, (8, 24))
    expected = gradients(sae, expected_loss)
    out = sae.training_loss(x_BD, 0.0, torch.zeros(sae.d_sae, dtype=torch.bool))
    torch.testing.assert_close(out.loss, expected_loss)
    ours = gradients(sae, out.loss)
    for name, grad in expected.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the prefixes' terms are really there: without them the loss is the whole dictionary's error alone
    assert out.loss > out.mse * 1.01


def test_matryoshka_prefixes_default_and_are_checked():
    assert build_sae(MatryoshkaBatchTopKConfig(expansion=4, k=4), 16).prefixes == (4, 16)
    for prefixes, problem in (((8, 4), "increase"), ((8, 64), "increase"), ((0, 8), "increase")):
        with pytest.raises(UserError, match=problem):
            check_sae_config(MatryoshkaBatchTopKConfig(expansion=4, k=4, prefixes=prefixes), 16)


# --- both in one sweep with older SAEs, and through the CLI ---------------------------------------------------

GRID = {"sae": [{"arch": "jumprelu", "expansion": 2, "target_l0": [3, 5]},
                {"arch": "matryoshka_batchtopk", "expansion": 2, "k": 4, "prefixes": [[2, 8], None]},
                {"arch": "topk", "expansion": 2, "k": 4}, {"arch": "standard", "expansion": 2}],
        "layer": [3]}
BASE = {"batch_size": 32, "buffer_tokens": 128, "holdout_fraction": 0.2, "geometric_median_tokens": 64,
        "log_every": 2, "optim": {"lr": 3e-3, "lr_warmup_steps": 2, "beta1": 0.9, "sparsity_warmup_steps": 4}}


def test_the_new_forms_train_in_one_sweep_each_equal_to_its_standalone_run(tmp_path, monkeypatch):
    use_reader(monkeypatch, FakeReader())
    sweep = SweepConfig(store="fake-store", out=str(tmp_path / "sweep"), base=BASE, grid=GRID)
    rows = run_sweep(sweep)
    assert len(rows) == 6 and {row["sparsity"] for row in rows} >= {"c0.01-t3", "c0.006-t5", "k4-p2.8", "k4"}
    for cfg in expand_sweep(sweep):
        alone = tmp_path / "alone" / Path(cfg.out).name
        run_training(cfg.model_copy(update={"out": str(alone)}))
        swept = load_file(str(tmp_path / "sweep" / Path(cfg.out).name / "sae_weights.safetensors"))
        single = load_file(str(alone / "sae_weights.safetensors"))
        for name in single:
            assert torch.equal(swept[name], single[name]), (cfg.sae.arch, name)


def test_cli_flags_of_the_new_forms(tmp_path, monkeypatch, capsys):
    use_reader(monkeypatch, FakeReader())
    common = ["train", "--store", "fake-store", "--layer", "3", "--expansion", "2", "--batch-size", "32",
              "--buffer-tokens", "128", "--tokens", "256"]
    code, _, err = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "m"), "--sae",
                           "matryoshka_batchtopk", "--k", "3", "--prefixes", "4,8")
    assert code == 0, err
    sae, _ = load_sae(tmp_path / "m")
    assert sae.architecture == "matryoshka_batchtopk" and sae.prefixes == (4, 8)
    code, _, err = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "t"), "--target-l0", "5")
    assert code == 0, err
    assert load_sae(tmp_path / "t")[0].target_l0 == 5
    code, _, err = run_cli(monkeypatch, capsys, *common, "--out", str(tmp_path / "bad"), "--sae",
                           "matryoshka_batchtopk", "--k", "3", "--prefixes", "8,4")
    assert_one_line_error(code, err, "prefixes [8, 4] must be sizes that increase strictly")
    assert not (tmp_path / "bad").exists()
