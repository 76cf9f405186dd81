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

from sae_dist.evaluate.spread import merge_parts, sum_by_document
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
    doc_parts: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    """Per batch and column (n, dx, dx_sq, err, l0): (document ids, per-document sums)."""

    def __post_init__(self) -> None:
        self.sum_dx = torch.zeros(self.d_in, dtype=torch.float64)
        self.fire_counts = (
            None if self.d_sae is None else torch.zeros(self.d_sae, dtype=torch.int64)
        )

    @torch.no_grad()
    def update(
        self, x: Tensor, x_hat: Tensor, docs: Tensor, latents: Latents | None = None
    ) -> None:
        """x, x_hat [n, d_in] for the tokens that pass the train mask, their document ids
        docs [n] int64, and the latents of those tokens."""
        if x.shape[0] == 0:
            return
        x64, x_hat64 = x.double(), x_hat.double()
        if self.shift is None:
            self.shift = x64.mean(0).cpu()
        dx = x64 - self.shift.to(x64.device)
        err = (x64 - x_hat64).pow(2).sum(1)
        dx_sq = dx.pow(2).sum(1)
        self.n += x.shape[0]
        self.sum_sq_err += float(err.sum())
        self.sum_dx += dx.sum(0).cpu()
        self.sum_sq_dx += float(dx_sq.sum())
        self.sum_cos += float(nn.functional.cosine_similarity(x64, x_hat64, dim=1).sum())
        columns = {"n": torch.ones_like(err), "dx": dx, "dx_sq": dx_sq, "err": err}
        if latents is not None and self.fire_counts is not None:
            l0 = latents.l0().double()
            self.sum_l0 += float(l0.sum())
            self.fire_counts += latents.fire_counts().cpu()
            columns["l0"] = l0
        for name, values in columns.items():
            self.doc_parts.setdefault(name, []).append(sum_by_document(docs, values))

    def by_document(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{column: (document ids [u], per-document sums)} for `DocumentSums.from_columns`."""
        return {name: merge_parts(parts) for name, parts in self.doc_parts.items()}

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
