"""JumpReLU SAE (Rajamanoharan et al. 2024; the Gemma Scope recipe).

z_i = pre_i * H(pre_i - theta_i), one threshold theta_i > 0 per latent, trained as its logarithm.
H has no useful derivative, so theta learns through straight-through estimators with a
rectangle kernel K(u) = 1{|u| < 1/2} of width `bandwidth` (eps):

    d z_i / d theta_i := -(theta_i / eps) K((pre_i - theta_i) / eps)
    d H(pre_i - theta_i) / d theta_i := -(1 / eps) K((pre_i - theta_i) / eps)

while pre_i gets the plain gradient H(pre_i - theta_i) from z_i and none from the L0 penalty.
The loss is FVU + coef * mean_tokens L0. Without a target L0 the coefficient is warmed up
linearly; with `target_l0` the thresholds start at the target (`init_from_batch`) and an L0
controller on the log-thresholds holds it (`after_step`). With `target_l0` training also starts
as a TopK (k = round(target_l0), the first `topk_warmup_frac` of training), the thresholds
following the batch's BatchTopK threshold, so that the dictionary first learns under a per-token
budget; the thresholds learn from that start.

Latents are sparse (only the entries near or above the threshold take part in the step, see
`_encode`); the SAELens export holds `threshold = exp(log_threshold)`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.config import JumpReLUConfig
from sae_dist.sae.base import Latents, SAEOutput, SparseAutoencoder, register
from sae_dist.sae.sparse_ops import Entries, GatheredPreActs, nth_largest, pad_rows


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 where |u| < 1/2, else 0 (same dtype as u)."""
    return (u.abs() < 0.5).to(u.dtype)


def upper_quantile(pre: Tensor, frac: float) -> Tensor:
    """Per column of pre [N, d], the value with a fraction `frac` of the column above it: the
    1 - frac quantile (linear interpolation, as torch.quantile), from the top rows only
    (torch.quantile sorts every row and refuses more than 2^24 entries) -> [d]."""
    rank = frac * (pre.shape[0] - 1)  # position counted from the largest
    below = int(rank)
    top = pre.topk(min(pre.shape[0], below + 2), dim=0).values
    upper, lower = top[below], top[min(below + 1, top.shape[0] - 1)]
    return upper + (rank - below) * (lower - upper)


class JumpReLUFn(torch.autograd.Function):
    """pre, threshold (>= 0, broadcast to pre's shape: [d_sae] for pre [B, d_sae], or one per
    entry), bandwidth -> pre * H(pre - threshold) with the straight-through threshold gradient
    -(threshold / eps) K((pre - threshold) / eps), summed back to threshold's shape. Under
    autocast `pre` may be bfloat16; the comparison is made in the promoted dtype. An entry of
    pre may be -inf (padding): its output and gradients are 0."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return torch.where(pre > threshold, pre, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        kernel = rectangle((pre - threshold) / eps)
        grad_threshold = (-(threshold / eps) * (kernel * grad)).sum_to_size(threshold.shape)
        return grad_pre, grad_threshold.to(threshold.dtype), None


class StepFn(torch.autograd.Function):
    """pre [B, d_sae], threshold [d_sae], bandwidth -> H(pre - threshold) with the
    straight-through threshold gradient -(1 / eps) K((pre - threshold) / eps) and none for pre.

    `pre` may be dense, or a sparse COO tensor holding every entry with pre > threshold - eps/2
    (the others have H = 0 and no gradient); the output then has the same sparsity."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        if not pre.is_sparse:
            return (pre > threshold).to(pre.dtype)
        values, cols = pre._values(), pre._indices()[1]
        steps = (values > threshold[cols]).to(values.dtype)
        return torch.sparse_coo_tensor(
            pre._indices(), steps, pre.shape, is_coalesced=True, check_invariants=False
        )

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        if not pre.is_sparse:
            kernel = rectangle((pre - threshold) / eps)
            return None, (-(kernel * grad).sum(0) / eps).to(threshold.dtype), None
        rows, cols = pre._indices()
        grad_at = grad.sparse_mask(pre)._values() if grad.is_sparse else grad[rows, cols]
        kernel = rectangle((pre._values() - threshold[cols]) / eps)
        grad_threshold = torch.zeros_like(threshold).index_add_(
            0, cols, (-(kernel * grad_at) / eps).to(threshold.dtype)
        )
        return None, grad_threshold, None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE with a per-latent threshold and an L0 penalty.

    `log_threshold` [d_sae] is float64, so that `threshold` (float32, exported to SAELens as
    `threshold`) and the value read back from SAELens are bit-identical.
    """

    edited_parameters = ("W_dec", "log_threshold")  # the L0 controller and TopK warm-up
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, d_in: int):
        super().__init__(cfg, d_in)
        init = torch.full((self.d_sae,), cfg.threshold_init, dtype=torch.float64)
        self.log_threshold = nn.Parameter(init.log())
        self.warmup_threshold: Tensor | None = None
        """During the TopK warm-up, the last training batch's BatchTopK threshold (scalar,
        scaled units), set by `_encode` and applied to every latent by `after_step`."""

    @property
    def in_topk_warmup(self) -> bool:
        """Training with `target_l0`, within the first `topk_warmup_frac`: the SAE is a TopK."""
        return (
            self.training
            and self.cfg.target_l0 is not None
            and self.progress < self.cfg.topk_warmup_frac
        )

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """b_dec (base class), then with `target_l0` each latent's threshold at the
        1 - target_l0 / d_sae quantile of its pre-activations over the global batch x, so that
        the starting L0 is target_l0 and every latent fires on its share of the tokens."""
        super().init_from_batch(x)
        target = self.cfg.target_l0
        if target is None:
            return
        rows = self.batch_group.cat(x.flatten()).view(-1, x.shape[1])
        pre = self.pre_acts(rows.to(self.W_enc.dtype))
        threshold = upper_quantile(pre, min(1.0, target / self.d_sae))
        self.log_threshold.copy_(threshold.double().clamp_min(self.cfg.threshold_init).log())

    def param_groups(self, lr: float) -> list[dict]:
        """The weights at `lr`, the log-thresholds at `threshold_lr_mult` x lr."""
        weights = [p for name, p in self.named_parameters() if name != "log_threshold"]
        lr_mult = self.cfg.threshold_lr_mult
        assert lr_mult is not None  # resolved by JumpReLUConfig.__post_init__
        return [{"params": weights, "lr": lr}, {"params": [self.log_threshold], "lr": lr * lr_mult}]

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        """With `target_l0`, the L0 controller: every log-threshold moves by
        l0_adapt_rate x log(L0 / target_l0), the batch's L0 over the global batch (the log
        ratio clipped to [-1, 1]; L0 floored at 1/2), so L0 returns to the target within a few
        steps whatever the encoder did. During the TopK warm-up every threshold is instead set
        to the batch's BatchTopK threshold (`warmup_threshold`, floored at threshold_init)."""
        target = self.cfg.target_l0
        if target is None or not self.training:
            return
        if self.in_topk_warmup:
            assert self.warmup_threshold is not None  # set by this step's _encode_topk
            level = max(float(self.warmup_threshold), self.cfg.threshold_init)
            self.log_threshold.fill_(math.log(level))
            return
        group = self.batch_group
        l0 = group.sum(out.latents.l0().sum()) / group.sum(
            out.latents.values.new_tensor(float(out.latents.values.shape[0]))
        )
        miss = math.log(max(float(l0), 0.5) / target)
        self.log_threshold.add_(self.cfg.l0_adapt_rate * min(1.0, max(-1.0, miss)))

    @torch.no_grad()
    def scale_thresholds(self, factor: float) -> None:
        self.log_threshold.add_(math.log(factor))

    @property
    def threshold(self) -> Tensor:
        """[d_sae] exp(log_threshold) in the dtype of W_enc (differentiable)."""
        return self.log_threshold.exp().to(self.W_enc.dtype)

    def _encode(self, x: Tensor) -> tuple[Latents, Tensor]:
        """x [B, d_in] -> (latents, pre-activations).

        Sparse (default): pre [B, d_sae] from one matmul outside autograd; the latents are each
        token's entries above threshold - eps/2 (the threshold's gradient window; above the
        threshold itself when no gradient is taken), padded per token (values/indices [B, m],
        padding value 0), with sparse encoder gradients (`GatheredPreActs`); `pre` is returned
        as a sparse COO tensor of those entries (for `StepFn`). Dense reference
        (`sparse=False`): dense latents and pre [B, d_sae] with graph."""
        if self.in_topk_warmup:
            return self._encode_topk(x)
        threshold, grad = self.threshold, torch.is_grad_enabled()
        if not self.sparse:
            pre = self.pre_acts(x)
            values = JumpReLUFn.apply(pre, threshold, self.cfg.bandwidth)
            return Latents(values, None, self.d_sae), pre
        with torch.no_grad():
            pre = self.pre_acts(x)
            lowest = threshold - self.cfg.bandwidth / 2 if grad else threshold
            rows, cols = (pre > lowest.detach()).nonzero(as_tuple=True)
            near = pre[rows, cols]
            indices, pre_at, live = pad_rows(rows, cols, near, pre.shape[0], float("-inf"))
        pre_at = GatheredPreActs.apply(
            x, self.W_enc, self.b_enc, self.b_dec, pre_at, Entries.of(indices, live)
        )
        values = JumpReLUFn.apply(pre_at, threshold[indices], self.cfg.bandwidth)
        near_pre = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), near, pre.shape, is_coalesced=True, check_invariants=False
        )
        return Latents(values, indices, self.d_sae, live), near_pre

    def _encode_topk(self, x: Tensor) -> tuple[Latents, Tensor]:
        """The TopK warm-up: x [B, d_in] -> (each token's round(target_l0) largest
        relu(pre-activations), values/indices [B, k]; pre [B, d_sae], with graph only on the
        dense path). Records the global batch's k x B-th largest pre-activation in
        `warmup_threshold`."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse):
            pre = self.pre_acts(x)
        target = self.cfg.target_l0
        assert target is not None  # the TopK warm-up runs only with target_l0
        k = min(self.d_sae, max(1, round(target)))
        indices = pre.detach().topk(k, dim=1, sorted=False).indices
        n = k * int(self.batch_group.sum(torch.tensor(pre.shape[0])))
        self.warmup_threshold = nth_largest(pre.detach(), n, self.batch_group)
        return Latents(self._activate(x, pre, indices), indices, self.d_sae), pre

    def aux_losses(
        self, x: Tensor, x_hat: Tensor, latents: Latents, pre: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """{"l0": warm-up * l0_coef * mean_tokens L0}, the L0 counted through `StepFn` so
        that the thresholds (only they) get its gradient. With `target_l0` there is no warm-up:
        the thresholds start at the target and the controller (`after_step`) holds it. During
        the TopK warm-up the term is 0 x sum(log_threshold): the thresholds take no part in a
        TopK step, and data parallelism (DDP) expects every parameter in the graph."""
        if self.in_topk_warmup:
            return {"l0": 0.0 * self.log_threshold.sum().to(x.dtype)}
        steps = StepFn.apply(pre, self.threshold, self.cfg.bandwidth)
        group = self.batch_group
        l0 = group.sum(steps.sum()) / group.sum(pre.new_tensor(float(pre.shape[0])))
        warmup = 1.0 if self.cfg.target_l0 is not None else self.warmup(self.cfg.l0_warmup_frac)
        return {"l0": self.cfg.l0_coef * warmup * l0}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """W_enc, b_enc, W_dec, b_dec and threshold [d_sae] (float32)."""
        tensors = super().saelens_tensors()
        del tensors["log_threshold"]
        tensors["threshold"] = self.threshold.detach().float().cpu().contiguous()
        return tensors

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `saelens_tensors`: log_threshold = log(threshold) in float64. A threshold
        <= 0 is read as 0: SAELens computes relu(pre) * H(pre - threshold), which is then relu."""
        tensors = dict(tensors)
        threshold = tensors.pop("threshold").to(torch.float64).clamp_min(0)
        tensors["log_threshold"] = threshold.log()
        super().load_saelens_tensors(tensors)
