"""Latents given by the coordinates of the few that are active, as TopK-style SAEs choose them.

A TopK SAE knows which latents are on before it computes anything with them, so nothing of size
[batch, d_sae] needs a gradient: the active values are gathered from pre-activations computed without
autograd, the decoder product and its weight gradient are CSR × dense, and the values' gradient is sampled
only at the active coordinates (sampled_addmm). Of the five large products of a dense step only the
encoder's forward stays dense. Coordinates must be row-major sorted (rows ascending, columns ascending
within a row), as CSR wants them. Gradients equal plain autograd's (tests/test_sae_topk.py).
"""

import torch

from instructsae.sae.sparse_products import csr_from_coordinates, sampled_product


class _GatherCodes(torch.autograd.Function):
    """relu(pre[rows, cols]) where pre = centred @ W_enc + b_enc, read from pre_BF computed beforehand."""

    @staticmethod
    def forward(ctx, centred_BD, W_enc_DF, b_enc_F, pre_BF, rows, cols):
        values_N = pre_BF[rows, cols].clamp_min(0)
        ctx.save_for_backward(centred_BD, W_enc_DF, rows, cols, values_N)
        ctx.shape = pre_BF.shape
        return values_N

    @staticmethod
    def backward(ctx, grad_N):
        centred_BD, W_enc_DF, rows, cols, values_N = ctx.saved_tensors
        grad_pre_N = torch.where(values_N > 0, grad_N, 0.0)  # the relu lets no gradient through at 0
        grad_pre_csr = csr_from_coordinates(rows, cols, grad_pre_N, ctx.shape)
        grad_centred = grad_pre_csr @ W_enc_DF.T if ctx.needs_input_grad[0] else None
        grad_W_enc = (grad_pre_csr.t() @ centred_BD).T if ctx.needs_input_grad[1] else None
        grad_b_enc = torch.zeros(ctx.shape[1], dtype=grad_N.dtype, device=grad_N.device).index_add_(
            0, cols, grad_pre_N) if ctx.needs_input_grad[2] else None
        return grad_centred, grad_W_enc, grad_b_enc, None, None, None


class _DecodeCodes(torch.autograd.Function):
    """values at (rows, cols) of a [batch, d_sae] matrix, times W_dec: the decoder product without its bias."""

    @staticmethod
    def forward(ctx, values_N, W_dec_FD, rows, cols, batch):
        codes_csr = csr_from_coordinates(rows, cols, values_N, (batch, W_dec_FD.shape[0]))
        ctx.save_for_backward(W_dec_FD)
        ctx.codes_csr = codes_csr
        return codes_csr @ W_dec_FD

    @staticmethod
    def backward(ctx, grad_BD):
        (W_dec_FD,) = ctx.saved_tensors
        codes_csr = ctx.codes_csr
        grad_values = sampled_product(grad_BD, W_dec_FD, codes_csr) if ctx.needs_input_grad[0] else None
        grad_W_dec = codes_csr.t() @ grad_BD if ctx.needs_input_grad[1] else None
        return grad_values, grad_W_dec, None, None, None


def gather_codes(centred_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, pre_BF: torch.Tensor,
                 rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The active latents' values, with gradients to the encoder's weights and input."""
    return _GatherCodes.apply(centred_BD, W_enc_DF, b_enc_F, pre_BF.detach(), rows, cols)


def decode_codes(values_N: torch.Tensor, W_dec_FD: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 batch: int) -> torch.Tensor:
    """Σ_f latent_bf · W_dec_f over the active coordinates, as a [batch, d_in] tensor (no b_dec)."""
    return _DecodeCodes.apply(values_N, W_dec_FD, rows, cols, batch)


def scatter_codes(values_N: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape) -> torch.Tensor:
    """The dense [batch, d_sae] latents, for bookkeeping (dead features, L0) and for `encode`."""
    return values_N.new_zeros(shape).index_put_((rows, cols), values_N)
