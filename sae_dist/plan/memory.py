"""Memory of the busiest process of a run, by component and by phase of the training loop
(DESIGN.md section 12). All figures are bytes on the process's device.

One iteration of the loop (sae_dist/train/loop.py) goes through these phases, and the peak is
the largest of their totals:

- `lm_forward`: the LM forward of this process's rows, the hook captures filling up;
- `producer`: the captures, their masked float32 copies and the outlier filter's kept copies
  (`ActivationProducer.activations`);
- `shuffle`: the rows pushed into the shuffle buffers, one buffer shuffling (a concatenation
  and a permuted copy), under hookpoint sharding the rows gathered on their owner;
- `sae_forward`, `sae_backward`: every SAE of the process stepping in lockstep: the forward
  graphs of all of them are alive when the one backward starts; the backward turns them into
  gradients, SAE by SAE; then the optimizer step.

What persists through all of them: the runtime (CUDA context), the LM weights, the SAE parameters,
Adam's moments, ZeRO's fp32 master partition and DDP's gradient buckets. The counts below follow
the code they name; the per-entry and per-row byte counts of the sparse kernels are counted from
sae_dist/sae/ (tensors saved for backward) and checked against measured peaks on CPU
(tests/plan/test_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_dist.config import TrainerConfig, TrainerKind
from sae_dist.plan.gpus import DEEPSPEED_CPU_RUNTIME, Device
from sae_dist.plan.workload import Share, Workload, zero_settings

PHASES = ("lm_forward", "producer", "shuffle", "sae_forward", "sae_backward")
"""The loop's phases, in order."""

STEP_ROW_COPIES = 4
"""[B, d_in] float32 tensors per SAE alive from its forward to its backward: the popped batch,
the scaled input (saved by GatheredPreActs), x_hat, and x - x_hat (saved by the FVU's pow)."""
ENTRY_BYTES = 40
"""Bytes per (token, latent) entry of the sparse kernels alive until backward: int64 latent
ids, their rows and the embedding_bag's offset2bag (8 each), the gathered pre-activations, the
clone GatheredPreActs returns and ReLU's output (4 each, float32)."""
AUXK_ROW_COPIES = 1
"""[B, d_in] float32 tensors AuxK adds until backward: e_hat - e (saved by its pow)."""
GRAD_TEMPS = 2
"""[d_sae, d_in] float32 tensors while one SAE's decoder gradient forms: SparseDecode's
gradient (scatter_outer) and the projected gradient (`parallel_free`); two more with AuxK (its
sub-dictionary's gradients of W_enc and W_dec, scattered to full size)."""
LAYER_ROW_COPIES = 4
"""[T, d_model] tensors of the LM dtype alive inside a decoder layer besides its MLP or
attention intermediates: the residual, the normed input, the sublayer output, the sum."""
MLP_COPIES = 3
"""[T, d_ff] tensors alive at the MLP's peak: act(gate), up, act(gate) x up."""


@dataclass(frozen=True)
class BufferCycle:
    """Rows of storage one shuffle buffer holds over its fill-shuffle cycle."""

    before: int
    """Just before it shuffles: the storage its kept half still views, plus the rows pushed
    since (the forward's own rows included)."""
    after: int
    """After shuffling, while its batches are stepped on: the permuted storage."""
    shuffling: int
    """Extra while it shuffles: the concatenation and the permuted copy."""


def buffer_cycle(capacity: int, batch: int, push: int) -> BufferCycle:
    """Simulate `ShuffleBuffer.push` (sae_dist/producer.py) fed `push` rows per forward: once
    `capacity` is reached the rows are concatenated, permuted, and all but the last half
    capacity (whole batches) become ready batches; the kept half and the batches are views of
    the permuted tensor, so its whole storage lives until the next shuffle."""
    base = pending = size = 0
    before = after = shuffling = 0
    for _ in range(min(100_000, 4 * capacity // max(1, push) + 16)):
        pending += push
        size += push
        if size < capacity:
            continue
        before, shuffling = max(before, base + pending), max(shuffling, 2 * size)
        base, pending = size, 0
        size -= (size - capacity // 2) // batch * batch
        after = max(after, base)
    return BufferCycle(before, after, shuffling)


@dataclass(frozen=True)
class RankMemory:
    """One process's memory: `phases[phase][component]` in bytes."""

    phases: dict[str, dict[str, float]]
    capacity: float
    """The device's memory for this process."""
    margin: float
    """Share of the capacity left to the allocator."""

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def headroom(self) -> float:
        """Bytes left below (1 - margin) x capacity at the peak (negative: does not fit)."""
        return (1 - self.margin) * self.capacity - self.peak

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def peak_of(self, component: str) -> float:
        """A component's largest size over the phases."""
        return max(self.phases[p].get(component, 0.0) for p in PHASES)


def rank_memory(
    w: Workload, s: Share, trainer: TrainerConfig, device: Device, margin: float
) -> RankMemory:
    """The busiest process's memory under `trainer` with share `s` on `device`."""
    persistent = {"runtime": device.runtime, "lm_weights": float(w.lm.weight_bytes)}
    persistent.update(_sae_state(w, s, trainer))
    if trainer.kind.zero_stage and device.type == "cpu":
        persistent["deepspeed_engine"] = DEEPSPEED_CPU_RUNTIME
    lm, d = w.lm, w.sae.d_in
    tokens = s.forward_seqs * w.cfg.data.context_size
    kept = tokens * w.mask_fraction
    captures = w.n_saes * tokens * d * lm.dtype_bytes
    cycle = buffer_cycle(s.buffer_capacity, s.shard_batch, s.push_rows)
    row = d * 4  # a float32 activation row
    layer = (
        tokens
        * lm.dtype_bytes
        * (
            LAYER_ROW_COPIES * lm.d_model
            + max(MLP_COPIES * lm.d_ff, (3 * lm.n_heads + 2 * lm.n_kv_heads) * lm.head_dim)
        )
    )
    before_push = s.buffers * max(0, cycle.before - s.push_rows) * row
    phases = {
        "lm_forward": {
            **persistent,
            "shuffle_buffers": before_push,
            "captured_activations": captures,
            "lm_activations": layer,
        },
        "producer": {
            **persistent,
            "shuffle_buffers": before_push,
            # captures, then per hookpoint the masked float32 rows and the kept copy
            "captured_activations": captures + 2 * w.n_saes * kept * row,
        },
        "shuffle": {
            **persistent,
            "shuffle_buffers": (s.buffers * cycle.before + cycle.shuffling) * row,
            **_gather(w, s, kept, row),
        },
    }
    after = {**persistent, "shuffle_buffers": s.buffers * cycle.after * row}
    forward, backward = _step(w, s, trainer, device)
    phases["sae_forward"] = _add(after, forward)
    phases["sae_backward"] = _add(after, backward)
    return RankMemory(phases, device.memory, margin)


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Component-wise sum of two breakdowns."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


def _sae_state(w: Workload, s: Share, trainer: TrainerConfig) -> dict[str, float]:
    """Parameters, Adam moments, ZeRO's master partition, DDP's buckets of this process."""
    kind, world = trainer.kind, s.world
    own = s.owned * w.sae.param_bytes  # in the parameters' own dtypes
    if not kind.zero_stage:
        state = {"sae_params": float(own), "adam_state": 2.0 * own}
        if kind == TrainerKind.ddp and world > 1:
            # DDP's reducer keeps a flat bucket copy of every gradient (gradient_as_bucket_view
            # off, accelerate's default)
            state["comm_buckets"] = float(own)
        return state
    params = w.sae_params
    module_bytes = 2 if w.sae_bf16 else 4  # DeepSpeed casts the module to bf16 under bf16
    on_rank = params * module_bytes / (world if kind.zero_stage == 3 else 1)
    return {
        "sae_params": on_rank,
        "zero_master": params * 4 / world,
        "adam_state": params * 8 / world,
    }


def _gather(w: Workload, s: Share, kept: float, row: float) -> dict[str, float]:
    """Hookpoint sharding: while the rows go to their owners (`gather_rows`, one hookpoint at
    a time), every hookpoint's local rows are alive, and for one hookpoint the padded send copy
    and, on its owner, the world's rows."""
    if s.kind != TrainerKind.sharded or s.world == 1:
        return {}
    return {
        "captured_activations": w.n_saes * kept * row,
        "comm_buckets": (s.world + 1) * kept * row,
    }


def _step(
    w: Workload, s: Share, trainer: TrainerConfig, device: Device
) -> tuple[dict[str, float], dict[str, float]]:
    """The SAE step of this process's SAEs (`SuiteTrainer.step`) as (its forward's parts, its
    backward's parts): the forward graphs of every SAE, one SAE's transients, the gradients and
    the trainer's gradient buffers."""
    sae, b, n = w.sae, s.stepped_batch, s.owned
    d, latents = sae.d_in, sae.d_sae
    pre_bytes = 2 if w.sae_bf16 else 4
    auxk = sae.aux_entries > 0
    saved = b * d * 4 * (STEP_ROW_COPIES + AUXK_ROW_COPIES * auxk) + ENTRY_BYTES * b * (
        min(sae.entries, latents) + sae.aux_entries
    )
    if not sae.selects:  # dense latents (ReLU): the latent matrix and its ReLU
        saved += 2 * b * latents * pre_bytes
    # one SAE's forward: its pre-activations, AuxK's gathered dead columns (plan.dead_fraction
    # of the latents), under autocast W_enc in bf16
    fwd_transient = b * (latents + auxk * sae.dead) * pre_bytes + w.sae_bf16 * 2 * d * latents
    bwd_transient = (GRAD_TEMPS + 2 * auxk) * latents * d * 4
    forward: dict[str, float] = {"step_activations": n * saved, "step_transient": fwd_transient}
    if not trainer.kind.zero_stage:
        g = sae.param_bytes
        # backward from the last SAE to the first: at its start every graph and one SAE's
        # gradients are alive, at its end every gradient and one graph
        graphs, grads = (n, 1) if saved >= g else (1, n)
        return forward, {
            "step_activations": graphs * saved,
            "sae_grads": grads * g,
            "step_transient": bwd_transient,
        }
    zero = zero_settings(trainer)
    params, world = w.sae_params, s.world
    grad_bytes = 2 if w.sae_bf16 else 4
    if trainer.kind.zero_stage == 2:
        # the reduce buckets (two with overlap_comm) fill during the backward while one SAE's
        # gradient temporaries live; at its end the reduced partition and its flat fp32 copy
        # for the optimizer join the filled buckets
        buckets = (1 + zero.overlap_comm) * zero.reduce_bucket * grad_bytes
        if device.lazy_pages:  # only the part the gradients fill is touched
            buckets = min(zero.reduce_bucket, params) * grad_bytes
        partitions = 2 * params * 4 / world
        late = partitions >= bwd_transient
        return forward, {
            "step_activations": n * saved,
            "comm_buckets": buckets,
            "sae_grads": partitions if late else 0.0,
            "step_transient": 0.0 if late else bwd_transient,
        }
    # ZeRO-3: the SAE gathered for its forward or backward and the next one prefetched; the
    # reduce bucket and the fp32 gradient partition
    gathered = 2.0 * sae.params * grad_bytes
    forward["comm_buckets"] = gathered
    return forward, {
        "step_activations": n * saved,
        "sae_grads": params * 4 / world,
        "comm_buckets": gathered + zero.reduce_bucket * grad_bytes,
        "step_transient": sae.params * grad_bytes + bwd_transient,
    }
