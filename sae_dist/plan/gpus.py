"""The devices a plan runs on: a table of GPU kinds from their spec sheets (memory, dense peak
FLOP/s, memory and interconnect bandwidth, an assumed price), with stated efficiency
assumptions, and `cpu`: this machine, measured on the spot at the plan's own shapes.

Units: bytes, FLOP/s, bytes/s, seconds, USD per device-hour. A "device" is what one process of
a run uses: one GPU, or for `cpu` one process with its share of the cores.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sae_dist.errors import ConfigError

GiB = 2**30

MATMUL_EFFICIENCY = 0.6
"""Share of a GPU's dense peak FLOP/s that large matmuls reach (an assumption, not measured
here: no GPU was at hand)."""
BANDWIDTH_EFFICIENCY = 0.8
"""Share of a GPU's peak memory bandwidth that streaming kernels reach (assumed)."""
GPU_RUNTIME_BYTES = 1.0 * GiB
"""Memory every GPU process holds before the run: CUDA context, cuBLAS workspace, NCCL
buffers (assumed)."""


@dataclass(frozen=True)
class Device:
    """One process's device, as the memory and time models use it."""

    name: str
    memory: float
    """Bytes one process may use (a GPU's memory; `cpu`: the machine's RAM / processes)."""
    matmul_flops: dict[str, float]
    """Achieved FLOP/s of large matmuls per torch dtype name (float32, bfloat16)."""
    bandwidth: float
    """Achieved bytes/s of streaming kernels (read + write counted)."""
    link_bandwidth: float
    """Collective bus bandwidth per device inside a node, bytes/s (ring all-reduce moves
    2 (N-1)/N x its bytes per device at this rate)."""
    node_bandwidth: float
    """The same between nodes (the slowest link of a ring spanning nodes)."""
    latency: float
    """Seconds per collective, whatever its size (launch, synchronisation, small messages)."""
    per_node: int
    """Devices per node."""
    price: float
    """USD per device-hour."""
    runtime: float
    """Bytes a process holds before the run (CUDA context; `cpu`: this process's RSS)."""
    native_bf16: bool
    """bf16 arithmetic in hardware (`trainer.mixed_precision=auto` and `model.dtype=auto`
    resolve to bf16)."""
    lazy_pages: bool = False
    """Memory counts touched pages (RSS), not allocations: a buffer allocated but only partly
    written counts its written part (`cpu`)."""
    cache_bytes: float = 0.0
    """Last-level cache a gather's rows stay in (a GPU's L2): a gather from a table that fits
    reads each row from memory once; 0: every entry reads its row (`cpu`, as measured)."""
    first_touch: float = 0.0
    """Seconds per byte of a freshly allocated tensor's first write beyond the write itself
    (page faults where the allocator maps new pages for it: `cpu`; GPUs' caching allocators
    reuse their memory: 0)."""
    select_rates: dict[int, float] = field(default_factory=dict)
    """topk elements/s per k, measured at the plan's shape (`cpu`); empty: topk is modelled
    as memory-bound (sae_dist.plan.timing.TOPK_READS)."""
    sort_rate: float | None = None
    """Elements/s of a stable argsort of int64 latent ids, measured (`cpu`); None: modelled as
    memory-bound (sae_dist.plan.timing.SORT_BYTES)."""
    spec: str = ""
    """Where the figures come from."""

    @property
    def type(self) -> str:
        """The torch device type the run would use (cuda or cpu)."""
        return "cpu" if self.name == "cpu" else "cuda"

    def flops(self, dtype: torch.dtype) -> float:
        """Achieved matmul FLOP/s in `dtype` (float16 as bfloat16)."""
        name = "float32" if dtype == torch.float32 else "bfloat16"
        return self.matmul_flops[name]

    def collective_bandwidth(self, world: int) -> float:
        """Bus bandwidth of a collective over `world` devices (between nodes beyond one)."""
        return self.link_bandwidth if world <= self.per_node else self.node_bandwidth


@dataclass(frozen=True)
class GpuKind:
    """A GPU's spec-sheet figures (dense, no sparsity), memory as `nvidia-smi` reports it."""

    memory_mib: int
    bf16_tflops: float
    fp32_tflops: float
    """Non-tensor-core fp32 (PyTorch's default for float32 matmuls: TF32 off)."""
    hbm_tbs: float
    link_gbs: float
    """NCCL all-reduce bus bandwidth inside a node (NVLink or PCIe), GB/s (assumed)."""
    node_gbs: float
    """Network per GPU between nodes, GB/s (assumed)."""
    l2_mb: float
    """L2 cache, MB."""
    price: float
    """Assumed on-demand USD per GPU-hour (override: plan.price_per_gpu_hour)."""


GPU_KINDS: dict[str, GpuKind] = {
    "a100-40gb": GpuKind(40536, 312, 19.5, 1.555, 230, 25, 40, 1.29),
    "a100-80gb": GpuKind(81920, 312, 19.5, 2.039, 230, 25, 40, 1.79),
    "h100-80gb": GpuKind(81559, 989, 67, 3.35, 360, 50, 50, 2.99),
    "h200": GpuKind(143771, 989, 67, 4.8, 360, 50, 50, 3.79),
    "l4": GpuKind(23034, 121, 30.3, 0.3, 20, 12.5, 48, 0.80),
    "l40s": GpuKind(46068, 362, 91.6, 0.864, 20, 25, 96, 1.50),
}
"""Spec-sheet figures (SXM parts for A100/H100/H200; L4 and L40S on PCIe without NVLink).
Interconnect bandwidths and prices are assumptions; override the price per run."""

NCCL_LATENCY = 30e-6
"""Seconds per NCCL collective on small tensors, including the host synchronisation that
reads its result (assumed)."""
GPUS_PER_NODE = 8


def gpu_device(name: str) -> Device:
    """The Device of a GPU kind of `GPU_KINDS`, with the efficiency assumptions applied."""
    if name not in GPU_KINDS:
        raise ConfigError("plan.gpu", name, ", ".join([*GPU_KINDS, "cpu"]))
    k = GPU_KINDS[name]
    return Device(
        name=name,
        memory=k.memory_mib * 2**20,
        matmul_flops={
            "bfloat16": k.bf16_tflops * 1e12 * MATMUL_EFFICIENCY,
            "float32": k.fp32_tflops * 1e12 * MATMUL_EFFICIENCY,
        },
        bandwidth=k.hbm_tbs * 1e12 * BANDWIDTH_EFFICIENCY,
        link_bandwidth=k.link_gbs * 1e9,
        node_bandwidth=k.node_gbs * 1e9,
        latency=NCCL_LATENCY,
        per_node=GPUS_PER_NODE,
        price=k.price,
        runtime=GPU_RUNTIME_BYTES,
        native_bf16=True,
        cache_bytes=k.l2_mb * 2**20,
        spec=(
            f"spec sheet: {k.memory_mib} MiB, {k.bf16_tflops:g} TFLOP/s bf16, "
            f"{k.fp32_tflops:g} TFLOP/s fp32, {k.hbm_tbs:g} TB/s; assumed: "
            f"{MATMUL_EFFICIENCY:g} of peak FLOP/s, {BANDWIDTH_EFFICIENCY:g} of peak bandwidth, "
            f"{k.link_gbs:g} GB/s in a node, {k.node_gbs:g} GB/s between nodes, "
            f"${k.price:g}/h"
        ),
    )


# --- this machine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuShapes:
    """The kernels a plan needs measured on a CPU: the SAE encoder matmul [rows, d_in] @
    [d_in, d_sae], topk over [rows, d_sae] for each k used, the stable argsort of rows x k
    latent ids, and the first touch of fresh memory."""

    rows: int
    d_in: int
    d_sae: int
    ks: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)


MEASURE_ELEMENTS = 2**23
"""The measured matmul's output and topk's input have at most this many elements (rows are cut
to fit): at the step's own shape where that is small, as a CPU's rates fall once the
operands leave its caches."""
LOOPBACK_LATENCY = 2e-4
"""Seconds per gloo collective between processes of one machine, when no process group is
at hand to measure it (assumed)."""
DEEPSPEED_CPU_RUNTIME = 43 * 2**20
"""Bytes a DeepSpeed engine holds on CPU whatever the SAEs' size (its CPU communication and
runtime buffers): measured on the 2-core test machine as a ZeRO-2 step's resident memory minus a
DDP step's, both on a 0.1 MB SAE (2 processes)."""
DEEPSPEED_CPU_STEP = 28e-9
"""CPU seconds per SAE parameter that a DeepSpeed ZeRO-2 step adds on CPU beyond its counted
copies and collectives (its gradient hooks, bucket and partition bookkeeping): measured on the
2-core test machine as a ZeRO-2 step (2 processes, 3 SAEs of 192 x 3072, 2048 rows each) minus
one process stepping the same SAEs on as many rows, 0.10 s for 3.54M parameters."""
LOOPBACK_BANDWIDTH = 1e9
"""Bytes/s of a gloo all-reduce between processes of one machine, unmeasured (assumed)."""


Clock = Callable[[], float]
"""A clock in seconds: time.perf_counter (wall time, the default) or time.process_time (this
process's CPU time: what other jobs on a shared machine do not change)."""


def median_seconds(
    fn: Callable[[], object], repeats: int = 5, clock: Clock = time.perf_counter
) -> float:
    """Median time of `fn()` on `clock` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def measure_matmul(
    rows: int, d_in: int, d_sae: int, dtype: torch.dtype, clock: Clock = time.perf_counter
) -> float:
    """FLOP/s of the SAE encoder's kernel as the step calls it: addmm(bias [d_sae], x [rows,
    d_in], w [d_in, d_sae]) in `dtype`, into a fresh output (on a CPU the bias is broadcast
    into it first and its pages are touched for the first time: both counted here)."""
    x = torch.randn(rows, d_in).to(dtype)
    w = torch.randn(d_in, d_sae).to(dtype)
    bias = torch.randn(d_sae).to(dtype)
    return 2 * rows * d_in * d_sae / median_seconds(lambda: torch.addmm(bias, x, w), clock=clock)


def measure_select(rows: int, d_sae: int, k: int, clock: Clock = time.perf_counter) -> float:
    """Elements/s of `topk(k, dim=1, sorted=False)` over a float32 [rows, d_sae]."""
    pre = torch.randn(rows, d_sae)
    return (
        rows
        * d_sae
        / median_seconds(lambda: pre.topk(min(k, d_sae), dim=1, sorted=False), clock=clock)
    )


def measure_sort(entries: int, d_sae: int, clock: Clock = time.perf_counter) -> float:
    """Elements/s of a stable argsort of `entries` int64 latent ids below `d_sae` (the sparse
    kernels' ordering of their (token, latent) entries)."""
    ids = torch.randint(0, d_sae, (max(1, entries),))
    return ids.numel() / median_seconds(lambda: torch.argsort(ids, stable=True), clock=clock)


def measure_bandwidth(mib: int = 32, clock: Clock = time.perf_counter) -> float:
    """Bytes/s of a float32 copy of `mib` MiB (read + write counted)."""
    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), clock=clock)


def measure_first_touch(nbytes: int, clock: Clock = time.perf_counter) -> float:
    """Seconds per byte that a fresh `nbytes` tensor's first write costs beyond rewriting an
    existing one (page faults when the allocator maps new pages; ~0 when it reuses freed
    memory). Measured on zero-filled float32 tensors."""
    n = max(1, nbytes // 4)
    existing = torch.empty(n)
    fresh = median_seconds(lambda: torch.zeros(n), repeats=9, clock=clock)
    reused = median_seconds(lambda: existing.zero_(), repeats=9, clock=clock)
    return max(0.0, fresh - reused) / (4 * n)


def measure_link(clock: Clock = time.perf_counter) -> tuple[float, float] | None:
    """(seconds per small all-reduce, all-reduce bus bandwidth in bytes/s) over the default
    process group, or None when there is none. A collective: call it on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    small = torch.zeros(1)
    latency = median_seconds(lambda: dist.all_reduce(small), repeats=21, clock=clock)
    big = torch.zeros(4 * 2**20)  # 16 MiB
    seconds = median_seconds(lambda: dist.all_reduce(big), repeats=3, clock=clock)
    return latency, 2 * (world - 1) / world * big.numel() * 4 / max(seconds - latency, 1e-9)


def process_rss() -> float:
    """This process's resident memory now, bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0.0


def cpu_native_bf16() -> bool:
    """bf16 in hardware on this CPU (AVX512-BF16 or AMX), as sae_dist.models.resolve_dtype."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_device(
    shapes: CpuShapes, processes: int, threads: int | None = None, clock: Clock = time.perf_counter
) -> Device:
    """This machine as `processes` devices, each a process with `threads` torch threads (None:
    the cores divided among the processes), measured now in this process: matmul FLOP/s and
    topk rates at the plan's shapes (rows cut to MEASURE_ELEMENTS), argsort, copy bandwidth,
    the first touch of fresh memory (under the allocator settings of this process), and when a
    process group is initialised its all-reduce latency and bandwidth (else assumed loopback
    figures). Memory: the machine's RAM divided among the processes; `runtime`: this process's
    RSS before the measurement. Times are read on `clock`."""
    runtime = process_rss()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // processes))
    try:
        rows = max(1, min(shapes.rows, MEASURE_ELEMENTS // shapes.d_sae))
        flops = {
            str(dtype).removeprefix("torch."): measure_matmul(
                rows, shapes.d_in, shapes.d_sae, dtype, clock
            )
            for dtype in shapes.dtypes
        }
        ks = sorted(set(shapes.ks))
        selects = {k: measure_select(rows, shapes.d_sae, k, clock) for k in ks}
        sort = measure_sort(rows * max(shapes.ks, default=32), shapes.d_sae, clock)
        bandwidth = measure_bandwidth(clock=clock)
        touch_bytes = min(64 * 2**20, max(8 * 2**20, 4 * shapes.d_in * shapes.d_sae))
        touch = measure_first_touch(touch_bytes, clock)
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    link = measure_link(clock)
    latency, link_bw = link or (LOOPBACK_LATENCY, LOOPBACK_BANDWIDTH)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rates = ", ".join(f"{n} {v / 1e9:.1f} GFLOP/s" for n, v in flops.items())
    return Device(
        name="cpu",
        memory=ram / processes,
        matmul_flops=flops,
        bandwidth=bandwidth,
        link_bandwidth=link_bw,
        node_bandwidth=link_bw,
        latency=latency,
        per_node=processes,
        price=0.0,
        runtime=runtime,
        native_bf16=cpu_native_bf16(),
        lazy_pages=True,
        first_touch=touch,
        select_rates=selects,
        sort_rate=sort,
        spec=(
            f"measured now, {threads_used} thread(s) per process: matmul {rates} at "
            f"[{rows}, {shapes.d_in}] x [{shapes.d_in}, {shapes.d_sae}], topk "
            + ", ".join(f"k={k} {v / 1e6:.0f} M elements/s" for k, v in selects.items())
            + f", argsort {sort / 1e6:.0f} M elements/s, copy {bandwidth / 1e9:.1f} GB/s, "
            + "first touch of fresh memory "
            + (f"{1 / touch / 1e9:.2f} GB/s" if touch else "free")
            + ", collectives "
            + (
                f"{latency * 1e6:.0f} us + {link_bw / 1e9:.2f} GB/s (measured)"
                if link
                else f"{latency * 1e6:.0f} us + {link_bw / 1e9:.2f} GB/s (assumed loopback)"
            )
        ),
    )
