"""Processes, data shards and the collectives of multi-process training (DESIGN.md section 7).

Data order does not depend on the number of processes: the training stream is cut into
`data_shards` virtual shards (shard v reads documents j with j % data_shards == v), each with its
own outlier filters and shuffle buffers, and every global SAE batch is the concatenation, in shard
order, of one batch of batch_size / data_shards tokens per shard. A process hosts the shards
v with v % world_size == rank, so a run may resume on any world size that divides
`data_shards`, and a single process with data_shards = n reproduces an n-process run.

`BatchGroup` is how SAE losses see the whole global batch: its `sum` returns the global sum on
every process with the gradient flowing into the local part only, so a loss written for one
process has the global value everywhere and its local gradients add up to the global gradient.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, Store
from torch.distributed.rendezvous import rendezvous

log = logging.getLogger(__name__)


class BatchGroup:
    """Reductions over the processes that share one global batch (identity in one process)."""

    def __init__(self, distributed: bool = False):
        self.distributed = distributed and dist.is_available() and dist.is_initialized()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Global sum of the per-process tensors t (same shape everywhere); differentiable in
        the local t."""
        if not self.distributed:
            return t
        total = t.detach().clone()
        dist.all_reduce(total)
        return t + (total - t.detach())

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise global maximum (no gradient)."""
        return self._reduce(t, dist.ReduceOp.MAX)

    def min(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise global minimum (no gradient)."""
        return self._reduce(t, dist.ReduceOp.MIN)

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """The per-process 1-d tensors t [n_p] concatenated in rank order (no gradient)."""
        if not self.distributed:
            return t.detach()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([t.numel()]))
        width = int(max(sizes))
        padded = t.detach().new_zeros(width)
        padded[: t.numel()] = t.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(n)] for p, n in zip(parts, sizes)])

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        out = t.detach().clone()
        if self.distributed:
            dist.all_reduce(out, op=op)
        return out


LOCAL = BatchGroup()
"""The single-process group."""


@dataclass(frozen=True)
class Topology:
    """Who does what: this process's rank in `world` processes and the shards it hosts."""

    rank: int
    world: int
    data_shards: int

    def __post_init__(self) -> None:
        if self.data_shards % self.world:
            raise ValueError(
                f"train.data_shards={self.data_shards} must be a multiple of the "
                f"number of processes ({self.world})"
            )

    @property
    def shards(self) -> list[int]:
        """The virtual data shards this process hosts."""
        return list(range(self.rank, self.data_shards, self.world))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(timeout_s: float) -> Topology | None:
    """Join the process group of a multi-process launch (torchrun / accelerate launch set
    WORLD_SIZE) with collectives that fail after `timeout_s` instead of hanging; None when
    this is a single-process run. Returns the topology with data_shards = world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if not dist.is_initialized():
        join_launch_group(timeout_s)
    rank = dist.get_rank()
    log.info("process %d of %d (%s)", rank, dist.get_world_size(), dist.get_backend())
    return Topology(rank, dist.get_world_size(), dist.get_world_size())


_launch_store: Store | None = None
"""The launch's rendezvous store (env://), opened by the first join of this process."""
_joins = 0
"""Process groups this process has joined so far."""


def join_launch_group(timeout_s: float) -> None:
    """Initialise the default process group over the launch's env:// store, under a key prefix
    of its own (the join's ordinal, the same on every process as each runs the same sequence of
    runs). torch names every default group alike, so a group joined again after the previous
    one was destroyed (the next run of a multirun in the same processes) would otherwise read
    the previous group's addresses from the store and fail to connect."""
    global _launch_store, _joins
    timeout = timedelta(seconds=timeout_s)
    if _launch_store is None:
        _launch_store, _, _ = next(rendezvous("env://", timeout=timeout))
    _joins += 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend,
        store=PrefixStore(f"sae_dist/{_joins}", _launch_store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def assign_hookpoints(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Owner rank per hookpoint, balancing the summed `sizes` (e.g. SAE parameter counts):
    largest first, each to the least-loaded rank (ties: lowest rank). Deterministic."""
    load = [0] * world
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return {name: owners[name] for name in sizes}


def all_min(value: int, active: bool) -> int:
    """The minimum of an int over all processes (`active`: a multi-process run)."""
    if not active:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def gather_rows(rows: torch.Tensor, dst: int, world: int) -> list[torch.Tensor] | None:
    """Send rows [n_p, d] of every process to rank `dst`; there: the list of each rank's rows
    (rank order), elsewhere None. Two collectives: the sizes, then the padded rows."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]]))
    width = int(max(sizes))
    padded = rows.new_zeros(width, rows.shape[1])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if parts is None:
        return None
    return [p[: int(n)] for p, n in zip(parts, sizes)]


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value, topology: Topology):
    """The main process's `value` on every process (e.g. an out_dir with a timestamp)."""
    if topology.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_counts(counts: dict[str, dict[str, float]], active: bool) -> dict[str, dict[str, float]]:
    """{group: {key: number}} summed over processes (same keys everywhere)."""
    if not active:
        return counts
    keys = [(g, k) for g in counts for k in counts[g]]
    t = torch.tensor([float(counts[g][k]) for g, k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    out: dict[str, dict[str, float]] = {g: {} for g in counts}
    for (g, k), v in zip(keys, t.tolist()):
        out[g][k] = type(counts[g][k])(v) if isinstance(counts[g][k], int) else v
    return out


def gather_dicts(local: dict, active: bool) -> dict:
    """The union of every process's dict (on every process)."""
    if not active:
        return dict(local)
    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}
