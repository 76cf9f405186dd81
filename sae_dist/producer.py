"""The activation producer: LM forward passes with capture hooks at every requested hookpoint,
stopped after the last layer needed; per data shard and hookpoint the masked, outlier-filtered
activations go into an in-memory shuffle buffer that hands out training batches. Nothing
touches disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from sae_dist.data import TokenBatch, TokenStream
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
        return acts[self.keep(acts)]

    def keep(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [n, d] -> bool [n] (on acts' device): finite and not an outlier. Counts the
        rows it rejects; the running median follows the rows it keeps."""
        finite = torch.isfinite(acts).all(dim=1)
        self.dropped_nonfinite += int((~finite).sum())
        norms = acts.norm(dim=1).float().cpu()
        valid = norms[finite.cpu()]
        if not valid.numel():
            return finite
        reference = torch.cat([self.history, valid]).median()
        keep = finite.cpu() & (norms <= self.max_multiple * reference)
        self.dropped_outliers += int((finite.cpu() & ~keep).sum())
        self.history = torch.cat([self.history, norms[keep]])[-self.window:]
        return keep.to(acts.device)

    def state_dict(self) -> dict:
        return {"history": self.history, "dropped_outliers": self.dropped_outliers,
                "dropped_nonfinite": self.dropped_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"]
        self.dropped_outliers = state["dropped_outliers"]
        self.dropped_nonfinite = state["dropped_nonfinite"]


class ShuffleBuffer:
    """Token buffer of `capacity` rows: once full it is shuffled and its rows beyond half the
    capacity become `batch_size` batches ready to `pop`, so consecutive (correlated) tokens are
    spread over many batches."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator):
        if capacity < 2 * batch_size:
            raise ValueError(f"shuffle buffer capacity {capacity} < 2 x batch {batch_size}")
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self.chunks: list[torch.Tensor] = []
        self.size = 0
        self.ready: list[torch.Tensor] = []

    def push(self, acts: torch.Tensor) -> None:
        """Add rows [n, d]; when the buffer is full, shuffle it and make batches ready."""
        self.chunks.append(acts)
        self.size += acts.shape[0]
        if self.size < self.capacity:
            return
        data = torch.cat(self.chunks)
        perm = torch.randperm(data.shape[0], generator=self.generator).to(data.device)
        data = data[perm]
        n_out = (data.shape[0] - self.capacity // 2) // self.batch_size * self.batch_size
        self.chunks, self.size = [data[n_out:]], data.shape[0] - n_out
        self.ready += data[:n_out].split(self.batch_size)

    def available(self) -> int:
        """Number of batches ready."""
        return len(self.ready)

    def pop(self) -> torch.Tensor:
        """The oldest ready batch [batch_size, d]."""
        return self.ready.pop(0)

    def state_dict(self) -> dict:
        return {"data": torch.cat(self.chunks) if self.chunks else torch.empty(0),
                "ready": list(self.ready), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.chunks = [state["data"]] if state["data"].numel() else []
        self.size = state["data"].shape[0] if state["data"].numel() else 0
        self.ready = list(state["ready"])
        self.generator.set_state(state["generator"])


@dataclass
class ProducerStats:
    forward_passes: int = 0
    tokens: int = 0
    """Tokens through the LM (all positions)."""
    train_tokens: int = 0
    """Tokens passing the train mask (before outlier filtering)."""


class ActivationProducer:
    """One LM forward pass per step feeds every hookpoint of every data shard this process
    hosts: each shard's token stream gives `seqs_per_shard` rows, the rows of all shards go
    through the model together, and each shard filters its own rows (`OutlierFilter` per shard
    and hookpoint). A token rejected at any hookpoint is dropped at all of them, so every SAE
    trains on the same tokens and the lockstep trainer's buffers stay the same size. Yields
    float32 activations on `device`."""

    def __init__(self, model: nn.Module, hookpoints: list[Hookpoint], max_norm_multiple: float,
                 device: torch.device, streams: dict[int, TokenStream], seqs_per_shard: int):
        self.model, self.hookpoints, self.device = model, hookpoints, device
        self.streams, self.seqs_per_shard = streams, seqs_per_shard
        self.filters = {v: {hp.name: OutlierFilter(max_norm_multiple) for hp in hookpoints}
                        for v in streams}
        self.stats = ProducerStats()
        self._batches: dict[int, Iterator[TokenBatch]] = {}

    def next_batches(self) -> dict[int, TokenBatch] | None:
        """The next token batch of every hosted shard; None once any shard's stream ran out."""
        out = {}
        for v, stream in self.streams.items():
            if v not in self._batches:
                self._batches[v] = stream.batches(self.seqs_per_shard)
            batch = next(self._batches[v], None)
            if batch is None:
                return None
            out[v] = batch
        return out

    def activations(self, batches: dict[int, TokenBatch]) -> dict[int, dict[str, torch.Tensor]]:
        """{shard: {hookpoint name: filtered activations [n_kept, d_model]}} of one step."""
        ids = torch.cat([b.input_ids for b in batches.values()]).to(self.device)
        mask = torch.cat([b.train_mask for b in batches.values()]).to(self.device)
        acts = capture(self.model, self.hookpoints, ids, stop_early=True)
        self.stats.forward_passes += 1
        self.stats.tokens += ids.numel()
        self.stats.train_tokens += int(mask.sum())
        rows = [b.input_ids.shape[0] for b in batches.values()]
        splits = {hp.name: acts[hp].split(rows) for hp in self.hookpoints}
        out = {}
        for i, (v, m) in enumerate(zip(batches, mask.split(rows))):
            shard = {name: parts[i][m].float() for name, parts in splits.items()}
            joint = torch.stack([self.filters[v][n].keep(x) for n, x in shard.items()]).all(0)
            out[v] = {name: x[joint] for name, x in shard.items()}
        return out

    def dropped(self) -> dict[str, dict[str, int]]:
        """{"outliers" | "nonfinite": {hookpoint name: tokens dropped on this process}}."""
        return {kind: {hp.name: sum(getattr(f[hp.name], f"dropped_{kind}")
                                    for f in self.filters.values()) for hp in self.hookpoints}
                for kind in ("outliers", "nonfinite")}

    def state_dict(self, shard: int) -> dict:
        """One hosted shard's position: its stream and filters."""
        return {"stream": self.streams[shard].state_dict(),
                "filters": {n: f.state_dict() for n, f in self.filters[shard].items()}}

    def load_state_dict(self, shard: int, state: dict) -> None:
        self.streams[shard].load_state_dict(state["stream"])
        self._batches.pop(shard, None)
        for name, f in self.filters[shard].items():
            f.load_state_dict(state["filters"][name])
