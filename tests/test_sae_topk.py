"""TopK and BatchTopK: how many latents stay active, the AuxK loss, the inference threshold, k checks, the CLI."""

import json

import pytest
import torch
from helpers import assert_one_line_error, run_cli

from instructsae.errors import UserError
from instructsae.schemas.train import BatchTopKConfig, TopKConfig
from instructsae.sae.export import load_sae
from instructsae.sae import build_sae, check_sae_config
from instructsae.sae.batchtopk import THRESHOLD_DECAY, BatchTopKSAE
from instructsae.sae.topk import TopKSAE

D_IN, D_SAE, K = 16, 64, 5


def positive_sae(cls, **settings):
    """An SAE whose pre-activations are all positive, so every selected latent is non-zero."""
    torch.manual_seed(0)
    sae = cls(D_IN, D_SAE, K, **settings)
    with torch.no_grad():
        sae.b_enc.fill_(20.0)
        sae.b_enc.add_(torch.rand(D_SAE))  # distinct values, so the selection has no ties
    return sae


def reference_loss(sae, x_BD, keep_BF, dead_F):
    """The loss written densely: the kept latents decode x, the top aux_k dead ones decode the error."""
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    latents_BF = torch.relu(pre_BF) * keep_BF
    recon_BD = latents_BF @ sae.W_dec + sae.b_dec
    mse = (recon_BD - x_BD).pow(2).sum(dim=1).mean()
    if dead_F is None or not dead_F.any():
        return mse
    error_BD = (x_BD - recon_BD).detach()
    aux_k = min(sae.aux_k, int(dead_F.sum()))
    top_BK = pre_BF.detach().masked_fill(~dead_F, -torch.inf).topk(aux_k, dim=1).indices
    aux_keep_BF = torch.zeros_like(pre_BF).scatter(1, top_BK, 1.0)
    aux_recon_BD = (torch.relu(pre_BF) * aux_keep_BF) @ sae.W_dec
    variance = (error_BD - error_BD.mean(dim=0)).pow(2).sum(dim=1).mean()
    return mse + sae.aux_coeff * (aux_recon_BD - error_BD).pow(2).sum(dim=1).mean() / variance


def gradients(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in sae.named_parameters()}


def row_topk_mask(pre_BF, k):
    return torch.zeros_like(pre_BF).scatter(1, pre_BF.topk(k, dim=1).indices, 1.0)


def test_topk_keeps_exactly_k_latents_per_token_in_training_and_inference():
    sae = positive_sae(TopKSAE)
    x_BD = torch.randn(40, D_IN)
    with torch.no_grad():
        pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected_BF = pre_BF * row_topk_mask(pre_BF, K)
    out = sae.training_loss(x_BD, 0.0)
    assert ((out.latents_BF > 0).sum(dim=1) == K).all()
    torch.testing.assert_close(out.latents_BF, expected_BF)
    torch.testing.assert_close(sae.eval().encode(x_BD), expected_BF)


def test_batchtopk_keeps_exactly_k_times_batch_latents_per_batch():
    sae = positive_sae(BatchTopKSAE)
    x_BD = torch.randn(40, D_IN) * torch.linspace(0.1, 3, 40)[:, None]  # tokens of very different sizes
    out = sae.training_loss(x_BD, 0.0)
    per_token = (out.latents_BF > 0).sum(dim=1)
    assert per_token.sum() == K * len(x_BD)
    assert per_token.min() < K < per_token.max(), "the batch's latents should go where they are largest"
    with torch.no_grad():
        pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    smallest_kept = pre_BF.flatten().topk(K * len(x_BD)).values.min()
    torch.testing.assert_close(out.latents_BF, pre_BF * (pre_BF >= smallest_kept))


def test_batchtopk_estimates_a_threshold_and_uses_it_at_inference():
    sae = positive_sae(BatchTopKSAE)
    with torch.no_grad():
        sae.b_enc.sub_(20.0)  # some pre-activations negative again, so inference has something to cut
    assert (sae.threshold == -1).all(), "not estimated before training"
    first = sae.training_loss(torch.randn(32, D_IN), 0.0).latents_BF
    smallest_first = first[first > 0].min()
    torch.testing.assert_close(sae.threshold, smallest_first.expand(D_SAE))
    second = sae.training_loss(torch.randn(32, D_IN), 0.0).latents_BF
    expected = THRESHOLD_DECAY * smallest_first + (1 - THRESHOLD_DECAY) * second[second > 0].min()
    torch.testing.assert_close(sae.threshold, expected.expand(D_SAE))

    x_BD = torch.randn(7, D_IN)
    with torch.no_grad():
        pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    latents_BF = sae.eval().encode(x_BD)
    torch.testing.assert_close(latents_BF, pre_BF * (pre_BF > sae.threshold))
    assert 0 < (latents_BF > 0).sum() < (pre_BF > 0).sum(), "the threshold must keep some and cut some"
    # per token: a token's latents do not depend on the rest of the batch
    torch.testing.assert_close(sae.encode(x_BD[:1]), latents_BF[:1])


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("with_dead", [False, True])
def test_loss_and_gradients_match_a_dense_reference(cls, with_dead):
    torch.manual_seed(1)
    sae = cls(D_IN, D_SAE, K, aux_k=4)
    x_BD = torch.randn(24, D_IN)
    dead_F = (torch.arange(D_SAE) % 3 == 0) if with_dead else None
    with torch.no_grad():
        pre_BF = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cls is TopKSAE:
        keep_BF = row_topk_mask(pre_BF, K)
    else:
        keep_BF = (pre_BF >= pre_BF.flatten().topk(K * len(x_BD)).values.min()).float()
    out = sae.training_loss(x_BD, 0.0, dead_F)
    got = gradients(sae, out.loss)
    expected_loss = reference_loss(sae, x_BD, keep_BF, dead_F)
    torch.testing.assert_close(out.loss, expected_loss)
    expected = gradients(sae, expected_loss)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auxk_is_zero_without_dead_latents_and_trains_the_dead_ones_when_some_are():
    torch.manual_seed(2)
    sae = TopKSAE(D_IN, D_SAE, K, aux_k=8)
    x_BD = torch.randn(8, D_IN)
    never_selected_F = sae.training_loss(x_BD, 0.0).latents_BF.eq(0).all(dim=0)
    assert never_selected_F.sum() > 8, "more dead latents than aux_k"

    for dead_F in (None, torch.zeros(D_SAE, dtype=torch.bool)):
        out = sae.training_loss(x_BD, 0.0, dead_F)
        assert out.sparsity == 0 and out.loss == out.mse
        assert gradients(sae, out.loss)["W_enc"][:, never_selected_F].abs().max() == 0

    out = sae.training_loss(x_BD, 0.0, never_selected_F)
    assert out.sparsity > 0 and out.loss > out.mse
    grads = gradients(sae, out.loss)
    assert (grads["W_enc"][:, never_selected_F].norm(dim=0) > 0).sum() > 0
    assert (grads["W_dec"][never_selected_F].norm(dim=1) > 0).sum() > 0


def test_k_larger_than_d_sae_is_refused_with_one_line():
    with pytest.raises(UserError, match=r"^k 5000 exceeds d_sae 4608 \(expansion 8 × d_in 576\)$"):
        check_sae_config(TopKConfig(expansion=8, k=5000), 576)
    with pytest.raises(UserError, match="exceeds d_sae"):
        build_sae(BatchTopKConfig(expansion=1, k=17), 16)
    check_sae_config(TopKConfig(expansion=1, k=16), 16)  # k = d_sae is allowed


@pytest.fixture
def tiny_store(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--model", str(tiny_model_dir), "--dataset",
                           str(dialogues_jsonl), "--layers", "1", "--chunk-tokens", "64", "--dtype", "float32",
                           "--max-instances", "8", "--out", str(store))
    assert code == 0, err
    return store


def test_cli_trains_topk_with_k(tiny_store, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--store", str(tiny_store), "--sae", "topk", "--k", "8",
                             "--out", str(run), "--expansion", "2", "--batch-size", "32", "--tokens", "1000",
                             "--lr", "3e-3", "--lr-warmup-steps", "5", "--buffer-tokens", "256")
    assert code == 0, err
    assert json.loads(out)["l0"] <= 8
    sae, cfg = load_sae(run)
    assert (cfg["architecture"], cfg["k"], sae.k) == ("topk", 8, 8)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(record["l0"] <= 8 for record in records) and records[-1]["nmse"] < records[0]["nmse"]


def test_cli_refuses_k_larger_than_d_sae(tiny_store, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(tiny_store), "--sae", "topk", "--k", "500",
                           "--expansion", "2", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "k 500 exceeds d_sae 128 (expansion 2 × d_in 64)")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_cli_refuses_a_sparsity_coefficient_for_topk(tiny_store, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--store", str(tiny_store), "--sae", "topk",
                           "--sparsity-coeff", "0.1", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "sparsity_coeff")
