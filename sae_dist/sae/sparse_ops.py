"""Sparse autograd kernels for SAEs whose latents are sparse (TopK, BatchTopK, JumpReLU).

Such an SAE keeps a few latents per token (k << d_sae, or those above a threshold), so the
gradients of the encoder only touch those columns of `W_enc`. These kernels compute them from
the (token, latent) pairs instead of a dense [B, d_sae] gradient of the pre-activations, which
would cost two more dense matmuls.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.distributed import LOCAL, BatchGroup


@dataclass
class Entries:
    """The entries of per-token latent lists [B, j] that take part in a computation, flattened
    in row order: `latent` int64 [n], `row` int64 [n] (their token), `offsets` int64 [B] (where
    each token's entries start, as `embedding_bag` takes them), `live` bool [B, j] or None
    (every entry)."""

    latent: Tensor
    row: Tensor
    offsets: Tensor
    live: Tensor | None

    @classmethod
    def of(cls, indices: Tensor, live: Tensor | None = None) -> Entries:
        """The entries of indices int64 [B, j] where `live` [B, j] is True (None: all)."""
        n_rows, j = indices.shape
        if live is None:
            counts = torch.full((n_rows,), j, dtype=torch.long, device=indices.device)
            latent = indices.reshape(-1)
        else:
            counts = live.sum(1)
            latent = indices[live]
        row = torch.repeat_interleave(
            torch.arange(n_rows, device=indices.device), counts, output_size=latent.numel()
        )
        return cls(latent, row, torch.cumsum(counts, 0) - counts, live)

    def take(self, values: Tensor) -> Tensor:
        """values [B, j] -> [n] of the entries (differentiable)."""
        return values.reshape(-1) if self.live is None else values[self.live]

    def bag_sum(self, values: Tensor, table: Tensor) -> Tensor:
        """[B, d] = per token, the sum of its entries' values [B, j] times table[latent] [d]
        (`SparseDecode`, differentiable in both)."""
        return SparseDecode.apply(self.take(values).to(table.dtype), table, self)

    def token_major(self, values: Tensor, n_cols: int) -> Tensor:
        """The entries as a sparse CSR matrix [B, n_cols] in token-major order (row `row`,
        column `latent`) holding `values` [n]."""
        n_rows = self.offsets.numel()
        crow = torch.empty(n_rows + 1, dtype=torch.int64, device=values.device)
        crow[:-1] = self.offsets
        crow[-1] = self.latent.numel()
        return csr_matrix(crow, self.latent, values, (n_rows, n_cols))


def csr_matrix(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR tensor of `shape` from int64 row pointers [rows + 1], column ids [n] and
    values [n], unchecked (the callers build valid ones) and without PyTorch's beta warning."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class SparseDecode(torch.autograd.Function):
    """out [B, d] = per token, sum over its entries e of values[e] * table[latent[e]].

    forward(values [n], table [d_sae, d], entries) -> out (an `embedding_bag` over the entries).
    Backward, from the entries only (no dense [d_sae, d] scatter of embedding_bag's own):
    values: grad_out[row[e]] . table[latent[e]] for each entry (a sampled matmul over the
    token-major pattern); table: `scatter_outer(entries, values, grad_out)`, contiguous in the
    table's layout.
    """

    @staticmethod
    def forward(ctx, values: Tensor, table: Tensor, entries: Entries) -> Tensor:
        ctx.save_for_backward(values, table)
        ctx.entries = entries
        return F.embedding_bag(
            entries.latent, table, entries.offsets, mode="sum", per_sample_weights=values
        )

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, table = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad = grad.to(table.dtype).contiguous()
        grad_values = grad_table = None
        with torch.autocast(grad.device.type, enabled=False):  # grads in the table's dtype
            if ctx.needs_input_grad[0]:
                pattern = entries.token_major(values.new_zeros(values.numel()), table.shape[0])
                grad_values = torch.sparse.sampled_addmm(
                    pattern, grad, table.t(), beta=0.0
                ).values()
            if ctx.needs_input_grad[1]:
                grad_table = scatter_outer(entries, values, grad, table.shape[0])
        return grad_values, grad_table, None


def scatter_outer(entries: Entries, coeffs: Tensor, rows: Tensor, d_sae: int) -> Tensor:
    """Sum of outer products keyed by latent: out[l] = sum over the entries e with
    latent[e] == l of coeffs[e] * rows[row[e]].

    coeffs [n] (one per entry), rows [B, d] -> [d_sae, d] in the dtype of `rows`. Equal to
    S.T @ rows for the dense S [B, d_sae] holding the coeffs; computed as a latent-major CSR
    matrix [d_sae, B] times `rows` (faster on CPU than COO or index_add_), written by an addmm
    with beta 0 into a fresh tensor (`s @ rows` zero-fills and copies its result besides).
    """
    # stable: the default unstable CPU sort was ~50x slower here
    order = torch.argsort(entries.latent, stable=True)
    crow = torch.zeros(d_sae + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(entries.latent, minlength=d_sae), 0, out=crow[1:])
    col = entries.row[order]
    s = csr_matrix(crow, col, coeffs[order].to(rows.dtype), (d_sae, rows.shape[0]))
    out = rows.new_empty(d_sae, rows.shape[1])
    return torch.addmm(out, s, rows, beta=0, out=out)


def pad_rows(
    rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, fill: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Ragged (row, column, value) entries, sorted by row, as per-row lists padded to the
    longest: (indices int64 [n_rows, m], values [n_rows, m], live bool [n_rows, m]), m = max
    entries of a row (>= 1); padding has column 0, value `fill` and live False."""
    counts = torch.bincount(rows, minlength=n_rows)
    m = max(1, int(counts.max())) if rows.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    indices = torch.zeros(n_rows, m, dtype=torch.long, device=rows.device)
    indices[rows, pos] = cols
    padded = values.new_full((n_rows, m), fill)
    padded[rows, pos] = values
    live = torch.zeros(n_rows, m, dtype=torch.bool, device=rows.device)
    live[rows, pos] = True
    return indices, padded, live


class GatheredPreActs(torch.autograd.Function):
    """The encoder pre-activations at a few latents per token, with sparse gradients for x,
    W_enc, b_enc and b_dec.

    forward(x [B, d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in],
            pre_at [B, j] (pre gathered at the entries' latents, no grad), entries) -> pre_at,
    where pre = (x - b_dec) @ W_enc + b_enc was computed once outside autograd. Entries that
    are not live (padding) get no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        pre_at: Tensor,
        entries: Entries,
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.entries = entries
        return pre_at.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, b_dec = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):  # grads in the parameters' dtype
            grads = _encoder_grads(
                x, W_enc, b_dec, ctx.entries, ctx.entries.take(grad), ctx.needs_input_grad[:4]
            )
        return *grads, None, None


def _encoder_grads(
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    entries: Entries,
    grad: Tensor,
    needed: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Gradients (x, W_enc, b_enc, b_dec) of `GatheredPreActs`, None where not `needed`.

    With g [n] the gradient of the pre-activations at the entries: b_enc: index_add of g;
    W_enc: scatter_outer(g, x - b_dec).T (a transposed view, made contiguous when accumulated);
    b_dec: -W_enc @ grad_b_enc; x: per token, its entries' rows W_enc[:, latent] weighted by g
    (embedding_bag).
    """
    need_x, need_w, need_benc, need_bdec = needed
    g = grad.to(W_enc.dtype)
    grad_x = grad_w = grad_b_enc = grad_b_dec = None
    if need_benc or need_bdec:
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=g.device)
        grad_b_enc.index_add_(0, entries.latent, g)
    if need_w:
        grad_w = scatter_outer(entries, g, (x - b_dec).to(W_enc.dtype), W_enc.shape[1]).t()
    if need_bdec:
        assert grad_b_enc is not None  # computed above whenever need_bdec
        grad_b_dec = -(W_enc @ grad_b_enc)
    if need_x:
        grad_x = F.embedding_bag(
            entries.latent, W_enc.t(), entries.offsets, per_sample_weights=g, mode="sum"
        ).to(x.dtype)
    return grad_x, grad_w, grad_b_enc if need_benc else None, grad_b_dec


def nth_largest(pre: Tensor, n: int, group: BatchGroup = LOCAL) -> Tensor:
    """The n-th largest entry of pre [B, d_sae] over the whole (global) batch, at least 0.

    Candidates are each row's top 4n/B entries (B: global rows); a row whose candidates all
    reach the threshold found may hold more, so its whole row joins the candidates and the
    threshold is taken again (it can only rise, so no other row can saturate). Under data
    parallelism each process offers its n best candidates and the threshold is the n-th
    largest of all offers, as in one process."""
    n_rows, d_sae = pre.shape
    global_rows = int(group.sum(torch.tensor(n_rows)))
    top = pre.topk(min(d_sae, 4 * -(-n // global_rows)), dim=1, sorted=False).values

    def threshold_of(candidates: Tensor) -> Tensor:
        offers = group.cat(candidates.topk(min(n, candidates.numel()), sorted=False).values)
        return offers.topk(n, sorted=False).values.min().clamp_min(0)

    threshold = threshold_of(top.flatten())
    saturated = (top.min(1).values >= threshold) & (top.shape[1] < d_sae)
    if int(group.max(saturated.any().long())):
        threshold = threshold_of(torch.cat([top[~saturated].flatten(), pre[saturated].flatten()]))
    return threshold
