"""Matrix products with SAE latents that skip the latents' zeros.

A trained SAE fires a few dozen of its thousands of latents per token, so three of the five big products of a
training step multiply mostly by zero: the decoder product, the decoder's weight gradient and the encoder's
weight gradient (the gradient of the pre-activations is zero wherever a latent is off). Early in training,
when most latents still fire, sparse kernels lose to dense ones, so each product checks the density and
picks. The threshold is conservative: in one-off timings on the development CPU ([4096, 9216] latents,
d_in 576) conversion plus CSR product took half the dense product's time at 3% density and broke even
near 10%.
"""

import warnings

import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

SPARSE_BELOW = 0.03  # density (share of non-zeros) under which the CSR kernels are used on CPU


def sparse_rows(M_BF: torch.Tensor) -> torch.Tensor | None:
    """M in CSR form when it is sparse enough to pay for the conversion; None otherwise."""
    if M_BF.device.type != "cpu" or M_BF.dtype != torch.float32:
        return None  # GPUs and low-precision dtypes are left to their dense kernels
    if torch.count_nonzero(M_BF) > SPARSE_BELOW * M_BF.numel():
        return None
    # Built by hand: twice as fast as Tensor.to_sparse_csr() here, which goes through COO.
    rows, cols = M_BF.nonzero(as_tuple=True)
    return csr_from_coordinates(rows, cols, M_BF[rows, cols], M_BF.shape)


def csr_from_coordinates(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                         shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix from row-major sorted coordinates (as nonzero() returns them)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=shape[0]), dim=0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, cols, values, tuple(shape), check_invariants=False)


def sampled_product(G_BD: torch.Tensor, W_FD: torch.Tensor, pattern_csr: torch.Tensor) -> torch.Tensor:
    """(G @ W^T) at the pattern's non-zero positions only, in the pattern's order."""
    return torch.sparse.sampled_addmm(pattern_csr, G_BD, W_FD.T, beta=0.0).values()


def transposed_product(M_BF: torch.Tensor, M_csr: torch.Tensor | None, G_BD: torch.Tensor) -> torch.Tensor:
    """M^T @ G as a [F, D] tensor."""
    return M_BF.T @ G_BD if M_csr is None else M_csr.t() @ G_BD


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents_BF, W_dec_FD):
        latents_csr = sparse_rows(latents_BF)
        ctx.save_for_backward(latents_BF, W_dec_FD)
        ctx.latents_csr = latents_csr
        return latents_BF @ W_dec_FD if latents_csr is None else latents_csr @ W_dec_FD

    @staticmethod
    def backward(ctx, grad_BD):
        latents_BF, W_dec_FD = ctx.saved_tensors
        grad_latents = grad_BD @ W_dec_FD.T if ctx.needs_input_grad[0] else None
        grad_W_dec = transposed_product(latents_BF, ctx.latents_csr, grad_BD) if ctx.needs_input_grad[1] else None
        return grad_latents, grad_W_dec


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F):
        ctx.save_for_backward(x_BD, W_enc_DF)
        return torch.addmm(b_enc_F, x_BD, W_enc_DF)

    @staticmethod
    def backward(ctx, grad_BF):
        x_BD, W_enc_DF = ctx.saved_tensors
        grad_csr = sparse_rows(grad_BF)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_BF @ W_enc_DF.T if grad_csr is None else grad_csr @ W_enc_DF.T
        grad_W_enc = transposed_product(grad_BF, grad_csr, x_BD).T if ctx.needs_input_grad[1] else None
        grad_b_enc = grad_BF.sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_W_enc, grad_b_enc


def decode(latents_BF: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """latents @ W_dec; sparse kernels forward and for W_dec's gradient when few latents fire."""
    return _Decode.apply(latents_BF, W_dec_FD)


def encode(x_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor) -> torch.Tensor:
    """x @ W_enc + b_enc; the weight gradient skips the zeros of the pre-activations' gradient."""
    return _Encode.apply(x_BD, W_enc_DF, b_enc_F)
