"""What a training config asks of each process, from the real code: the LM built on the meta
device (sae_dist.models.meta_model), the hookpoints (grid_hookpoints), one SAE of the chosen
architecture built on the meta device (build_sae: its parameters, their dtypes, k and k_aux),
and for a trainer and process count the share of the work one process holds: its SAEs
(assign_hookpoints for hookpoint sharding, as the training loop calls it), its data shards
(Topology), its step batch and its buffers.

Sizes are element counts; bytes are counted where a dtype is fixed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from sae_dist.cli import CONF_DIR
from sae_dist.config import TrainerConfig, TrainerKind, TrainRunConfig
from sae_dist.distributed import Topology, assign_hookpoints
from sae_dist.hookpoints import Hookpoint, decoder_layers, grid_hookpoints
from sae_dist.models import meta_model, resolve_dtype, resolve_mixed_precision
from sae_dist.sae import SparseAutoencoder, TopKSAE, build_sae


@dataclass(frozen=True)
class LMShape:
    """The language model, as far as the producer uses it."""

    params: int
    """All parameters (tied embeddings once)."""
    weight_bytes: int
    """Bytes of all parameters in the forward dtype (every process loads the whole model)."""
    layer_params: int
    """Parameters of the decoder layers the producer runs (up to the last hookpoint's layer)."""
    layers_run: int
    dtype: torch.dtype
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def dtype_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8


def lm_shape(model: PreTrainedModel, hookpoints: list[Hookpoint]) -> LMShape:
    """The meta model's sizes; the producer stops after the last hookpoint's layer."""
    c = model.config
    layers_run = max(hp.layer for hp in hookpoints) + 1
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    return LMShape(
        params=sum(p.numel() for p in model.parameters()),
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        layer_params=sum(p.numel() for layer in layers[:layers_run] for p in layer.parameters()),
        layers_run=layers_run,
        dtype=dtype,
        d_model=c.hidden_size,
        d_ff=c.intermediate_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    )


@dataclass(frozen=True)
class SAEShape:
    """One SAE (every hookpoint's SAE has the same shape: d_in = d_model)."""

    architecture: str
    d_in: int
    d_sae: int
    params: int
    param_bytes: int
    """Its parameters' bytes (float32; JumpReLU's log-thresholds float64)."""
    entries: int
    """Latents per token that take part in the sparse step (TopK: k); d_sae when dense."""
    aux_entries: int
    """Dead latents per token in the AuxK pass (k_aux) when AuxK can run, else 0."""
    auxk_share: float
    """Share of the steps in which AuxK can run (after `sae.dead_tokens` tokens)."""
    dead: int
    """Dead latents AuxK draws from (plan.dead_fraction of d_sae, at least its width)."""
    selects: bool
    """Each token's latents come from a topk over the pre-activations (TopK, BatchTopK)."""


JUMPRELU_ENTRIES = 64
"""Latents per token a JumpReLU without `target_l0` is assumed to keep (its L0 follows from
`l0_coef` alone; an assumption)."""


def sae_shape(cfg: TrainRunConfig, dead_fraction: float = 1.0) -> SAEShape:
    """The architecture built on the meta device: parameters and their dtypes, k, and AuxK's
    width min(k_aux, dead_fraction x d_sae) (TopKSAE.aux_losses: at most the dead latents)."""
    d_in = cfg.model.d_model
    with torch.device("meta"):
        sae: SparseAutoencoder = build_sae(cfg.sae, d_in)
    tokens = cfg.train.tokens
    auxk = isinstance(sae, TopKSAE) and cfg.sae.dead_tokens < tokens
    if isinstance(sae, TopKSAE):
        entries = sae.k
    elif sae.architecture == "jumprelu":
        target = getattr(cfg.sae, "target_l0", None)
        entries = round(target) if target else JUMPRELU_ENTRIES
    else:
        entries = sae.d_sae
    return SAEShape(
        architecture=sae.architecture,
        d_in=d_in,
        d_sae=sae.d_sae,
        params=sum(p.numel() for p in sae.parameters()),
        param_bytes=sum(p.numel() * p.element_size() for p in sae.parameters()),
        entries=entries,
        aux_entries=(
            max(1, min(sae.k_aux, round(dead_fraction * sae.d_sae)))
            if auxk and isinstance(sae, TopKSAE)
            else 0
        ),
        auxk_share=max(0.0, 1 - cfg.sae.dead_tokens / tokens) if auxk else 0.0,
        dead=max(1, round(dead_fraction * sae.d_sae)),
        selects=isinstance(sae, TopKSAE),
    )


@dataclass(frozen=True)
class Workload:
    """A training config's demands, independent of the trainer."""

    cfg: TrainRunConfig
    lm: LMShape
    sae: SAEShape
    hookpoints: list[Hookpoint]
    sae_bf16: bool
    """The SAE step under bf16 autocast (`trainer.mixed_precision` resolved on the device)."""
    mask_fraction: float
    """SAE tokens per LM token (the token policy's share of positions)."""

    @property
    def n_saes(self) -> int:
        return len(self.hookpoints)

    @property
    def sae_params(self) -> int:
        """Parameters of all SAEs of the run."""
        return self.n_saes * self.sae.params

    @property
    def sae_param_bytes(self) -> int:
        return self.n_saes * self.sae.param_bytes


def workload(
    cfg: TrainRunConfig, device_type: str, mask_fraction: float, dead_fraction: float = 1.0
) -> Workload:
    """The config's LM (on the meta device, in `model.dtype` resolved for the device type:
    cpu or cuda), its hookpoints and SAE (AuxK over `dead_fraction` of the latents at most),
    and the SAE step's precision under `cfg.trainer`."""
    hookpoints = grid_hookpoints(cfg.sites, cfg.model.n_layers)
    dtype = resolve_dtype(cfg.model.dtype, "cpu") if device_type == "cpu" else _gpu_dtype(cfg)
    cfg.sae.check(cfg.model.d_model)
    return Workload(
        cfg=cfg,
        lm=lm_shape(meta_model(cfg.model, dtype), hookpoints),
        sae=sae_shape(cfg, dead_fraction),
        hookpoints=hookpoints,
        sae_bf16=sae_bf16(cfg.trainer, device_type),
        mask_fraction=mask_fraction,
    )


def _gpu_dtype(cfg: TrainRunConfig) -> torch.dtype:
    """`model.dtype` on a GPU (every kind planned has bf16 in hardware: `auto` is bf16)."""
    return torch.bfloat16 if cfg.model.dtype == "auto" else resolve_dtype(cfg.model.dtype)


def sae_bf16(trainer: TrainerConfig, device_type: str) -> bool:
    """The SAE step runs under bf16 (or fp16) autocast: `trainer.mixed_precision` resolved on
    the device type (`auto`: bf16 where native; on every GPU kind planned)."""
    mixed = trainer.mixed_precision
    if mixed == "auto":
        mixed = resolve_mixed_precision("auto", "cpu") if device_type == "cpu" else "bf16"
    return mixed in ("bf16", "fp16")


@dataclass(frozen=True)
class Share:
    """The part of a run one process holds, for the busiest process."""

    kind: TrainerKind
    world: int
    data_shards: int
    owned: int
    """SAEs this process trains (its hookpoints; all of them unless sharded)."""
    stepped_batch: int
    """Rows each of its SAEs steps on (its part of the global batch; all of it when sharded)."""
    buffers: int
    """Shuffle buffers it holds: one per (trained hookpoint, buffered data shard)."""
    buffer_capacity: int
    """Rows of each buffer (`train.buffer_batches` x the shard's batch)."""
    shard_batch: int
    """Rows per data shard in each global batch."""
    forward_seqs: int
    """Sequences of this process's LM forward (its hosted shards together)."""
    push_rows: int
    """Rows each forward adds to each buffer (train-mask share of a shard's forward rows)."""

    @property
    def data_parallel(self) -> bool:
        """Gradients (and batch statistics) are reduced over the processes."""
        return self.kind.data_parallel and self.world > 1


def share(w: Workload, kind: TrainerKind, world: int) -> Share | str:
    """The busiest process's share under `kind` on `world` processes, or why the training
    loop would refuse the combination (its checks: data shards dividing the batch and forward
    sequences, at most one process per hookpoint when sharded)."""
    t = w.cfg.train
    if kind == TrainerKind.single and world > 1:
        return "trainer=single runs one process"
    shards = t.data_shards or world
    if shards % world:
        return f"train.data_shards={shards} is not a multiple of {world} processes"
    if t.batch_size % shards or t.forward_batch_seqs % shards:
        return (
            f"{shards} data shards must divide train.batch_size ({t.batch_size}) and "
            f"train.forward_batch_seqs ({t.forward_batch_seqs})"
        )
    if kind == TrainerKind.sharded and world > w.n_saes:
        return f"trainer=sharded needs at most {w.n_saes} processes (one per hookpoint)"
    hosted = len(Topology(0, world, shards).shards)
    shard_batch = t.batch_size // shards
    if kind == TrainerKind.sharded:
        owners = assign_hookpoints(
            {hp.name: w.sae.d_sae * w.sae.d_in for hp in w.hookpoints}, world
        )
        owned = max(Counter(owners.values()).values())
        buffered, stepped = shards, t.batch_size
    else:
        owned, buffered, stepped = w.n_saes, hosted, shard_batch * hosted
    seqs_per_shard = t.forward_batch_seqs // shards
    return Share(
        kind=kind,
        world=world,
        data_shards=shards,
        owned=owned,
        stepped_batch=stepped,
        buffers=owned * buffered,
        buffer_capacity=t.buffer_batches * shard_batch,
        shard_batch=shard_batch,
        forward_seqs=seqs_per_shard * hosted,
        push_rows=round(seqs_per_shard * w.cfg.data.context_size * w.mask_fraction),
    )


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO settings that size its buffers and collectives (elements)."""

    reduce_bucket: int
    allgather_bucket: int
    overlap_comm: bool
    prefetch_bucket: int
    source: str
    """The JSON file read, or why DeepSpeed's defaults were taken."""


def zero_settings(trainer: TrainerConfig) -> ZeroSettings:
    """`zero_optimization` of `trainer.deepspeed_config` (relative paths: from the working
    directory, else from the checkout root), with DeepSpeed's defaults for what it leaves out
    or where the file is absent (e.g. an installed wheel run elsewhere)."""
    path = _find(trainer.deepspeed_config)
    zero = json.loads(path.read_text()).get("zero_optimization", {}) if path else {}
    stage3 = trainer.kind.zero_stage == 3

    def number(key: str, default: float) -> int:
        value = zero.get(key, default)
        return int(default if value == "auto" else value)

    return ZeroSettings(
        reduce_bucket=number("reduce_bucket_size", 5e8),
        allgather_bucket=number("allgather_bucket_size", 5e8),
        overlap_comm=bool(zero.get("overlap_comm", stage3)),
        prefetch_bucket=number("stage3_prefetch_bucket_size", 5e7),
        source=str(path) if path else f"DeepSpeed defaults ({trainer.deepspeed_config} not found)",
    )


def _find(name: str | None) -> Path | None:
    if not name:
        return None
    for path in (Path(name), CONF_DIR.parent / name):
        if path.is_file():
            return path
    return None
