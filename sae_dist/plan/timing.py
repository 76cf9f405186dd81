"""Time of one training step (one global batch of `train.batch_size` tokens for every SAE) on
the busiest process, its throughput, wall-clock and cost (DESIGN.md section 12).

A step is the sum, without overlap, of: the LM forward passes of this process's share of the
step's tokens, the producer's row copies, the lockstep SAE step of its SAEs, and the
trainer's communication. Each kernel takes the longer of its FLOPs at the device's matmul
rate and its bytes at the device's bandwidth (a roofline); topk takes its measured rate on
`cpu`, and on a GPU `TOPK_READS` reads of its input. Communication is a ring-collective volume
at the device's collective bandwidth plus a latency per collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sae_dist.config import TrainerConfig, TrainerKind
from sae_dist.plan.gpus import DEEPSPEED_CPU_STEP, Device
from sae_dist.plan.workload import SAEShape, Share, Workload, zero_settings

TOPK_READS = {4: 5, 2: 3}
"""Reads of its input per topk on a GPU, by element bytes: a radix select over 8-bit digits
(PyTorch's multi-block topk) plus the final gather (an assumption, not measured)."""
ROW_PASSES = 22
"""float32 [B, d_in] passes of one SAE step besides the kernels below: the batch concatenated
and scaled, x - b_dec, the FVU and its variance, + b_dec, and their backward."""
ROW_ALLOCS = 12
"""Fresh float32 [B, d_in] tensors among them (the concatenation, the scaled batch, x - b_dec
twice, the decoder's output and x_hat, the FVU's difference and square, the centred batch and
its square, the gradients of x_hat and of the difference)."""
ENTRY_PASS_BYTES = 60
"""Bytes moved per (token, latent) entry to build the sparse lists (gather, clone, ReLU,
row ids, offsets)."""
SORT_BYTES = 64
"""Bytes a GPU radix sort moves per int64 entry (four passes over keys and values; assumed)."""
CSR_BYTES = 40
"""Bytes per entry of scatter_outer's CSR construction besides its sort (counts, gathers)."""
PROJECTION_BYTES = 24
"""Bytes per decoder element of `parallel_free`: the row dot products of grad and W_dec (8), the
row norms of W_dec (4), the fused multiply-add (read grad and W_dec, write: 12)."""
PROJECTION_ALLOCS = 1
"""Fresh [d_sae, d_in] float32 tensors of `parallel_free`: its result."""
PARAM_STEP_BYTES = 40
"""Bytes per parameter of clipping (norm, scale: 12) and fused Adam (read p, g, m, v, write
p, m, v: 28)."""
PRODUCER_ROW_BYTES = 16
"""float32 bytes per activation element of the producer besides the read capture: the masked
float32 copy and the outlier filter's kept copy (write + read); half of them fresh."""
BUFFER_ROW_BYTES = 24
"""float32 bytes per buffered element: the shuffle's concatenation and permutation, and the
step's concatenation of the shard batches (read + write each); half of them fresh."""
TRAINER_COPY_BYTES = {TrainerKind.ddp: 24, TrainerKind.zero2: 44}
"""Bytes per SAE parameter the trainer moves per step besides the collectives: DDP copies every
gradient into its bucket and back (16) and divides it by the process count (8); ZeRO-2 copies
it into its reduce bucket (8) and divides the bucket (8), copies and flattens its partition
(torch.cat), checks it for inf / nan, takes its norm and clips it, gathers the updated
parameters into the module, and zero-fills and copies one more decoder-sized tensor per SAE
(counted in a torch profile of a ZeRO-2 step on CPU)."""
TRAINER_COPY_ALLOCS = {TrainerKind.ddp: 0, TrainerKind.zero2: 10}
"""Bytes per SAE parameter of fresh buffers per step: ZeRO-2's reduce bucket (allocated at every
backward: 4), its partition and flattened copy, and the extra decoder-sized fill."""
SMALL_COLLECTIVES = {"topk": 7, "batchtopk": 14, "jumprelu": 10, "relu": 12}
"""Global-batch reductions (`BatchGroup`) per SAE and step under data parallelism, counted in
sae_dist/sae/ and SuiteTrainer: the FVU's numerator and variance (4), fire counts, token count
and L0 (3), plus each architecture's own."""
AUXK_COLLECTIVES = 4
"""AuxK's reductions (its error and the residual's variance)."""
LOOP_COLLECTIVES = 3
"""Per forward batch of a multi-process run: the data check, ready steps, all done."""
DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's gradient bucket (bucket_cap_mb, accelerate's default)."""


@dataclass(frozen=True)
class Kernel:
    """One kernel (or a group of similar passes) of the step."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    alloc: float = 0.0
    """Bytes of the fresh tensors it writes (paid again at first touch where the allocator maps
    new pages: `Device.first_touch`)."""
    select: float = 0.0
    """Elements a topk scans (for its k)."""
    k: int = 0
    sort: float = 0.0
    """Elements stably argsorted."""
    dtype: torch.dtype = torch.float32
    """The matmul dtype of its FLOPs."""

    def seconds(self, device: Device, pre_bytes: int) -> float:
        compute = self.flops / device.flops(self.dtype) if self.flops else 0.0
        memory = self.bytes / device.bandwidth
        touch = self.alloc * device.first_touch
        select = _select_seconds(self.select, self.k, device, pre_bytes)
        return max(compute, memory) + touch + select + _sort_seconds(self.sort, device)

    def bound(self, device: Device) -> str:
        compute = self.flops / device.flops(self.dtype) if self.flops else 0.0
        return "compute" if compute > self.bytes / device.bandwidth else "memory"


def _select_seconds(elements: float, k: int, device: Device, pre_bytes: int) -> float:
    if not elements:
        return 0.0
    if device.select_rates:
        return elements / device.select_rates[k]
    return elements * pre_bytes * TOPK_READS[pre_bytes] / device.bandwidth


def _sort_seconds(elements: float, device: Device) -> float:
    if not elements:
        return 0.0
    if device.sort_rate:
        return elements / device.sort_rate
    return elements * SORT_BYTES / device.bandwidth


def select_ks(sae: SAEShape) -> tuple[int, ...]:
    """The k of every topk the step runs (AuxK's k_aux included)."""
    ks = []
    if sae.selects:
        ks.append(sae.entries * (4 if sae.architecture == "batchtopk" else 1))
    if sae.aux_entries:
        ks.append(sae.aux_entries)
    return tuple(ks)


def sae_kernels(sae: SAEShape, b: int, bf16: bool, device: Device) -> list[Kernel]:
    """One SAE's training step on b rows, kernel by kernel (sparse path, sae_dist/sae/)."""
    d, n = sae.d_in, sae.d_sae
    e = 2 if bf16 else 4
    mm = torch.bfloat16 if bf16 else torch.float32
    # addmm with the bias (GPUs fuse it; a CPU's measured rate includes it and the output's
    # first touch)
    kernels = [Kernel("encoder matmul", 2 * b * d * n, e * (b * d + d * n + b * n), dtype=mm)]
    if bf16:
        kernels.append(
            Kernel("autocast casts", bytes=6 * (d * n + b * d), alloc=2 * (d * n + b * d))
        )
    kernels.append(Kernel("row passes", bytes=ROW_PASSES * 4 * b * d, alloc=ROW_ALLOCS * 4 * b * d))
    if sae.selects:
        kernels += _sparse(sae, b, sae.entries, e, "", device, n)
    elif sae.architecture == "jumprelu":
        kernels.append(Kernel("threshold compare", bytes=3 * e * b * n, alloc=e * b * n))
        kernels += _sparse(sae, b, sae.entries, e, "", device, n, select=False)
    else:  # relu: dense latents, decoder and both gradients as matmuls
        kernels += [
            Kernel("dense latents", bytes=6 * e * b * n, alloc=3 * e * b * n),
            Kernel("decoder matmul", 2 * b * n * d, 4 * (b * n + n * d + b * d), 4 * b * d),
            Kernel("gradient matmuls", 4 * b * n * d, 8 * (b * n + n * d + b * d), 8 * n * d),
        ]
    kernels += [
        Kernel(
            "gradient projection",
            bytes=PROJECTION_BYTES * n * d,
            alloc=PROJECTION_ALLOCS * 4 * n * d,
        ),
        Kernel("clip + Adam + renormalise", bytes=PARAM_STEP_BYTES * sae.params + 12 * n * d),
    ]
    if sae.aux_entries:
        m = sae.dead
        aux = [
            Kernel("AuxK gathers", bytes=2 * e * b * m + 16 * m * d, alloc=e * b * m + 8 * m * d),
            Kernel("AuxK rows", bytes=32 * b * d, alloc=24 * b * d),
            *_sparse(sae, b, sae.aux_entries, e, "AuxK ", device, m),
            # the sub-dictionary's gradients scattered into zero-filled full-size tensors and
            # added to the main path's (W_enc, W_dec)
            Kernel("AuxK gradient scatter", bytes=2 * (4 + 12) * n * d, alloc=8 * n * d),
        ]
        kernels += [_scaled(k, sae.auxk_share) for k in aux]
    return kernels


def _sparse(
    sae: SAEShape,
    b: int,
    entries: int,
    pre_bytes: int,
    prefix: str,
    device: Device,
    pool: int,
    select: bool = True,
) -> list[Kernel]:
    """The sparse kernels of one list of `entries` latents per token, drawn from a dictionary of
    `pool` latents (the SAE's, or AuxK's sub-dictionary of dead ones): topk, the lists, the
    embedding_bag decoder (a gather of decoder rows) and its two gradients (values: decoder rows
    and gradient rows read per entry by a sampled matmul; decoder: scatter_outer of the gradient
    rows into a fresh CSR product), the encoder gradient (scatter_outer of the token rows,
    transposed into the gradient's layout); each scatter_outer sorts the entries once."""
    d, n = sae.d_in, pool
    k = entries * (4 if sae.architecture == "batchtopk" and not prefix else 1)
    out = []
    if select:
        out.append(Kernel(f"{prefix}topk", select=b * n, k=k))
        if sae.architecture == "batchtopk" and not prefix:
            out.append(
                Kernel("batch threshold", bytes=3 * pre_bytes * b * n, alloc=pre_bytes * b * n)
            )
    bkd = b * entries * d
    latent_rows = gather_bytes(b * entries, pool, 4 * d, device)
    token_rows = gather_bytes(b * entries, b, 4 * d, device)
    out += [
        Kernel(f"{prefix}latent lists", bytes=ENTRY_PASS_BYTES * b * entries),
        Kernel(f"{prefix}decoder", 2 * bkd, latent_rows + 4 * b * d),
        Kernel(
            f"{prefix}decoder gradient",
            4 * bkd,
            latent_rows + 2 * token_rows + CSR_BYTES * b * entries + 4 * n * d,
            4 * n * d,
            sort=b * entries,
        ),
        Kernel(
            f"{prefix}encoder gradient",
            2 * bkd,
            token_rows + CSR_BYTES * b * entries + 12 * n * d,
            8 * n * d,
            sort=b * entries,
        ),
    ]
    return out


def gather_bytes(entries: int, rows: int, row_bytes: int, device: Device) -> float:
    """Memory traffic of `entries` row reads from a table of `rows` rows: every entry reads its
    row, unless the table fits the device's cache (then each row is read once)."""
    if rows * row_bytes <= device.cache_bytes:
        return min(entries, rows) * row_bytes
    return entries * row_bytes


def _scaled(k: Kernel, share: float) -> Kernel:
    """A kernel run in `share` of the steps, as its mean per step."""
    return Kernel(
        k.name,
        k.flops * share,
        k.bytes * share,
        k.alloc * share,
        k.select * share,
        k.k,
        k.sort * share,
        k.dtype,
    )


@dataclass(frozen=True)
class Comm:
    """Communication per step: bytes this process sends and collectives it joins."""

    bytes: float = 0.0
    collectives: float = 0.0

    def seconds(self, device: Device, world: int) -> float:
        return self.bytes / device.collective_bandwidth(world) + self.collectives * device.latency


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step on the busiest process, by part."""

    parts: dict[str, float]
    """lm_forward, producer, sae_step (the SAEs' kernels), sae_comm (the trainer's gradient and
    batch-statistics collectives, inside `SuiteTrainer.step`), data_comm (rows to their owners
    under hookpoint sharding, the loop's checks)."""
    kernels: dict[str, float] = field(default_factory=dict)
    """The SAE step's kernels (all of the process's SAEs), seconds."""
    bounds: dict[str, str] = field(default_factory=dict)
    """compute or memory, for the LM forward and the encoder matmul."""
    comm: dict[str, Comm] = field(default_factory=dict)
    """sae_comm and data_comm: bytes sent and collectives per step."""

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    @property
    def trainer_step(self) -> float:
        """Seconds of `SuiteTrainer.step`: the SAEs' kernels and the trainer's collectives."""
        return self.parts["sae_step"] + self.parts["sae_comm"]


def step_time(w: Workload, s: Share, trainer: TrainerConfig, device: Device) -> StepTime:
    """One step of the busiest process under `trainer` with share `s` on `device`."""
    t, lm = w.cfg.train, w.lm
    context = w.cfg.data.context_size
    forwards = t.batch_size / (w.mask_fraction * t.forward_batch_seqs * context)
    lm_kernel = _lm_kernel(w, s.forward_seqs * context)
    pre_bytes = 2 if w.sae_bf16 else 4
    kernels = sae_kernels(w.sae, s.stepped_batch, w.sae_bf16, device)
    per_kernel = {k.name: s.owned * k.seconds(device, pre_bytes) for k in kernels}
    if trainer.kind in TRAINER_COPY_BYTES and s.world > 1:
        copies = Kernel(
            "trainer copies",
            bytes=TRAINER_COPY_BYTES[trainer.kind] * w.sae_params,
            alloc=min(TRAINER_COPY_ALLOCS[trainer.kind] * w.sae_params, _bucket_bytes(trainer)),
        )
        per_kernel[copies.name] = copies.seconds(device, pre_bytes)
    if trainer.kind.zero_stage and device.type == "cpu":
        per_kernel["deepspeed on cpu"] = DEEPSPEED_CPU_STEP * w.sae_params
    local_rows = t.batch_size / s.world  # rows this process's producer keeps per step
    buffered = s.owned * s.stepped_batch * w.sae.d_in
    element = w.n_saes * local_rows * w.sae.d_in
    producer = Kernel(
        "producer",
        bytes=element * (lm.dtype_bytes + PRODUCER_ROW_BYTES) + buffered * BUFFER_ROW_BYTES,
        alloc=(element * PRODUCER_ROW_BYTES + buffered * BUFFER_ROW_BYTES) / 2,
    ).seconds(device, pre_bytes)
    comm = _communication(w, s, trainer, forwards)
    return StepTime(
        parts={
            "lm_forward": forwards * lm_kernel.seconds(device, pre_bytes),
            "producer": producer,
            "sae_step": sum(per_kernel.values()),
            **{name: c.seconds(device, s.world) for name, c in comm.items()},
        },
        kernels=per_kernel,
        bounds={"lm_forward": lm_kernel.bound(device), "sae_encoder": kernels[0].bound(device)},
        comm=comm,
    )


def lm_flops_per_token(w: Workload) -> float:
    """LM forward FLOPs per token: 2 x the parameters of the layers run (embedding lookups
    aside), plus causal attention (QK^T and AV over half the context on average)."""
    lm = w.lm
    attention = 2 * lm.n_heads * lm.head_dim * w.cfg.data.context_size * lm.layers_run
    return 2 * lm.layer_params + attention


def sae_flops_per_token(w: Workload) -> float:
    """SAE step FLOPs per training token, summed over the run's SAEs: the dense encoder matmul
    plus the sparse decoder and gradients (AuxK at its share of the steps)."""
    sae = w.sae
    per = 2 * sae.d_in * sae.d_sae
    if sae.selects or sae.architecture == "jumprelu":
        per += 6 * sae.d_in * (sae.entries + sae.aux_entries * sae.auxk_share)
    else:
        per += 6 * sae.d_in * sae.d_sae
    return w.n_saes * per


def _lm_kernel(w: Workload, tokens: int) -> Kernel:
    """One LM forward of `tokens` tokens: its FLOPs, the weights of the layers run read once,
    and each layer's activation passes."""
    lm = w.lm
    e = lm.dtype_bytes
    passes = 24 * lm.d_model + 6 * lm.d_ff  # norms, rope, residuals, SiLU x up (read + write)
    activations = e * tokens * lm.layers_run * passes
    return Kernel(
        "lm forward",
        flops=lm_flops_per_token(w) * tokens,
        bytes=e * lm.layer_params + activations,
        alloc=activations / 2,
        dtype=lm.dtype,
    )


def _communication(
    w: Workload, s: Share, trainer: TrainerConfig, forwards: float
) -> dict[str, Comm]:
    """{"sae_comm": the trainer's collectives inside the step, "data_comm": the loop's} per
    step under `trainer` (`forwards`: LM forward batches per step)."""
    world = s.world
    if world == 1:
        return {"sae_comm": Comm(), "data_comm": Comm()}
    ring = (world - 1) / world
    sae = w.sae
    loop = Comm(0.0, LOOP_COLLECTIVES * forwards)
    kind = trainer.kind
    if kind == TrainerKind.sharded:
        # per forward and hookpoint: the row counts, then the rows to the hookpoint's owner
        rows = s.push_rows * sae.d_in * 4
        sent = w.n_saes * ring * rows
        received = s.owned * (world - 1) * rows
        gather = Comm(forwards * max(sent, received), forwards * 2 * w.n_saes)
        return {
            "sae_comm": Comm(),
            "data_comm": Comm(gather.bytes, gather.collectives + loop.collectives),
        }
    params = w.sae_params
    small = w.n_saes * (SMALL_COLLECTIVES[sae.architecture] + AUXK_COLLECTIVES * sae.auxk_share)
    if kind == TrainerKind.ddp:
        grads = params * 4
        step = Comm(2 * ring * grads, math.ceil(grads / DDP_BUCKET_BYTES) + small)
        return {"sae_comm": step, "data_comm": loop}
    zero = zero_settings(trainer)
    e = 2 if w.sae_bf16 else 4
    if kind.zero_stage == 2:
        # gradients reduced to their partition owners, updated parameters gathered back, the
        # gradient norm
        buckets = math.ceil(params / zero.reduce_bucket) + math.ceil(params / zero.allgather_bucket)
        return {"sae_comm": Comm(ring * params * (4 + e), buckets + small + 2), "data_comm": loop}
    # ZeRO-3: parameters gathered for the forward and again for the backward, gradients
    # reduce-scattered; after each step every decoder's master copy is gathered, edited and
    # partitioned again (SuiteTrainer._on_masters)
    decoder = sae.d_in * sae.d_sae
    volume = ring * (params * 3 * e + w.n_saes * decoder * (4 + 2 * e))
    return {"sae_comm": Comm(volume, w.n_saes * 7 + small + 2), "data_comm": loop}


def _bucket_bytes(trainer: TrainerConfig) -> float:
    """ZeRO's reduce bucket in float32 bytes (unbounded without ZeRO)."""
    return 4 * zero_settings(trainer).reduce_bucket if trainer.kind.zero_stage else float("inf")
