"""Every architecture in the registry honours the same contract; JumpReLU's maths match a direct reference."""

import pytest
import torch

from instructsae.schemas import JumpReLUConfig, StandardConfig
from instructsae.schemas.train import BatchTopKConfig, MatryoshkaBatchTopKConfig, SAEConfig, TopKConfig
from instructsae.sae.export import load_sae, provenance, save_sae
from instructsae.sae import SAE_CLASSES, build_sae, sae_class
from instructsae.sae.base import SparseAutoencoder
from instructsae.sae.jumprelu import JumpReLUSAE

D_IN = 16
CONFIGS = {"standard": StandardConfig(expansion=4), "jumprelu": JumpReLUConfig(expansion=4, init_threshold=0.05),
           "topk": TopKConfig(expansion=4, k=6), "batchtopk": BatchTopKConfig(expansion=4, k=6),
           "matryoshka_batchtopk": MatryoshkaBatchTopKConfig(expansion=4, k=6)}


# What SAELens 6 runs at inference (its SAE registry's names); a folder naming anything else would not load there.
SAELENS_INFERENCE = {"standard", "jumprelu", "topk", "batchtopk", "gated", "matryoshka_batchtopk"}


def test_every_config_tag_has_a_class():
    tags = {option.model_fields["arch"].default for option in SAEConfig.__origin__.__args__}
    # transcoders' tags name a family whose class also depends on the activation (tests/test_transcoders.py)
    assert tags - {"transcoder", "skip_transcoder"} == set(SAE_CLASSES) == set(CONFIGS)
    assert all(SAE_CLASSES[tag].architecture == tag for tag in set(SAE_CLASSES))


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_every_class_has_its_facts(arch):
    """The facts other code asks of a class are set (not inherited by accident) and agree with its config."""
    cls, cfg = sae_class(arch), CONFIGS[arch]
    assert "saelens_architecture" in vars(cls) or any(
        "saelens_architecture" in vars(base) for base in cls.__mro__[1:] if base is not SparseAutoencoder)
    assert cls.saelens_architecture in SAELENS_INFERENCE
    assert cls.batch_split_refusal is None or cls.batch_split_refusal.strip()
    assert cls.has_sparsity_penalty == ("sparsity_coeff" in type(cfg).model_fields)
    label = cls.sweep_label(cfg)
    assert label and "/" not in label and " " not in label
    assert 1 <= cls.decoder_rows_per_token(cfg, cfg.expansion * D_IN) <= cfg.expansion * D_IN
    cls.check_config(cfg, D_IN)  # the test configs fit a d_in of 16
    sae = build_sae(cfg, D_IN)
    assert set(sae.exported_settings) <= set(type(cfg).model_fields) and isinstance(sae.saelens_fields(), dict)


@pytest.fixture(params=sorted(SAE_CLASSES))
def sae(request):
    torch.manual_seed(0)
    return build_sae(CONFIGS[request.param], D_IN)


def test_shapes_and_names(sae):
    x_BD = torch.randn(8, D_IN)
    assert sae.W_enc.shape == (D_IN, 4 * D_IN) and sae.W_dec.shape == (4 * D_IN, D_IN)
    assert sae.encode(x_BD).shape == (8, 4 * D_IN)
    assert sae(x_BD).shape == x_BD.shape
    assert (sae.encode(x_BD) >= 0).all()


def test_loss_is_finite_and_trains_every_parameter(sae):
    out = sae.training_loss(torch.randn(32, D_IN), sparsity_coeff=0.1)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, parameter in sae.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_export_folds_the_input_scale(sae):
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    scale = 0.01
    x_raw_BD = torch.randn(8, D_IN) * 100
    sae.training_loss(torch.randn(8, D_IN), 0.1)  # BatchTopK estimates its inference threshold here
    sae.eval()
    exported = type(sae)(D_IN, sae.d_sae, **{name: getattr(sae, name) for name in sae.exported_settings}).eval()
    exported.load_state_dict(sae.export_tensors(scale))
    torch.testing.assert_close(exported.encode(x_raw_BD), sae.encode(x_raw_BD * scale), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exported(x_raw_BD), sae(x_raw_BD * scale) / scale, rtol=1e-4, atol=1e-3)


def test_saved_folder_round_trips(sae, tmp_path):
    sae.eval()  # a loaded SAE is in eval mode (BatchTopK then keeps latents above its threshold)
    save_sae(tmp_path / "sae", sae, input_scale=1.0, metadata={"layer": 3})
    loaded, cfg = load_sae(tmp_path / "sae")
    assert cfg["architecture"] == sae.saelens_architecture and cfg["d_in"] == D_IN
    assert provenance(cfg)["layer"] == 3 and provenance(cfg)["architecture"] == sae.architecture
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert type(loaded) is type(sae)
    x_BD = torch.randn(8, D_IN)
    torch.testing.assert_close(loaded(x_BD), sae(x_BD).detach())
    assert set(sae.state_dict()) == set(loaded.state_dict())


def test_unit_norm_decoder_after_a_step():
    sae = build_sae(CONFIGS["jumprelu"], D_IN)
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.1)
    sae.training_loss(torch.randn(32, D_IN), 0.1).loss.backward()
    sae.before_optimizer_step()
    # the gradient left on each decoder row is orthogonal to it
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-5
    optimizer.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae))


def test_jumprelu_matches_a_direct_reference():
    torch.manual_seed(1)
    sae = JumpReLUSAE(D_IN, 32, bandwidth=0.5, init_threshold=0.3)
    x_BD = torch.randn(64, D_IN)
    coeff = 0.7
    out = sae.training_loss(x_BD, coeff)
    out.loss.backward()

    # Reference written from the Gemma Scope equations.
    with torch.no_grad():
        pre = torch.relu((x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc)
        theta, eps = sae.threshold, sae.bandwidth
        gate = (pre > theta).float()
        latents = pre * gate
        recon = latents @ sae.W_dec + sae.b_dec
        error = recon - x_BD
        l0 = gate.sum(dim=1).mean()
        kernel = ((pre - theta).abs() < eps / 2).float()
        # d loss / d latents, through the decoder, from the mean over the batch of the summed squared error
        grad_latents = 2 * error @ sae.W_dec.T / len(x_BD)
        grad_theta_recon = (grad_latents * -(theta / eps) * kernel).sum(dim=0)
        grad_theta_l0 = coeff * (-(1 / eps) * kernel).sum(dim=0) / len(x_BD)
    torch.testing.assert_close(out.latents_BF, latents)
    torch.testing.assert_close(out.loss, error.pow(2).sum(dim=1).mean() + coeff * l0)
    torch.testing.assert_close(sae.threshold.grad, grad_theta_recon + grad_theta_l0, rtol=1e-4, atol=1e-5)
    assert kernel.sum() > 0, "the reference must exercise the kernel"


def test_standard_l1_is_weighted_by_decoder_norms():
    sae = build_sae(StandardConfig(expansion=2), D_IN)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    x_BD = torch.randn(16, D_IN)
    out = sae.training_loss(x_BD, 1.0)
    expected = (out.latents_BF * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(out.sparsity, expected)
