"""The activation producer: LM forward passes with capture hooks at every requested hookpoint,
stopped after the last layer needed; per hookpoint the masked, outlier-filtered activations go
into an in-memory shuffle buffer that hands out training batches. Nothing touches disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
import torch
from torch import nn

from sae_dist.data import TokenBatch
from sae_dist.hookpoints import Hookpoint, capture

log = logging.getLogger(__name__)


class OutlierFilter:
    """Drops tokens whose activation norm exceeds `max_multiple` x the running median norm
    (attention sinks reach 100-1000x), and tokens with non-finite values. Counts both."""

    def __init__(self, max_multiple: float, window: int = 16384):
        self.max_multiple = max_multiple
        self.window = window
        self.history = torch.empty(0)
        self.dropped_outliers = 0
        self.dropped_nonfinite = 0

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [n, d] -> the kept rows [m, d], m <= n."""
        finite = torch.isfinite(acts).all(dim=1)
        self.dropped_nonfinite += int((~finite).sum())
        acts = acts[finite]
        norms = acts.norm(dim=1).float().cpu()
        reference = torch.cat([self.history, norms]).median() if norms.numel() else None
        if reference is None:
            return acts
        keep = norms <= self.max_multiple * reference
        self.dropped_outliers += int((~keep).sum())
        self.history = torch.cat([self.history, norms[keep]])[-self.window:]
        return acts[keep.to(acts.device)]

    def state_dict(self) -> dict:
        return {"history": self.history, "dropped_outliers": self.dropped_outliers,
                "dropped_nonfinite": self.dropped_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]
        self.dropped_outliers = state["dropped_outliers"]
        self.dropped_nonfinite = state["dropped_nonfinite"]


class ShuffleBuffer:
    """Token buffer of `capacity` rows: once full it is shuffled and hands out `batch_size`
    batches until half empty, so consecutive (correlated) tokens are spread over many batches."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator):
        if capacity < 2 * batch_size:
            raise ValueError(f"shuffle buffer capacity {capacity} < 2 x batch {batch_size}")
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self.chunks: list[torch.Tensor] = []
        self.size = 0

    def push(self, acts: torch.Tensor) -> list[torch.Tensor]:
        """Add rows [n, d]; returns the training batches [batch_size, d] that became ready."""
        self.chunks.append(acts)
        self.size += acts.shape[0]
        if self.size < self.capacity:
            return []
        data = torch.cat(self.chunks)
        perm = torch.randperm(data.shape[0], generator=self.generator).to(data.device)
        data = data[perm]
        n_out = (data.shape[0] - self.capacity // 2) // self.batch_size * self.batch_size
        self.chunks, self.size = [data[n_out:]], data.shape[0] - n_out
        return list(data[:n_out].split(self.batch_size))

    def state_dict(self) -> dict:
        return {"data": torch.cat(self.chunks) if self.chunks else torch.empty(0),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.chunks = [state["data"]] if state["data"].numel() else []
        self.size = state["data"].shape[0] if state["data"].numel() else 0
        self.generator.set_state(state["generator"])


@dataclass
class ProducerStats:
    forward_passes: int = 0
    tokens: int = 0
    """Tokens through the LM (all positions)."""
    train_tokens: int = 0
    """Tokens passing the train mask (before outlier filtering)."""
    outliers: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


class ActivationProducer:
    """One forward pass per token batch feeds every hookpoint. Yields, per forward pass, the
    filtered activations {hookpoint name: float32 [n_kept, d_model]} on `device`."""

    def __init__(self, model: nn.Module, hookpoints: list[Hookpoint], max_norm_multiple: float,
                 device: torch.device):
        self.model, self.hookpoints, self.device = model, hookpoints, device
        self.filters = {hp.name: OutlierFilter(max_norm_multiple) for hp in hookpoints}
        self.stats = ProducerStats()

    def activations(self, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """The filtered training activations of one token batch."""
        ids = batch.input_ids.to(self.device)
        mask = batch.train_mask.to(self.device)
        acts = capture(self.model, self.hookpoints, ids, stop_early=True)
        self.stats.forward_passes += 1
        self.stats.tokens += ids.numel()
        self.stats.train_tokens += int(mask.sum())
        out = {}
        for hp in self.hookpoints:
            filt = self.filters[hp.name]
            out[hp.name] = filt(acts[hp][mask].float())
            self.stats.outliers[hp.name] = filt.dropped_outliers
            self.stats.nonfinite[hp.name] = filt.dropped_nonfinite
        return out
