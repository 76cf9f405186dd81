"""Activation-level metrics of an SAE (DESIGN.md section 8), accumulated in float64 over the
positions the token policy keeps: FVU, explained variance, MSE, cosine, L0, and the latent
frequencies behind the dead and dense fractions and the frequency histogram."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.sae import Latents, SparseAutoencoder

DENSE_THRESHOLD = 0.1
"""A latent active on more than this fraction of tokens counts as dense."""


HIST_EDGES = [e / 2 for e in range(-14, 1)]
"""Edges of the latent-frequency histogram in log10(fraction of tokens): 1e-7 .. 1 in half
decades; frequencies below 1e-7 (but > 0) fall in the first bin; dead latents are counted apart."""


Reconstructor = Callable[[Tensor], Tensor]
"""Any x [n, d_in] -> x_hat [n, d_in]; sparsity metrics are None for such a plain function."""


SAELike = SparseAutoencoder | Reconstructor


def frequency_metrics(freq: Tensor) -> dict[str, float]:
    """From each latent's firing frequency freq [d_sae] (fraction of tokens it is active on):
    dead_frac (fraction of latents never active), dense_frac (fraction active on more than
    DENSE_THRESHOLD of tokens) and dense_l0 (mean number of those dense latents active per
    token, latents per token)."""
    dense = freq > DENSE_THRESHOLD
    return {
        "dead_frac": float((freq == 0).double().mean()),
        "dense_frac": float(dense.double().mean()),
        "dense_l0": float(freq[dense].sum()),
    }


def reconstruct(sae: SAELike, x: Tensor) -> tuple[Tensor, Latents | None]:
    """x [n, d_in] float32 -> (x_hat [n, d_in], latents or None for a plain function)."""
    if isinstance(sae, SparseAutoencoder):
        latents = sae.encode(x.to(sae.W_dec.dtype))
        return sae.decode(latents), latents
    return sae(x), None


@dataclass
class ReconstructionAccumulator:
    """Running float64 sums for one SAE; `update` per batch, `result` at the end. Sums of x are
    taken around a shift (the first batch's mean) so the variance does not cancel."""

    d_in: int
    d_sae: int | None = None
    n: int = 0
    sum_sq_err: float = 0.0
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    shift: Tensor | None = None
    sum_dx: Tensor = field(init=False)
    sum_sq_dx: float = 0.0
    fire_counts: Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.sum_dx = torch.zeros(self.d_in, dtype=torch.float64)
        self.fire_counts = (
            None if self.d_sae is None else torch.zeros(self.d_sae, dtype=torch.int64)
        )

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Latents | None = None) -> None:
        """x, x_hat [n, d_in] for the tokens that pass the train mask; latents of those tokens."""
        if x.shape[0] == 0:
            return
        x64, x_hat64 = x.double(), x_hat.double()
        if self.shift is None:
            self.shift = x64.mean(0).cpu()
        dx = x64 - self.shift.to(x64.device)
        self.n += x.shape[0]
        self.sum_sq_err += float((x64 - x_hat64).pow(2).sum())
        self.sum_dx += dx.sum(0).cpu()
        self.sum_sq_dx += float(dx.pow(2).sum())
        self.sum_cos += float(nn.functional.cosine_similarity(x64, x_hat64, dim=1).sum())
        if latents is not None and self.fire_counts is not None:
            self.sum_l0 += float(latents.l0().double().sum())
            self.fire_counts += latents.fire_counts().cpu()

    def fire_count_list(self) -> list[int] | None:
        """Tokens each latent fired on ([d_sae] ints), None without latents."""
        return None if self.fire_counts is None else self.fire_counts.tolist()

    def frequency_histogram(self) -> dict[str, Any] | None:
        """{"log10_freq_edges", "counts" (latents per bin), "dead"} or None without latents."""
        if self.fire_counts is None:
            return None
        freq = self.fire_counts.double() / self.n
        alive = freq[freq > 0].log10().clamp(HIST_EDGES[0], HIST_EDGES[-1])
        counts = torch.histogram(alive, torch.tensor(HIST_EDGES, dtype=torch.float64)).hist
        return {
            "log10_freq_edges": HIST_EDGES,
            "counts": [int(c) for c in counts],
            "dead": int((freq == 0).sum()),
        }

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no evaluation tokens passed the mask")
        mean_dx = self.sum_dx / self.n
        total_var = self.sum_sq_dx - self.n * float(mean_dx.pow(2).sum())
        fvu = self.sum_sq_err / total_var if total_var > 0 else math.nan
        out: dict[str, Any] = {
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": self.sum_sq_err / self.n / self.d_in,
            "cosine": self.sum_cos / self.n,
            "l0": None,
            "dead_frac": None,
            "dense_frac": None,
            "dense_l0": None,
            "tokens": self.n,
        }
        if self.fire_counts is not None:
            out.update(
                l0=self.sum_l0 / self.n, **frequency_metrics(self.fire_counts.double() / self.n)
            )
        return out
