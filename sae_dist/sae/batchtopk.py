"""BatchTopK SAE (Bussmann et al. 2024): keep the k x B largest relu(pre-activations) of a
training batch of B tokens, so that tokens share the budget (k on average, not each).

Inference cannot depend on the batch, so the SAE becomes a JumpReLU with one global threshold:
the mean of the training batches' thresholds (the smallest activation each kept) over the final
`threshold_window` of training, when the weights have settled (early batches, e.g. at random
initialisation, would bias it). In eval mode the SAE keeps relu(pre) > threshold, and it exports
to SAELens as architecture "jumprelu" with that threshold for every latent.

Latents stay sparse: each token's candidates are padded to the largest count in the batch
(indices [B, m], unkept entries have value 0), so the TopK kernels (`GatheredPreActs`,
`embedding_bag`) and the AuxK loss of `TopKSAE` apply unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.config import BatchTopKConfig, JumpReLUConfig
from sae_dist.distributed import LOCAL, BatchGroup
from sae_dist.sae.base import SAEOutput, register
from sae_dist.sae.jumprelu import JumpReLUSAE
from sae_dist.sae.topk import TopKSAE


def select_above(pre: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """Entries of pre [B, d_sae] strictly above `threshold` (scalar), as the indices [B, m] of
    each row's m largest entries (m = the largest count, at least 1) and a keep mask [B, m]."""
    m = max(1, int((pre > threshold).sum(1).max()))
    top = pre.topk(m, dim=1, sorted=False)
    return top.indices, top.values > threshold


def batch_topk(pre: Tensor, n: int, group: BatchGroup = LOCAL) -> tuple[Tensor, Tensor, Tensor]:
    """The n largest entries of relu(pre) [B, d_sae] over the whole (global) batch.

    Returns (indices [B, m], keep [B, m], threshold): each row's m largest entries, the mask
    of those among the n kept (>= threshold and > 0), and threshold = the n-th largest (>= 0).
    Searches each row's top 4n/B candidates first (B: global rows) and widens only if a row
    could hold more. Under data parallelism each process offers its n best candidates and the
    threshold is the n-th largest of all offers, as in one process.
    """
    n_rows, d_sae = pre.shape
    global_rows = int(group.sum(torch.tensor(n_rows)))
    width = min(d_sae, 4 * -(-n // global_rows))
    while True:
        top = pre.topk(width, dim=1, sorted=True)
        flat = top.values.flatten()
        offers = group.cat(flat.topk(min(n, flat.numel()), sorted=False).values)
        threshold = offers.topk(n, sorted=False).values.min().clamp_min(0)
        counts = (top.values >= threshold).sum(1)
        if width == d_sae or int(group.max(counts.max())) < width:
            break
        width = min(d_sae, 2 * width)
    m = max(1, int(counts.max()))
    values = top.values[:, :m]
    return top.indices[:, :m], (values >= threshold) & (values > 0), threshold


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: batch-level top k x B in training, a global threshold in eval mode.

    Buffers (saved with the training state): `threshold` (float64 scalar, the inference
    threshold) and `threshold_batches` (batches of the final window averaged so far).
    """

    saelens_architecture = "jumprelu"
    saelens_fields = ()

    def __init__(self, cfg: BatchTopKConfig, d_in: int, sparse: bool = True):
        super().__init__(cfg, d_in, sparse)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.int64))

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Training: the batch's top k x B; eval: relu(pre) > `threshold` (as float32)."""
        if self.training:
            n = self.k * int(self.batch_group.sum(torch.tensor(pre.shape[0])))
            indices, keep, _ = batch_topk(pre, n, self.batch_group)
            return indices, keep
        return select_above(pre, self.threshold.float())

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
