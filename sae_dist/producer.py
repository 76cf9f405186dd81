"""The activation producer: LM forward passes with capture hooks at every requested hookpoint,
stopped after the last layer needed; per data shard and hookpoint the activations at the
positions the token policy keeps (sae_dist.policy) go into an in-memory shuffle buffer that
hands out training batches. Nothing touches disk."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sae_dist.data import SequencePool, TokenBatch, TokenStream
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.policy import PositionFilter

log = logging.getLogger(__name__)


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
        return {
            "data": torch.cat(self.chunks) if self.chunks else torch.empty(0),
            "ready": list(self.ready),
            "generator": self.generator.get_state(),
        }

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
    """Tokens in the policy's position set (the train mask, before outliers are left out)."""


class ActivationProducer:
    """One LM forward pass per step feeds every hookpoint of every data shard this process
    hosts: each shard's token stream gives `seqs_per_shard` rows, the rows of all shards go
    through the model together, and each shard keeps the positions its own `PositionFilter`
    keeps (the token policy: a position that is an outlier at any hookpoint is left out at all
    of them), so every SAE trains on the same tokens and the lockstep trainer's buffers stay the
    same size. Yields float32 activations on `device`."""

    def __init__(
        self,
        model: nn.Module,
        hookpoints: list[Hookpoint],
        outlier_factor: float | None,
        device: torch.device,
        streams: dict[int, SequencePool | TokenStream],
        seqs_per_shard: int,
    ):
        self.model, self.hookpoints, self.device = model, hookpoints, device
        self.streams, self.seqs_per_shard = streams, seqs_per_shard
        self.filters = {
            v: PositionFilter([hp.name for hp in hookpoints], outlier_factor) for v in streams
        }
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
            keep = self.filters[v].keep(shard)
            out[v] = {name: x[keep] for name, x in shard.items()}
        return out

    def dropped(self) -> dict[str, dict[str, int]]:
        """{"outliers" | "nonfinite": {hookpoint name: tokens dropped on this process}}."""
        return {
            kind: {
                hp.name: sum(f.dropped(kind)[hp.name] for f in self.filters.values())
                for hp in self.hookpoints
            }
            for kind in ("outliers", "nonfinite")
        }

    def state_dict(self, shard: int) -> dict:
        """One hosted shard's position: its stream and filters."""
        return {
            "stream": self.streams[shard].state_dict(),
            "filters": self.filters[shard].state_dict(),
        }

    def load_state_dict(self, shard: int, state: dict) -> None:
        self.streams[shard].load_state_dict(state["stream"])
        self._batches.pop(shard, None)
        self.filters[shard].load_state_dict(state["filters"])
