"""How much an SAE's held-out figures move with the data: per-document sums, a bootstrap over
documents, and the figures on disjoint regions of the corpus (DESIGN.md section 8).

Positions of one document are correlated (a chat about code reconstructs differently from a
chat in French), so the unit of resampling is the document, never the position. FVU, L0 and
delta loss are ratios of sums; a resample weights each document's sums by how often it was
drawn and recomputes the ratio, so the interval covers the ratio's own spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SPREAD_METRICS = ("fvu", "l0", "delta_loss")
"""The metrics with a bootstrap interval (`<metric>_ci`) and a value per region."""


def sum_by_document(docs: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(unique document ids [u] int64, per-document sums [u, *values.shape[1:]] float64) of
    per-position `values` [n, ...] whose documents are `docs` [n]."""
    ids, inverse = torch.unique(docs, return_inverse=True)
    sums = torch.zeros((len(ids), *values.shape[1:]), dtype=torch.float64, device=values.device)
    return ids.cpu(), sums.index_add_(0, inverse, values.double()).cpu()


def merge_parts(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-document sums of several batches (a document may span batches), as sum_by_document
    gives them: (ids [u], sums [u, ...])."""
    if not parts:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return sum_by_document(torch.cat([i for i, _ in parts]), torch.cat([s for _, s in parts]))


@dataclass
class DocumentSums:
    """Float64 sums of one SAE over each evaluated document (D documents, d = d_in).

    Reconstruction sums cover the positions the token policy keeps, around a common shift (so
    sum ||x - mean||^2 follows from them without cancellation); CE sums cover the CE positions.
    A document with no position of a kind has zeros there."""

    ids: Tensor
    """int64 [D]: document ids (file indices for a local source), ascending."""
    n: Tensor
    """[D]: positions reconstructed."""
    dx: Tensor
    """[D, d]: sum of x - shift."""
    dx_sq: Tensor
    """[D]: sum of ||x - shift||^2."""
    err: Tensor
    """[D]: sum of ||x - x_hat||^2."""
    l0: Tensor | None
    """[D]: sum of active latents (None for a plain reconstruction function)."""
    ce_n: Tensor | None
    """[D]: CE positions (None without model-level metrics)."""
    ce_delta: Tensor | None
    """[D]: sum of CE spliced - CE clean over the CE positions, nats."""

    @classmethod
    def from_columns(cls, columns: dict[str, tuple[Tensor, Tensor]]) -> DocumentSums:
        """Align per-document columns {name: (ids [u], sums [u, ...])} on the union of their
        ids; names are the fields n, dx, dx_sq, err and optionally l0, ce_n, ce_delta."""
        ids = torch.unique(torch.cat([i for i, _ in columns.values()]))
        aligned = {}
        for name, (col_ids, sums) in columns.items():
            full = torch.zeros((len(ids), *sums.shape[1:]), dtype=torch.float64)
            full[torch.searchsorted(ids, col_ids)] = sums
            aligned[name] = full
        return cls(
            ids=ids,
            **{k: aligned.get(k) for k in ("l0", "ce_n", "ce_delta")},
            **{k: aligned[k] for k in ("n", "dx", "dx_sq", "err")},
        )

    def metrics(self, weights: Tensor) -> dict[str, Tensor]:
        """{metric: [B]} of B weightings [B, D] of the documents (a weight is how often a
        document counts): fvu, l0 and delta_loss of the weighted sums; NaN where undefined."""
        n = weights @ self.n
        mean_dx = (weights @ self.dx) / n[:, None]
        total = weights @ self.dx_sq - n * mean_dx.pow(2).sum(1)
        out = {"fvu": (weights @ self.err) / total}
        if self.l0 is not None:
            out["l0"] = (weights @ self.l0) / n
        if self.ce_n is not None and self.ce_delta is not None:
            out["delta_loss"] = (weights @ self.ce_delta) / (weights @ self.ce_n)
        return out


def bootstrap_intervals(
    sums: DocumentSums, resamples: int, seed: int, level: float = 0.95
) -> dict[str, list[float]]:
    """{`<metric>_ci`: [low, high]}: percentile interval at `level` of each metric over
    `resamples` resamples of the documents with replacement (seeded); NaN bounds under two
    documents."""
    d = len(sums.ids)
    if d < 2:
        return {
            f"{m}_ci": [float("nan")] * 2
            for m in sums.metrics(torch.ones(1, d, dtype=torch.float64))
        }
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, d, (resamples, d), generator=gen)
    weights = torch.zeros(resamples, d, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, d, dtype=torch.float64)
    )
    tail = (1 - level) / 2
    return {
        f"{m}_ci": [float(v) for v in torch.quantile(vals, torch.tensor([tail, 1 - tail]).double())]
        for m, vals in sums.metrics(weights).items()
    }


def region_slices(sums: DocumentSums, k: int) -> list[dict[str, float | int]]:
    """The metrics on k disjoint regions of the evaluated documents: sorted by document id
    (file position for a local source), cut into k runs of equal document count. Each entry:
    first_doc, last_doc, docs, tokens and the metrics."""
    groups = np.array_split(np.arange(len(sums.ids)), k)
    weights = torch.zeros(len(groups), len(sums.ids), dtype=torch.float64)
    for g, members in enumerate(groups):
        weights[g, torch.from_numpy(members)] = 1.0
    metrics = sums.metrics(weights)
    return [
        {
            "first_doc": int(sums.ids[members[0]]),
            "last_doc": int(sums.ids[members[-1]]),
            "docs": len(members),
            "tokens": int(sums.n[torch.from_numpy(members)].sum()),
            **{m: float(v[g]) for m, v in metrics.items()},
        }
        for g, members in enumerate(groups)
        if len(members)
    ]
