"""BatchTopK SAE (Bussmann et al. 2024): keep the k x B largest relu(pre-activations) of a
training batch of B tokens, so that tokens share the budget (k on average, not each).

Training starts as a TopK (each token's k largest, the first `topk_warmup_frac` of training):
in a batch-level competition a random dictionary hands the high-norm tokens most latents.
Inference cannot depend on the batch, so the SAE becomes a JumpReLU with one global threshold:
the mean of the training batches' thresholds (the smallest activation each kept) over the final
`threshold_window` of training, when the weights have settled (early batches, e.g. at random
initialisation, would bias it). In eval mode the SAE keeps relu(pre) > threshold, and it exports
to SAELens as architecture "jumprelu" with that threshold for every latent.

Latents stay sparse: each token's kept entries are padded to the largest count in the batch
(indices [B, m], with a `live` mask; padding has value 0), so the TopK kernels
(`GatheredPreActs`, `embedding_bag`, which skip the padding) and the AuxK loss of `TopKSAE`
apply unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.config import BatchTopKConfig, JumpReLUConfig
from sae_dist.distributed import LOCAL, BatchGroup
from sae_dist.sae.base import SAEOutput, register
from sae_dist.sae.jumprelu import JumpReLUSAE
from sae_dist.sae.sparse_ops import nth_largest, pad_rows
from sae_dist.sae.topk import TopKSAE


def latent_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The True entries of mask [B, d_sae] as per-token latent lists padded to the longest:
    (indices [B, m], live mask [B, m])."""
    rows, cols = mask.nonzero(as_tuple=True)
    indices, _, live = pad_rows(rows, cols, cols, mask.shape[0], 0)
    return indices, live


def batch_topk(pre: Tensor, n: int, group: BatchGroup = LOCAL) -> tuple[Tensor, Tensor, Tensor]:
    """The n largest entries of relu(pre) [B, d_sae] over the whole (global) batch.

    Returns (indices [B, m], keep [B, m], threshold): each row's kept entries (>= threshold
    and > 0, the threshold being the n-th largest, `nth_largest`) padded to the longest row,
    the mask of the real (kept) entries, and the threshold."""
    threshold = nth_largest(pre, n, group)
    indices, keep = latent_lists((pre >= threshold) & (pre > 0))
    return indices, keep, threshold


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: batch-level top k x B in training, a global threshold in eval mode.

    Buffers (saved with the training state): `threshold` (float64 scalar, the inference
    threshold) and `threshold_batches` (batches of the final window averaged so far).
    """

    saelens_architecture = "jumprelu"
    saelens_fields = ()
    cfg: BatchTopKConfig
    threshold: Tensor
    """float64 scalar buffer: the inference threshold."""
    threshold_batches: Tensor
    """int64 scalar buffer: batches of the final window averaged into `threshold` so far."""

    def __init__(self, cfg: BatchTopKConfig, d_in: int, sparse: bool = True):
        super().__init__(cfg, d_in, sparse)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64))

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Training: each token's top k during the first `topk_warmup_frac`, then the batch's
        top k x B; eval: relu(pre) > `threshold` (as float32)."""
        if self.training and self.progress < self.cfg.topk_warmup_frac:
            return super()._select(pre)
        if self.training:
            n = self.k * int(self.batch_group.sum(torch.tensor(pre.shape[0])))
            indices, keep, _ = batch_topk(pre, n, self.batch_group)
            return indices, keep
        return latent_lists(pre > self.threshold.float())

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        """Record this training batch's threshold (its smallest kept activation): before the
        final `threshold_window` of training it replaces `threshold`; within it, `threshold`
        is the running mean of the window's batches (counted by `threshold_batches`)."""
        values = out.latents.values
        if not self.training:
            return
        positive = values[values > 0]
        local_min = positive.min() if positive.numel() else values.new_tensor(float("inf"))
        batch_threshold = self.batch_group.min(local_min).double()
        if not torch.isfinite(batch_threshold):
            return
        if self.progress < 1 - self.cfg.threshold_window:
            self.threshold.copy_(batch_threshold)
            return
        self.threshold_batches += 1
        self.threshold.lerp_(batch_threshold, 1 / float(self.threshold_batches))

    @torch.no_grad()
    def scale_thresholds(self, factor: float) -> None:
        self.threshold.mul_(factor)

    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference SAE: a JumpReLU with `threshold` for every latent, same weights."""
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten below
            sae = JumpReLUSAE(JumpReLUConfig(d_sae=self.d_sae), self.d_in)
        tensors = {name: p.detach() for name, p in self.named_parameters()}
        tensors["threshold"] = self.threshold.float().expand(self.d_sae)
        sae.load_saelens_tensors(tensors)
        return sae.to(self.W_dec.device)

    def saelens_tensors(self) -> dict[str, Tensor]:
        """The JumpReLU tensors of `to_jumprelu` (W_enc, b_enc, W_dec, b_dec, threshold)."""
        return self.to_jumprelu().saelens_tensors()
