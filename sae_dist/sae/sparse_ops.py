"""Sparse autograd kernels for SAEs whose latents are sparse (TopK, BatchTopK, JumpReLU).

Such an SAE keeps a few latents per token (k << d_sae, or those above a threshold), so the
gradients of the encoder only touch those columns of `W_enc`. These kernels compute them from
the (token, latent) pairs instead of a dense [B, d_sae] gradient of the pre-activations, which
would cost two more dense matmuls.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def scatter_outer(indices: Tensor, coeffs: Tensor, rows: Tensor, d_sae: int) -> Tensor:
    """Sum of outer products keyed by latent: out[l] = sum over (b, j) with indices[b, j] == l
    of coeffs[b, j] * rows[b].

    indices int64 [B, k], coeffs [B, k], rows [B, d] -> [d_sae, d] in the dtype of `rows`.
    Equal to S.T @ rows for the dense S [B, d_sae] holding coeffs at indices; computed as a
    latent-major CSR matrix [d_sae, B] times `rows` (faster on CPU than COO or index_add_).
    """
    n_tokens, k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # the default unstable CPU sort is ~50x slower here
    crow = torch.zeros(d_sae + 1, dtype=torch.int32, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=d_sae), 0, out=crow[1:])
    col = torch.div(order, k, rounding_mode="floor").to(torch.int32)
    vals = coeffs.reshape(-1)[order].to(rows.dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(crow, col, vals, (d_sae, n_tokens), check_invariants=False)
    return s @ rows


def pad_rows(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int,
             fill: float) -> tuple[Tensor, Tensor]:
    """Ragged (row, column, value) entries, sorted by row, as per-row lists padded to the
    longest: (indices int64 [n_rows, m], values [n_rows, m]), m = max entries of a row (>= 1);
    padding has column 0 and value `fill`."""
    counts = torch.bincount(rows, minlength=n_rows)
    m = max(1, int(counts.max())) if rows.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    indices = torch.zeros(n_rows, m, dtype=torch.long, device=rows.device)
    indices[rows, pos] = cols
    padded = values.new_full((n_rows, m), fill)
    padded[rows, pos] = values
    return indices, padded


class GatheredPreActs(torch.autograd.Function):
    """The encoder pre-activations at a few latents per token, with sparse gradients for x,
    W_enc, b_enc and b_dec.

    forward(x [B, d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in],
            pre_at [B, j] (pre gathered at `indices`, no grad), indices int64 [B, j]) -> pre_at,
    where pre = (x - b_dec) @ W_enc + b_enc was computed once outside autograd. Entries whose
    output gradient is zero (padding) may hold any value and any index.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                pre_at: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec, indices)
        return pre_at.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, b_dec, indices = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # grads in the parameters' dtype
            grads = _encoder_grads(x, W_enc, b_dec, indices, grad, ctx.needs_input_grad[:4])
        return *grads, None, None


def _encoder_grads(x: Tensor, W_enc: Tensor, b_dec: Tensor, indices: Tensor, grad: Tensor,
                   needed: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """Gradients (x, W_enc, b_enc, b_dec) of `GatheredPreActs`, None where not `needed`.

    With g [B, j] the gradient of the pre-activations at `indices`: b_enc: index_add of g;
    W_enc: scatter_outer(g, x - b_dec).T; b_dec: -W_enc @ grad_b_enc; x: the j rows
    W_enc[:, indices[b]] weighted by g[b] (embedding_bag).
    """
    need_x, need_w, need_benc, need_bdec = needed
    g = grad.to(W_enc.dtype)
    grad_x = grad_w = grad_b_enc = grad_b_dec = None
    if need_benc or need_bdec:
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=g.device)
        grad_b_enc.index_add_(0, indices.reshape(-1), g.reshape(-1))
    if need_w:
        grad_w = scatter_outer(indices, g, (x - b_dec).to(W_enc.dtype), W_enc.shape[1]).t()
    if need_bdec:
        grad_b_dec = -(W_enc @ grad_b_enc)
    if need_x:
        grad_x = F.embedding_bag(indices, W_enc.t(), per_sample_weights=g, mode="sum")
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w, grad_b_enc if need_benc else None, grad_b_dec
