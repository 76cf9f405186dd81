"""The token policy at the activation level (DESIGN.md section 5): which positions of the
policy's position set (`TokenBatch.train_mask`, sae_dist.data) an SAE trains on and is scored
on. The producer and the evaluation both call `PositionFilter.keep`, so they keep the same
positions of the same batches.

Definition, per hookpoint h and batch of n positions in the position set (row-major order):
a position is an outlier at h iff its activation norm ||x|| > factor x m_h, where m_h is the
median of the norms of this batch's finite positions together with the last `window` norms
that h's filter kept before (the running median; a fresh filter has none). It is non-finite iff
any entry is NaN or inf. A position is kept iff it is finite and not an outlier at any
hookpoint of the filter; then each filter appends the norms it kept by itself to its history.
With factor None only non-finite positions are left out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_dist.hookpoints import Hookpoint

WINDOW = 16384
"""Norms a filter remembers for its running median."""


class OutlierFilter:
    """One hookpoint's filter: flags positions whose activation norm exceeds `factor` x the
    running median norm (attention sinks reach 100-1000x) and non-finite ones; counts both."""

    def __init__(self, factor: float | None, window: int = WINDOW):
        self.factor = factor
        self.window = window
        self.history = torch.empty(0)
        self.dropped_outliers = 0
        self.dropped_nonfinite = 0

    def __call__(self, acts: Tensor) -> Tensor:
        """acts [n, d] -> the kept rows [m, d], m <= n."""
        return acts[self.keep(acts)]

    def keep(self, acts: Tensor) -> Tensor:
        """acts [n, d] -> bool [n] (on acts' device): finite and not an outlier. Counts the
        rows it rejects; the running median follows the rows it keeps."""
        finite = torch.isfinite(acts).all(dim=1)
        self.dropped_nonfinite += int((~finite).sum())
        if self.factor is None:
            return finite
        norms = acts.norm(dim=1).float().cpu()
        valid = norms[finite.cpu()]
        if not valid.numel():
            return finite
        reference = torch.cat([self.history, valid]).median()
        keep = finite.cpu() & (norms <= self.factor * reference)
        self.dropped_outliers += int((finite.cpu() & ~keep).sum())
        self.history = torch.cat([self.history, norms[keep]])[-self.window :]
        return keep.to(acts.device)

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "dropped_outliers": self.dropped_outliers,
            "dropped_nonfinite": self.dropped_nonfinite,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]
        self.dropped_outliers = state["dropped_outliers"]
        self.dropped_nonfinite = state["dropped_nonfinite"]


class PositionFilter:
    """The filters of every hookpoint of a run (or an evaluation): a position is kept iff every
    hookpoint's `OutlierFilter` keeps it, so all SAEs see the same positions."""

    def __init__(self, names: list[str], factor: float | None, window: int = WINDOW):
        self.filters = {name: OutlierFilter(factor, window) for name in names}

    def keep(self, acts: dict[str, Tensor]) -> Tensor:
        """{hookpoint name: activations [n, d] at the position set's positions} -> bool [n]."""
        return torch.stack([self.filters[name].keep(x) for name, x in acts.items()]).all(0)

    def keep_positions(self, acts: dict[Hookpoint, Tensor], mask: Tensor) -> Tensor:
        """bool [B, T]: the positions of mask [B, T] (the position set) that are kept, given
        the activations [B, T, d] at the filter's hookpoints (the evaluation's and the feature
        statistics' form of `keep`)."""
        keep = mask.clone()
        keep[mask] = self.keep({hp.name: a[mask].float() for hp, a in acts.items()})
        return keep

    def dropped(self, kind: str) -> dict[str, int]:
        """{hookpoint name: positions its own filter flagged}; kind `outliers` or `nonfinite`."""
        return {name: getattr(f, f"dropped_{kind}") for name, f in self.filters.items()}

    def state_dict(self) -> dict:
        return {name: f.state_dict() for name, f in self.filters.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, f in self.filters.items():
            f.load_state_dict(state[name])
