"""ReLU SAE with an L1 penalty (Bricken et al. 2023; decoder-norm weighting as in Anthropic's
April 2024 update): the classic baseline, SAELens architecture "standard".

z = relu(pre); loss = FVU + coef * mean_tokens sum_i z_i ||W_dec[i]|| / rms_tokens ||x - mean(x)||
with coef warmed up linearly. Dividing by the batch's RMS centred norm makes the penalty
dimensionless like the FVU, so `l1_coef` does not depend on the input scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.config import ReLUConfig
from sae_dist.sae.base import Latents, SparseAutoencoder, register, total_variance


@register("relu")
class ReLUSAE(SparseAutoencoder):
    """ReLU SAE; latents are dense [B, d_sae]."""

    saelens_architecture = "standard"
    cfg: ReLUConfig

    def _encode(self, x: Tensor) -> tuple[Latents, Tensor]:
        """x [B, d_in] -> (relu(pre) [B, d_sae], pre [B, d_sae] with graph)."""
        pre = self.pre_acts(x)
        return Latents(torch.relu(pre), None, self.d_sae), pre

    def aux_losses(
        self, x: Tensor, x_hat: Tensor, latents: Latents, pre: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """{"l1": warm-up * l1_coef * decoder-norm-weighted L1 / RMS centred norm of x}."""
        norms = torch.linalg.vector_norm(self.W_dec, dim=1)
        weighted = latents.values.to(norms.dtype) @ norms
        group = self.batch_group
        n = group.sum(x.new_tensor(float(x.shape[0])))
        rms = (total_variance(x, group) / n).sqrt()
        coef = self.cfg.l1_coef * self.warmup(self.cfg.l1_warmup_frac)
        return {"l1": coef * group.sum(weighted.sum()) / n / rms}
