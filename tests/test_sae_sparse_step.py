"""The fast paths (fused JumpReLU estimator, CSR products, the hand-written sparse step) against plain autograd."""

import pytest
import torch

from instructsae.schemas import JumpReLUConfig, StandardConfig
from instructsae.schemas.transcoder import SkipTranscoderConfig, TranscoderConfig
from instructsae.sae import build_sae, sparse_products
from reference_jumprelu import reference_jumprelu_loss


def gradients(sae, loss):
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {name: param.grad.clone() for name, param in sae.named_parameters()}


def sparse_jumprelu(target_l0: float, seed: int = 0, low_thresholds: bool = True):
    """A JumpReLU SAE whose thresholds make about target_l0 latents fire, with some θ inside the kernel at 0."""
    torch.manual_seed(seed)
    sae = build_sae(JumpReLUConfig(expansion=4, bandwidth=0.05), 32)
    x = torch.randn(256, 32)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        pre = torch.relu(sae.pre_activations(x))
        quantile = 1 - target_l0 / sae.d_sae
        sae.threshold.copy_(pre.quantile(quantile, dim=0).clamp_min(1e-3))
        if low_thresholds:
            sae.threshold[:5] = 0.01  # below bandwidth/2: relu's zeros lie inside their kernel
    return sae, x


@pytest.mark.parametrize("target_l0", [4.0, 40.0])
def test_sparse_and_dense_jumprelu_steps_match_plain_autograd(target_l0):
    sae, x = sparse_jumprelu(target_l0)
    expected = gradients(sae, reference_jumprelu_loss(sae, x, 0.3))

    sae.last_density = 1.0
    assert not sae.sparse_step_pays(x)
    dense = sae.training_loss(x, 0.3)
    dense_grads = gradients(sae, dense.loss)

    sae.last_density = 0.0
    assert sae.sparse_step_pays(x)
    sparse = sae.training_loss(x, 0.3)
    sparse_grads = gradients(sae, sparse.loss)

    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.latents_BF, dense.latents_BF)
    assert expected["threshold"].abs().sum() > 0  # the estimator is exercised
    for name, grad in expected.items():
        torch.testing.assert_close(dense_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"dense {name}")
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"sparse {name}")


def test_jumprelu_switches_to_the_sparse_step_once_latents_are_sparse():
    sae, x = sparse_jumprelu(target_l0=2.0, low_thresholds=False)
    assert not sae.sparse_step_pays(x)  # nothing is known about its density yet
    sae.training_loss(x, 0.1)
    assert sae.last_density == pytest.approx(float((sae.encode(x) > 0).float().sum(-1).mean()) / sae.d_sae)
    assert sae.last_density < sparse_products.SPARSE_BELOW
    assert sae.sparse_step_pays(x)


@pytest.mark.parametrize("arch", [StandardConfig(expansion=4), JumpReLUConfig(expansion=4)])
def test_csr_products_match_dense_products(arch, monkeypatch):
    torch.manual_seed(1)
    sae = build_sae(arch, 32)
    x = torch.randn(128, 32)
    with torch.no_grad():
        sae.b_enc.fill_(-1.0)  # few latents fire, and their gradients are sparse too

    def run(sparse_below):
        monkeypatch.setattr(sparse_products, "SPARSE_BELOW", sparse_below)
        if hasattr(sae, "last_density"):
            sae.last_density = 1.0  # keep JumpReLU on the generic path, the one under test here
        out = sae.training_loss(x, 0.1)
        return out, gradients(sae, out.loss)

    dense_out, dense_grads = run(-1.0)
    sparse_out, sparse_grads = run(1.0)
    assert 0 < (dense_out.latents_BF > 0).float().mean() < 0.3
    torch.testing.assert_close(sparse_out.recon_BD, dense_out.recon_BD)
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("config", [TranscoderConfig(expansion=4, activation="jumprelu", bandwidth=0.05),
                                    SkipTranscoderConfig(expansion=4, activation="jumprelu", bandwidth=0.05)],
                         ids=["transcoder", "skip_transcoder"])
def test_jumprelu_transcoders_take_the_sparse_step_with_the_dense_steps_gradients(config):
    """A transcoder's encoder reads x itself (no b_dec) and its loss is against another site."""
    torch.manual_seed(2)
    sae = build_sae(config, 32)
    x, target = torch.randn(256, 32), torch.randn(256, 32)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)  # were it subtracted from the encoder's input, the latents would differ
        if hasattr(sae, "W_skip"):
            sae.W_skip.normal_(0, 0.1)
        sae.threshold.copy_(torch.relu(sae.pre_activations(x)).quantile(1 - 6 / sae.d_sae, dim=0).clamp_min(1e-3))

    def step(density):
        sae.last_density = density
        assert sae.sparse_step_pays(x) == (density == 0.0)
        out = sae.training_loss(x, 0.3, target_BD=target)
        return out, gradients(sae, out.loss)

    (dense, dense_grads), (sparse, sparse_grads) = step(1.0), step(0.0)
    torch.testing.assert_close(sparse.loss, dense.loss)
    torch.testing.assert_close(sparse.recon_BD, dense.recon_BD)
    assert dense_grads["threshold"].abs().sum() > 0 and dense_grads["b_dec"].abs().sum() > 0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
