"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, then ReLU.

The training step never builds a dense [B, d_sae] latent matrix or a dense gradient of the
pre-activations: the pre-activations come from one matmul outside autograd, `GatheredPreActs`
gives sparse encoder gradients, and the decoder is an `embedding_bag` over the k active rows.
`sparse=False` selects a plain-autograd dense reference path with the same results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.config import TopKConfig
from sae_dist.sae.base import Latents, SparseAutoencoder, register, total_variance
from sae_dist.sae.sparse_ops import Entries, GatheredPreActs


@register("topk")
class TopKSAE(SparseAutoencoder):
    """TopK SAE with an AuxK loss on the dead latents.

    `sparse` (default True) selects the sparse kernels; False is the dense reference path.
    Under bf16 autocast the encoder matmul, `pre` and the latent values are bfloat16; the
    decoder and all gradients stay in the parameters' dtype.
    """

    saelens_fields = ("k",)
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig, d_in: int, sparse: bool = True):
        cfg.check(d_in)
        super().__init__(cfg, d_in)
        self.k = cfg.k
        self.k_aux = min(cfg.k_aux or d_in // 2, self.d_sae)
        self.sparse = sparse

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor | None]:
        """Latents to keep, from pre-activations [B, d_sae] (no graph): int64 indices [B, j]
        and a bool mask [B, j] of the entries to keep, or None to keep all (here: top k)."""
        return pre.topk(self.k, dim=1, sorted=False).indices, None

    def _encode(self, x: Tensor) -> tuple[Latents, Tensor]:
        """x [B, d_in] -> (values/indices [B, j], pre [B, d_sae]; pre has no graph if sparse)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse):
            pre = self.pre_acts(x)
        indices, keep = self._select(pre.detach())
        values = self._activate(x, pre, indices, keep)
        return Latents(values, indices, self.d_sae, keep), pre

    def aux_losses(
        self, x: Tensor, x_hat: Tensor, latents: Latents, pre: Tensor, dead_mask: Tensor | None
    ) -> dict[str, Tensor]:
        """{"auxk": auxk_coef * AuxK} when some latent is dead, else {}.

        AuxK: the top k_aux dead latents (by pre-activation) reconstruct the residual
        e = x - x_hat (detached) through W_dec without b_dec; the squared error is divided by
        the residual's total variance sum ||e - mean(e)||^2 (Gao et al. 2024), and scaled by
        min(n_dead / k_aux, 1) when fewer latents are dead than k_aux (EleutherAI sparsify).
        """
        n_dead = 0 if dead_mask is None else int(dead_mask.sum())  # same on every process
        if dead_mask is None or n_dead == 0:
            return {}
        k_aux = min(self.k_aux, n_dead)
        e_hat = self._decode_dead(x, pre, dead_mask.nonzero().squeeze(1), k_aux)
        e = (x - x_hat).detach()
        group = self.batch_group
        auxk = group.sum((e_hat - e).pow(2).sum()) / total_variance(e, group)
        return {"auxk": self.cfg.auxk_coef * min(n_dead / self.k_aux, 1.0) * auxk}

    def _decode_dead(self, x: Tensor, pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """[B, d_in]: per token, its top `k_aux` dead latents (`dead`: int64 ids [n_dead]) by
        pre-activation (pre [B, d_sae]), ReLU'd and decoded without b_dec. The sparse path works
        on the dead latents' sub-dictionary (their pre-activations, W_enc columns, b_enc entries
        and W_dec rows, gathered), so its kernels scale with n_dead, not d_sae."""
        pre_dead = pre.detach().index_select(1, dead)
        local = pre_dead.topk(k_aux, dim=1, sorted=False).indices
        if not self.sparse:
            indices = dead[local]
            latents = Latents(self._activate(x, pre, indices), indices, self.d_sae)
            return self._decode_latents(latents)
        entries = Entries.of(local)
        values = GatheredPreActs.apply(
            x,
            # gathered as rows of W_enc.T: the gradient then has the main path's layout
            self.W_enc.t().index_select(0, dead).t(),
            self.b_enc.index_select(0, dead),
            self.b_dec,
            pre_dead.gather(1, local),
            entries,
        )
        return entries.bag_sum(torch.relu(values), self.W_dec.index_select(0, dead))
