"""The JumpReLU training step for sparse latents, forward and backward written by hand.

Once few latents fire, autograd's dense backward wastes most of a step: of its [batch, d_sae] gradient only
the entries of firing latents (for the weights) and of latents near their threshold (for θ) are ever used.
Here the latents live as a CSR matrix and every product but the encoder's forward is sparse: the decoder
product and both weight gradients are CSR × dense, and the latents' gradient is sampled only where it is
needed (sampled_addmm). Gradients equal the dense path's (tests/test_sae_sparse_step.py); the JumpReLU
module picks this path while latents stay sparse (bench/sae_step.py measures both).
"""

import torch

from instructsae.sae.sparse_products import csr_from_coordinates, sampled_product


def near_threshold(pre_BF: torch.Tensor, threshold_F: torch.Tensor, bandwidth: float):
    """(rows, cols) where the rectangle kernel K((relu(pre) − θ)/ε) is non-zero: a few entries per feature."""
    low_F, high_F = threshold_F - bandwidth / 2, threshold_F + bandwidth / 2
    near_BF = (pre_BF > low_F) & (pre_BF < high_F)
    if bool((low_F < 0).any()):  # relu(pre) = 0 lies inside these features' kernel
        near_BF |= (pre_BF <= 0) & (low_F < 0)
    return near_BF.nonzero(as_tuple=True)


class SparseJumpReLUStep(torch.autograd.Function):
    """(x, W_enc, b_enc, b_dec, θ, W_dec) -> (reconstruction, each token's L0, dense latents for bookkeeping).

    An SAE's encoder reads x − b_dec (`centre`); a transcoder's reads x as it is, b_dec being its output's bias.
    The latents returned carry no gradient: the loss must be built from the reconstruction and the L0.
    """

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, b_dec_D, threshold_F, W_dec_FD, bandwidth, centre=True):
        centred_BD = x_BD - b_dec_D if centre else x_BD
        pre_BF = torch.addmm(b_enc_F, centred_BD, W_enc_DF)
        rows, cols = (pre_BF > threshold_F.clamp_min(0)).nonzero(as_tuple=True)
        values = pre_BF[rows, cols]
        latents_csr = csr_from_coordinates(rows, cols, values, pre_BF.shape)
        near_rows, near_cols = near_threshold(pre_BF, threshold_F, bandwidth)
        near_csr = csr_from_coordinates(near_rows, near_cols, pre_BF.new_ones(len(near_rows)), pre_BF.shape)

        recon_BD = torch.addmm(b_dec_D, latents_csr, W_dec_FD)
        l0_B = torch.bincount(rows, minlength=len(x_BD)).to(x_BD.dtype)
        latents_BF = pre_BF.zero_().index_put_((rows, cols), values)  # reuse pre's memory
        ctx.save_for_backward(centred_BD, W_enc_DF, threshold_F, W_dec_FD)
        ctx.latents_csr, ctx.near_csr, ctx.near_rows, ctx.bandwidth = latents_csr, near_csr, near_rows, bandwidth
        ctx.centre = centre
        ctx.mark_non_differentiable(latents_BF)
        return recon_BD, l0_B, latents_BF

    @staticmethod
    def backward(ctx, grad_recon_BD, grad_l0_B, _grad_latents):
        centred_BD, W_enc_DF, threshold_F, W_dec_FD = ctx.saved_tensors
        latents_csr, near_csr = ctx.latents_csr, ctx.near_csr

        grad_W_dec = latents_csr.t() @ grad_recon_BD
        # d latent / d pre = 1 where the latent fires: the pre-activations' gradient has the latents' pattern
        grad_pre_values = sampled_product(grad_recon_BD, W_dec_FD, latents_csr)
        grad_pre_csr = torch.sparse_csr_tensor(latents_csr.crow_indices(), latents_csr.col_indices(),
                                               grad_pre_values, latents_csr.shape, check_invariants=False)
        grad_W_enc = (grad_pre_csr.t() @ centred_BD).T
        grad_b_enc = torch.zeros_like(threshold_F).index_add_(0, latents_csr.col_indices(), grad_pre_values)
        grad_centred_BD = grad_pre_csr @ W_enc_DF.T
        grad_b_dec = grad_recon_BD.sum(dim=0)
        if ctx.centre:  # b_dec also shifts what the encoder reads
            grad_b_dec = grad_b_dec - grad_centred_BD.sum(dim=0)

        # θ: −(θ/ε)·K·dL/dlatent − (1/ε)·K·dL/dL0_token, summed where the kernel K is not zero
        near_cols = near_csr.col_indices()
        per_entry = threshold_F[near_cols] * sampled_product(grad_recon_BD, W_dec_FD, near_csr)
        if grad_l0_B is not None:
            per_entry = per_entry + grad_l0_B[ctx.near_rows]
        grad_threshold = torch.zeros_like(threshold_F).index_add_(0, near_cols, per_entry) * (-1.0 / ctx.bandwidth)
        return grad_centred_BD, grad_W_enc, grad_b_enc, grad_b_dec, grad_threshold, grad_W_dec, None, None
