"""Train one SAE per hookpoint from a streaming producer (DESIGN.md section 7).

`python -m sae_dist.train experiment=demo` — see conf/train.yaml; several processes with
`accelerate launch` / torchrun and `trainer=ddp|zero2|zero3|sharded`. The loop (`train`) reads:
token batches of the hosted data shards -> one LM forward -> per hookpoint and shard: shuffle
buffer (sharded: on the hookpoint's owner) -> lockstep steps of every SAE; every SAE sees
`train.tokens` tokens, then the folded SAEs are evaluated on held-out tokens and saved.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from tqdm.auto import tqdm

from sae_dist.checkpoint import (
    CheckpointError,
    begin_checkpoint,
    check_run_config,
    checkpoint_exists,
    commit_checkpoint,
    load_part,
    load_sae,
    save_part,
    save_run_config,
    save_sae,
    saved_data_shards,
)
from sae_dist.config import TrainerKind, TrainRunConfig, validate
from sae_dist.data import SequencePool, TokenStream, check_source
from sae_dist.distributed import (
    Topology,
    all_min,
    assign_hookpoints,
    barrier,
    broadcast_object,
    gather_dicts,
    gather_rows,
    sum_counts,
)
from sae_dist.errors import ConfigError, DataError
from sae_dist.hookpoints import grid_hookpoints
from sae_dist.models import load_model, resolve_mixed_precision
from sae_dist.preemption import StopSignals
from sae_dist.producer import ActivationProducer, ProducerStats, ShuffleBuffer
from sae_dist.sae import SparseAutoencoder
from sae_dist.tracking import RunLogger
from sae_dist.train.results import completed_results, is_complete, suite_info, write_suite
from sae_dist.train.run_scope import RunScope
from sae_dist.train.suite_trainer import SuiteTrainer

log = logging.getLogger(__name__)


class TrainingRun:
    """Everything a process holds: model, producer over its data shards, the trainer of its
    SAEs, one shuffle buffer per (trained hookpoint, data shard), the logger (main process).
    Built by `__init__`, checkpointed by `save` / `restore` (sae_dist.checkpoint)."""

    def __init__(self, cfg: TrainRunConfig, topology: Topology):
        """Build everything; `cfg.out_dir` is already the same on every process."""
        self.cfg, t = cfg, cfg.train
        self.out_dir = Path(cfg.out_dir)
        shards = (
            t.data_shards or (t.resume and saved_data_shards(self.checkpoint_dir)) or topology.world
        )
        self.topology = Topology(topology.rank, topology.world, shards)
        self.accelerator = make_accelerator(cfg, self.topology.world)
        self.device = self.accelerator.device
        self.hookpoints = grid_hookpoints(cfg.sites, cfg.model.n_layers)
        self.model, self.tokenizer = load_model(cfg.model, self.device)
        streams: dict[int, SequencePool | TokenStream] = {
            v: SequencePool(
                TokenStream(cfg.data, self.tokenizer, "train", v, shards),
                t.sequence_pool // shards,
                t.seed,
            )
            for v in self.topology.shards
        }
        self.producer = ActivationProducer(
            self.model,
            self.hookpoints,
            cfg.data.policy.outlier_factor,
            self.device,
            streams,
            t.forward_batch_seqs // shards,
        )
        self.sharded = cfg.trainer.kind == TrainerKind.sharded
        if self.sharded and self.topology.world > len(self.hookpoints):
            raise ConfigError(
                "trainer.kind",
                "sharded",
                f"at most {len(self.hookpoints)} "
                f"processes for {len(self.hookpoints)} hookpoints (it has "
                f"{self.topology.world}); use trainer=ddp",
            )
        d_sae = cfg.sae.latents(cfg.model.d_model)
        self.owners = (
            assign_hookpoints(
                {hp.name: d_sae * cfg.model.d_model for hp in self.hookpoints}, self.topology.world
            )
            if self.sharded
            else {hp.name: self.topology.rank for hp in self.hookpoints}
        )
        owned = [hp for hp in self.hookpoints if self.owners[hp.name] == self.topology.rank]
        self.trainer = SuiteTrainer(
            owned, cfg, cfg.model.d_model, self.accelerator, self.topology.world
        )
        buffer_shards = range(shards) if self.sharded else self.topology.shards
        self.buffers = {
            hp.name: {
                v: ShuffleBuffer(
                    t.buffer_batches * t.batch_size // shards,
                    t.batch_size // shards,
                    torch.Generator().manual_seed(t.seed * 1000 + i + 100_003 * v),
                )
                for v in buffer_shards
            }
            for i, hp in enumerate(self.hookpoints)
            if hp in owned
        }
        self.forward_batches = 0
        self.logger: RunLogger | None = None
        """Opened by `open_logger` once the run knows whether it resumed (main process)."""
        log.info(
            "process %d/%d trains %d of %d SAEs (d_sae=%d, %s; %s) on data shards %s of "
            "%d, for %d tokens each",
            self.topology.rank,
            self.topology.world,
            len(owned),
            len(self.hookpoints),
            d_sae,
            cfg.sae,
            cfg.trainer.kind.value,
            self.topology.shards,
            shards,
            t.tokens,
        )

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def multiprocess(self) -> bool:
        return self.topology.world > 1

    def distribute(self, acts: dict[int, dict[str, torch.Tensor]]) -> None:
        """Push one step's activations {shard: {hookpoint: rows}} into the buffers; sharded:
        each hookpoint's rows of every process go to its owner first (one gather per hosted
        shard slot and hookpoint)."""
        if not self.sharded:
            for name, per_shard in self.buffers.items():
                for v, buffer in per_shard.items():
                    buffer.push(acts[v][name])
            return
        world = self.topology.world
        for hp in self.hookpoints:
            owner = self.owners[hp.name]
            for slot, v in enumerate(self.topology.shards):
                parts = gather_rows(acts[v][hp.name], owner, world)
                for rank, rows in enumerate(parts or []):
                    self.buffers[hp.name][rank + slot * world].push(rows)

    def ready_steps(self) -> int:
        """Steps every SAE of this process (all processes under data parallelism) can take now:
        each needs a ready batch in each of its shard buffers."""
        local = min(
            (b.available() for per_shard in self.buffers.values() for b in per_shard.values()),
            default=0,
        )
        local = min(local, self.trainer.n_steps - self.trainer.step_count)
        return all_min(local, self.multiprocess and not self.sharded)

    def next_batches(self) -> dict[str, torch.Tensor]:
        """{hookpoint: this process's part of the global batch}: one batch per shard buffer,
        concatenated in shard order."""
        return {
            name: torch.cat([per_shard[v].pop() for v in sorted(per_shard)])
            for name, per_shard in self.buffers.items()
        }

    def all_done(self) -> bool:
        return bool(all_min(int(self.trainer.done), self.multiprocess))

    def tokens_trained(self) -> int:
        return self.trainer.step_count * self.cfg.train.batch_size

    def dropped(self) -> dict[str, dict[str, float]]:
        """Tokens dropped by the outlier / non-finite filters, summed over processes (ints:
        sum_counts keeps the type of each count)."""
        local: dict[str, dict[str, float]] = {
            k: dict(n) for k, n in self.producer.dropped().items()
        }
        return sum_counts(local, self.multiprocess)

    def save(self) -> None:
        """Checkpoint: every process writes its part into a temporary folder (hosted shards'
        streams and filters, its buffers, its SAEs' trainer state; DeepSpeed its partitions),
        then the main process moves it into place. Layout: sae_dist.checkpoint."""
        topo = self.topology
        tmp = begin_checkpoint(self.checkpoint_dir, topo.is_main, barrier)
        for v in topo.shards:
            save_part(tmp, f"shards/{v}.pt", self.producer.state_dict(v))
        for name, per_shard in self.buffers.items():
            for v, buffer in per_shard.items():
                save_part(tmp, f"buffers/{name}/{v}.pt", buffer.state_dict())
        if topo.is_main or self.sharded:
            for name in self.trainer.names:
                save_part(tmp, f"saes/{name}.pt", self.trainer.state_dict(name))
        if self.trainer.zero_stage:
            self.accelerator.save_state(str(tmp / "deepspeed"))
        stats = sum_counts({"p": asdict(self.producer.stats)}, self.multiprocess)["p"]
        if topo.is_main:
            save_run_config(tmp, training_shape(self.cfg))
            save_part(
                tmp,
                "run.pt",
                {
                    "forward_batches": self.forward_batches,
                    "data_shards": topo.data_shards,
                    "world": topo.world,
                    "kind": self.cfg.trainer.kind.value,
                    "producer_stats": stats,
                },
            )
        commit_checkpoint(tmp, self.checkpoint_dir, topo.is_main, barrier)

    def restore(self) -> bool:
        """Resume from `checkpoint_dir` if there is one (any process count dividing its
        data_shards; DeepSpeed: the same count and kind); True when resumed."""
        if not self.cfg.train.resume or not checkpoint_exists(self.checkpoint_dir):
            return False
        ckpt, topo = self.checkpoint_dir, self.topology
        run = load_part(ckpt, "run.pt")
        if self.trainer.zero_stage and (run["world"], run["kind"]) != (
            topo.world,
            self.cfg.trainer.kind.value,
        ):
            raise CheckpointError(
                f"{ckpt} was written by trainer={run['kind']} on "
                f"{run['world']} processes; DeepSpeed resumes only as it was"
            )
        for v in topo.shards:
            self.producer.load_state_dict(v, load_part(ckpt, f"shards/{v}.pt"))
        for name, per_shard in self.buffers.items():
            for v, buffer in per_shard.items():
                buffer.load_state_dict(load_part(ckpt, f"buffers/{name}/{v}.pt"))
        for name in self.trainer.names:
            self.trainer.load_state_dict(name, load_part(ckpt, f"saes/{name}.pt"))
        if self.trainer.zero_stage:
            self.trainer.prepare()
            self.accelerator.load_state(str(ckpt / "deepspeed"))
        self.forward_batches = run["forward_batches"]
        if topo.is_main:
            self.producer.stats = ProducerStats(**run["producer_stats"])
        log.info(
            "resumed from %s after %d forward batches (%d tokens per SAE)",
            ckpt,
            self.forward_batches,
            self.tokens_trained(),
        )
        return True

    def open_logger(self, resumed: bool) -> None:
        """The run's logger (main process): a resumed run continues its history and W&B run
        from the checkpoint's step."""
        if self.topology.is_main:
            self.logger = RunLogger(
                self.cfg.logger,
                self.out_dir,
                asdict(self.cfg),
                name=self.out_dir.name,
                resume_step=self.tokens_trained() if resumed else None,
            )


def make_accelerator(cfg: TrainRunConfig, world: int) -> Accelerator:
    """accelerate for `trainer.kind`: DeepSpeed plugin for zero2/zero3 (config file, stage,
    gradient clipping), collective timeout; checks that DDP really spans the processes."""
    trainer = cfg.trainer
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=trainer.timeout_s))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {
        "mixed_precision": resolve_mixed_precision(trainer.mixed_precision, device),
        "kwargs_handlers": [timeout],
        # one LR step per optimizer step, whatever the process count
        "step_scheduler_with_optimizer": False,
        "cpu": not torch.cuda.is_available() and not trainer.kind.zero_stage,
    }
    if trainer.kind.zero_stage:
        plugin = DeepSpeedPlugin(
            hf_ds_config=trainer.deepspeed_config,
            zero_stage=trainer.kind.zero_stage,
            gradient_clipping=cfg.train.grad_clip,
            zero3_init_flag=False,
        )  # the LM is not partitioned
        # DeepSpeed's own batch bookkeeping: one "sample" (a whole local batch) per process
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=1, train_batch_size=world, gradient_accumulation_steps=1
        )
        kwargs["deepspeed_plugin"] = plugin
    accelerator = Accelerator(**kwargs)
    if trainer.kind == TrainerKind.ddp and world > 1 and accelerator.num_processes != world:
        raise RuntimeError(
            f"trainer=ddp with {world} processes, but accelerate set up {accelerator.num_processes}"
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if trainer.kind.zero_stage and not deepspeed:
        raise ConfigError(
            "trainer",
            trainer.kind.value,
            "a launch with DeepSpeed enabled, which accelerate did not enable "
            "(`accelerate launch --cpu` disables it): launch with `accelerate "
            "launch --use_deepspeed --num_processes N` or torchrun (on CPU with "
            "DS_ACCELERATOR=cpu)",
        )
    if trainer.kind != TrainerKind.single and world == 1:
        log.warning(
            "trainer=%s in a single process (`accelerate launch --cpu` starts one "
            "process without MPI: on CPU use `accelerate launch --multi_gpu "
            "--num_processes N` or torchrun, which run gloo)",
            trainer.kind.value,
        )
    return accelerator


def train(cfg: TrainRunConfig) -> dict[str, dict[str, float]]:
    """Run the whole training job; returns the held-out metrics per hookpoint (main process;
    {} on the others). Every check that needs no model runs first: the config, the data
    source, and whether a checkpoint in out_dir belongs to this config. A finished run is
    reported as complete; a killed one resumes (from its last checkpoint; after the last step,
    straight into the evaluation). The run owns the process's accelerator state and process
    group (RunScope): another run in the same process starts from none of it."""
    validate(cfg)
    check_source(cfg.data)
    with RunScope(cfg.trainer.timeout_s) as scope:
        topology = scope.topology
        cfg.out_dir = broadcast_object(cfg.out_dir, topology)
        checkpoint_dir = Path(cfg.out_dir) / "checkpoint"
        if cfg.train.resume:
            check_run_config(checkpoint_dir, training_shape(cfg))
            if is_complete(Path(cfg.out_dir)):
                if not topology.is_main:
                    return {}
                print(
                    f"The run in {cfg.out_dir} is complete (suite: "
                    f"{Path(cfg.out_dir) / 'suite'}); nothing to do. To train again: "
                    "train.resume=false (replaces it) or another out_dir."
                )
                return completed_results(Path(cfg.out_dir))
        run = TrainingRun(cfg, topology)
        scope.own(run.accelerator)
        run.open_logger(run.restore())
        if not run.all_done():
            with StopSignals() as stop:
                train_loop(run, stop)
        return finish(run)


def train_loop(run: TrainingRun, stop: StopSignals) -> None:
    """Forward batches until every SAE has its tokens: produce -> buffers -> lockstep steps;
    metrics every `train.log_every` steps, checkpoints every `train.checkpoint_every` forward
    batches and after the last step; on a stop signal a checkpoint, then RequeueExit."""
    t, is_main = run.cfg.train, run.topology.is_main
    start, start_tokens = time.perf_counter(), run.producer.stats.train_tokens
    bar = tqdm(
        total=run.trainer.n_steps * t.batch_size,
        initial=run.tokens_trained(),
        unit="tok",
        desc="train SAEs (tokens per SAE)",
        disable=not is_main,
    )
    metrics: dict[str, dict[str, torch.Tensor]] = {}
    while not run.all_done():
        batches = run.producer.next_batches()
        if not all_min(int(batches is not None), run.multiprocess):
            run.save()
            raise DataError(
                f"data.source={run.cfg.data.source!r} ran out after "
                f"{run.tokens_trained()} of {run.trainer.n_steps * t.batch_size} "
                "training tokens per SAE (checkpoint saved): use more data or "
                "a smaller train.tokens in a new out_dir"
            )
        assert batches is not None  # all_min above: every process has its next batches
        run.distribute(run.producer.activations(batches))
        steps_before = run.trainer.step_count
        for _ in range(run.ready_steps()):
            metrics = run.trainer.step(run.next_batches())
        run.forward_batches += 1
        bar.update(run.tokens_trained() - bar.n)
        done = run.all_done()
        if done or run.trainer.step_count // t.log_every > steps_before // t.log_every:
            seconds = time.perf_counter() - start
            log_metrics(run, metrics, (run.producer.stats.train_tokens - start_tokens) / seconds)
        saved = done or bool(t.checkpoint_every) and run.forward_batches % t.checkpoint_every == 0
        if saved:
            run.save()
        if stop.requested(run.multiprocess):
            if not saved:
                run.save()
            stop.exit(f"at step {run.trainer.step_count} of {run.trainer.n_steps}", run.logger)
    bar.close()
    write_train_stats(run, time.perf_counter() - start, start_tokens)


def finish(run: TrainingRun) -> dict[str, dict[str, float]]:
    """Collect the folded SAEs on the main process, then evaluate, save and report them
    (sae_dist.suite)."""
    trained = collect_saes(run)
    dropped = run.dropped()
    if not run.topology.is_main:
        return {}
    saes = {hp: trained[hp.name][0].eval() for hp in run.hookpoints}
    training = {
        hp.name: {**trained[hp.name][1], "outliers_dropped": dropped["outliers"][hp.name]}
        for hp in run.hookpoints
    }
    assert run.logger is not None  # opened on the main process (open_logger)
    info = suite_info(
        run.cfg,
        run.tokens_trained(),
        {"processes": run.topology.world, "data_shards": run.topology.data_shards},
        evaluated=bool(run.cfg.train.eval_tokens),
    )
    return write_suite(
        run.cfg, saes, training, run.model, run.tokenizer, run.device, run.logger, info
    )


NOT_SHAPING = (
    "train.log_every",
    "train.checkpoint_every",
    "train.eval_tokens",
    "train.resume",
    "train.data_shards",
    "trainer.kind",
    "trainer.timeout_s",
    "trainer.deepspeed_config",
    "model.cache_dir",
    "model.architecture",
    "out_dir",
)
"""Keys that do not change what a run trains (its data shards and trainer kind are checked
apart, against the checkpoint's run.pt), so a resume may change them; logger.* neither."""


def training_shape(cfg: TrainRunConfig) -> dict[str, Any]:
    """The config keys that shape training, flattened {dotted key: JSON value}: a checkpoint
    resumes only under the same values."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in NOT_SHAPING or prefix.startswith("logger."):
            return
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value.value if isinstance(value, TrainerKind) else value

    walk("", asdict(cfg))
    return json.loads(json.dumps(flat))


def write_train_stats(run: TrainingRun, seconds: float, start_tokens: int) -> None:
    """`train_stats.json` (main process): training wall time, LM tokens (passing the mask) per
    second over all processes, and per process its peak resident memory and SAE memory."""
    rank = run.topology.rank
    mine = {
        f"process{rank}/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"process{rank}/{k}": v for k, v in run.trainer.memory_mb().items()},
    }
    if torch.cuda.is_available():
        mine[f"process{rank}/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    per_process = gather_dicts(mine, run.multiprocess)
    tokens = sum_counts(
        {"t": {"n": run.producer.stats.train_tokens - start_tokens}}, run.multiprocess
    )["t"]["n"]
    if not run.topology.is_main:
        return
    stats = {
        "trainer": run.cfg.trainer.kind.value,
        "processes": run.topology.world,
        "data_shards": run.topology.data_shards,
        "saes": len(run.hookpoints),
        "train_seconds": seconds,
        "lm_train_tokens_per_s": tokens / seconds,
        "sae_tokens_trained": run.tokens_trained(),
        **per_process,
    }
    (run.out_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
    assert run.logger is not None  # opened on the main process (open_logger)
    run.logger.summary(stats)
    log.info(
        "training: %.1f s, %.0f LM tokens/s over %d processes",
        seconds,
        tokens / seconds,
        run.topology.world,
    )


def log_metrics(
    run: TrainingRun, metrics: dict[str, dict[str, torch.Tensor]], tok_per_s: float
) -> None:
    """Log the last step's metrics of every SAE, the drop counts and the LM tokens/s summed
    over processes (a collective; the main process writes)."""
    local = {f"{hp}/{k}": float(v) for hp, m in metrics.items() for k, v in m.items()}
    merged = gather_dicts(local, run.multiprocess and run.sharded)
    dropped = run.dropped()
    rate = sum_counts({"t": {"tok_s": tok_per_s}}, run.multiprocess)["t"]["tok_s"]
    if run.logger is None or not merged:
        return
    merged.update(
        {f"{hp}/{kind}_dropped": n for kind, per_hp in dropped.items() for hp, n in per_hp.items()}
    )
    merged["tokens_per_s"] = rate
    run.logger.log(merged, step=run.tokens_trained())


TRAINING_METADATA = ("training_tokens", "input_scale")


def collect_saes(run: TrainingRun) -> dict[str, tuple[SparseAutoencoder, dict[str, Any]]]:
    """{hookpoint: (folded SAE, training metadata)} on the main process ({} elsewhere). Under
    hookpoint sharding each owner writes its SAEs to `<out_dir>/.trained/` for the main
    process to read (a shared file system, as for checkpoints)."""
    saes = run.trainer.folded_saes()
    info: dict[str, dict[str, Any]] = {
        name: dict(zip(TRAINING_METADATA, (run.tokens_trained(), run.trainer.scales[name])))
        for name in saes
    }
    if not run.sharded or run.topology.world == 1:
        return {n: (saes[n], info[n]) for n in saes} if run.topology.is_main else {}
    staging = run.out_dir / ".trained"
    for name, sae in saes.items():
        save_sae(sae, staging / name, info[name])
    barrier()
    if not run.topology.is_main:
        return {}
    out = {}
    for hp in run.hookpoints:
        sae, sae_cfg = load_sae(staging / hp.name)
        sae = sae.to(run.device)
        out[hp.name] = (sae, {k: sae_cfg["metadata"][k] for k in TRAINING_METADATA})
    shutil.rmtree(staging, ignore_errors=True)
    return out
