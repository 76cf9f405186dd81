"""`python -m sae_dist.plan`: for a training config, each trainer's memory per process, step
time, throughput, wall-clock and cost on a device kind, the cheapest configuration that fits
first (DESIGN.md section 12). Nothing is loaded: the LM is built on the meta device.

`plan_run(cfg)` returns the plan as a JSON-ready dict; `run_plan(cfg)` prints it (a table, or
one JSON object with `plan.format=json`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from sae_dist.cli import CONF_DIR
from sae_dist.config import PlanRunConfig, TrainerConfig, TrainerKind, validate
from sae_dist.plan.gpus import Clock, CpuShapes, Device, GiB, cpu_device, gpu_device
from sae_dist.plan.memory import PHASES, RankMemory, rank_memory
from sae_dist.plan.timing import (
    StepTime,
    lm_flops_per_token,
    sae_flops_per_token,
    select_ks,
    step_time,
)
from sae_dist.plan.workload import Share, Workload, sae_bf16, share, workload, zero_settings


@dataclass(frozen=True)
class TrainerPlan:
    """One trainer on `gpus` processes: its busiest process's share, memory and step time, or
    why it cannot run there."""

    kind: TrainerKind
    gpus: int
    share: Share | None
    memory: RankMemory | None
    time: StepTime | None
    problem: str | None
    """Why it cannot run (None: it fits)."""
    batch_size: int
    tokens: int
    price: float
    """USD per GPU-hour."""

    @property
    def fits(self) -> bool:
        return self.problem is None

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of every SAE (one global batch per step)."""
        assert self.time is not None
        return self.batch_size / self.time.seconds

    @property
    def hours(self) -> float:
        """Wall-clock hours for `train.tokens` (model loading and evaluation aside)."""
        return self.tokens / self.tokens_per_s / 3600

    @property
    def cost(self) -> float:
        return self.hours * self.gpus * self.price


class Planner:
    """Plans one config on one device kind (`cpu`: measured once per process count, on `clock`:
    wall time, or e.g. time.process_time for CPU seconds)."""

    def __init__(self, cfg: PlanRunConfig, clock: Clock = time.perf_counter):
        self.cfg, self.p, self.clock = cfg, cfg.plan, clock
        self.device_type = "cpu" if self.p.gpu == "cpu" else "cuda"
        if self.device_type == "cuda":
            gpu_device(self.p.gpu)  # an unknown kind fails here, naming the known ones
        self.trainers = trainer_configs(cfg)
        self.workload = workload(
            cfg, self.device_type, self.p.train_mask_fraction, self.p.dead_fraction
        )
        self._devices: dict[int, Device] = {}

    def device(self, world: int) -> Device:
        """The device of each of `world` processes."""
        if self.device_type == "cuda":
            return gpu_device(self.p.gpu)
        if world not in self._devices:
            print(f"measuring this machine for {world} process(es) ...", file=sys.stderr)
            bf16 = any(  # ZeRO-3 does not run on a CPU
                sae_bf16(t, "cpu") for k, t in self.trainers.items() if k.zero_stage != 3
            )
            shapes = cpu_shapes(self.workload, world, bf16)
            self._devices[world] = cpu_device(shapes, world, self.p.threads, self.clock)
        return self._devices[world]

    @property
    def per_node(self) -> int:
        return (os.cpu_count() or 1) if self.device_type == "cpu" else self.device(1).per_node

    def counts(self) -> list[int]:
        """The process counts `gpus=auto` tries, in order: 1, 2, 4, then whole nodes (`cpu`:
        up to the cores)."""
        limit = (
            self.p.max_gpus if self.device_type == "cuda" else min(self.p.max_gpus, self.per_node)
        )
        nodes = range(self.per_node, limit + 1, self.per_node) if self.device_type == "cuda" else []
        return sorted({c for c in (1, 2, 4, *nodes) if c <= limit})

    def plan(self, kind: TrainerKind, world: int) -> TrainerPlan:
        """`kind` on `world` processes."""
        trainer = self.trainers[kind]
        device = self.device(world)
        w = replace(self.workload, sae_bf16=sae_bf16(trainer, self.device_type))
        price = device.price if self.p.price_per_gpu_hour is None else self.p.price_per_gpu_hour
        t = self.cfg.train
        plan = TrainerPlan(kind, world, None, None, None, None, t.batch_size, t.tokens, price)
        s = share(w, kind, world)
        if isinstance(s, str):
            return replace(plan, problem=s)
        if kind.zero_stage == 3 and self.device_type == "cpu":
            return replace(plan, share=s, problem="DeepSpeed runs ZeRO-3 on CUDA only")
        memory = rank_memory(w, s, trainer, device, self.p.memory_margin)
        problem = None
        if not memory.fits:
            problem = (
                f"does not fit: peak {memory.peak / GiB:.1f} GiB per process > "
                f"{(1 - memory.margin) * memory.capacity / GiB:.1f} GiB usable"
            )
        return replace(
            plan, share=s, memory=memory, time=step_time(w, s, trainer, device), problem=problem
        )

    def best(self, kind: TrainerKind) -> TrainerPlan:
        """`kind` at `plan.gpus`; with auto at the smallest count that fits (none: the count
        with the smallest peak)."""
        counts = [self.p.gpu_count] if self.p.gpu_count else self.counts()
        tried = [self.plan(kind, c) for c in counts]
        fitting = [t for t in tried if t.fits]
        if fitting:
            return fitting[0]
        sized = [t for t in tried if t.memory is not None]
        return min(sized, key=lambda t: _peak(t)) if sized else tried[0]


def _peak(t: TrainerPlan) -> float:
    assert t.memory is not None
    return t.memory.peak


def cpu_shapes(w: Workload, world: int, bf16: bool) -> CpuShapes:
    """What to measure on a CPU for `w` on `world` processes (`bf16`: some trainer's SAE step
    runs under bf16 autocast)."""
    dtypes = {torch.float32, w.lm.dtype, *([torch.bfloat16] if bf16 else [])}
    return CpuShapes(
        rows=max(1, w.cfg.train.batch_size // world),
        d_in=w.sae.d_in,
        d_sae=w.sae.d_sae,
        ks=select_ks(w.sae),
        dtypes=tuple(sorted(dtypes, key=str)),
    )


def trainer_configs(cfg: PlanRunConfig) -> dict[TrainerKind, TrainerConfig]:
    """Every planned trainer's config: the run's own (its `trainer` group and overrides) for
    its kind, conf/trainer/<kind>.yaml for the others."""
    out = {}
    for name in cfg.plan.trainers:
        kind = TrainerKind(name)
        if kind == cfg.trainer.kind:
            out[kind] = cfg.trainer
            continue
        node = OmegaConf.merge(
            OmegaConf.structured(TrainerConfig),
            OmegaConf.load(CONF_DIR / "trainer" / f"{name}.yaml"),
        )
        trainer = OmegaConf.to_object(node)
        assert isinstance(trainer, TrainerConfig)  # merged into the TrainerConfig schema
        out[kind] = trainer
    return out


# --- the report ------------------------------------------------------------------------------


def plan_run(cfg: PlanRunConfig) -> dict[str, Any]:
    """The plan of `cfg` as a JSON-ready dict: the workload, the device, the recommendation
    (the cheapest trainer that fits; ties: the faster) and every trainer's figures."""
    validate(cfg)
    planner = Planner(cfg)
    w = planner.workload
    plans = {kind: planner.best(kind) for kind in planner.trainers}
    fitting = [p for p in plans.values() if p.fits]
    best = min(fitting, key=lambda p: (p.cost, p.hours, p.gpus)) if fitting else None
    trainers = {}
    for kind, p in plans.items():
        entry = _trainer_entry(p, planner)
        if not p.fits and p.memory is not None:
            entry["advice"] = _advice(planner, plans, p)
        trainers[kind.value] = entry
    return {
        "model": {
            "name": cfg.model.name,
            "params": w.lm.params,
            "dtype": str(w.lm.dtype).removeprefix("torch."),
            "weight_bytes": w.lm.weight_bytes,
            "layers_run": w.lm.layers_run,
            "held_by": "every process (each runs its own producer), whatever the trainer",
        },
        "saes": {
            "hookpoints": w.n_saes,
            "architecture": w.sae.architecture,
            "d_in": w.sae.d_in,
            "d_sae": w.sae.d_sae,
            "latents_per_token": w.sae.entries,
            "auxk_latents_per_token": w.sae.aux_entries,
            "auxk_share_of_steps": w.sae.auxk_share,
            "params_per_sae": w.sae.params,
            "params": w.sae_params,
            "state_bytes": 4 * w.sae_param_bytes,
            "state": "parameters + gradients + 2 Adam moments, in the parameters' dtype (fp32)",
        },
        "train": {
            "tokens": cfg.train.tokens,
            "batch_size": cfg.train.batch_size,
            "context_size": cfg.data.context_size,
            "forward_batch_seqs": cfg.train.forward_batch_seqs,
            "buffer_batches": cfg.train.buffer_batches,
            "train_mask_fraction": w.mask_fraction,
        },
        "flops_per_token": {
            "lm_forward": lm_flops_per_token(w),
            "sae_step": sae_flops_per_token(w),
        },
        "device": _device_entry(planner.device(best.gpus if best else 1)),
        "recommended": (
            {"trainer": best.kind.value, **trainers[best.kind.value]} if best else None
        ),
        "trainers": trainers,
    }


def _device_entry(device: Device) -> dict[str, Any]:
    return {
        "name": device.name,
        "memory_bytes": device.memory,
        "matmul_flops": device.matmul_flops,
        "bandwidth": device.bandwidth,
        "spec": device.spec,
    }


def _trainer_entry(p: TrainerPlan, planner: Planner) -> dict[str, Any]:
    entry: dict[str, Any] = {"gpus": p.gpus, "fits": p.fits, "problem": p.problem}
    if p.share is not None:
        entry["saes_per_process"] = p.share.owned
        entry["step_batch_per_sae"] = p.share.stepped_batch
    if p.memory is not None:
        m = p.memory
        entry["memory_per_process"] = {
            "peak_bytes": m.peak,
            "peak_phase": m.peak_phase,
            "headroom_bytes": m.headroom,
            "capacity_bytes": m.capacity,
            "components": dict(sorted(m.phases[m.peak_phase].items())),
            "phases": {ph: m.total(ph) for ph in PHASES},
        }
    if p.time is not None:
        entry["time"] = {
            "step_seconds": p.time.seconds,
            "parts": p.time.parts,
            "bounds": p.time.bounds,
            "sae_kernels": p.time.kernels,
            "trainer_step_seconds": p.time.trainer_step,
            "comm_per_step": {
                name: {"bytes": c.bytes, "collectives": c.collectives}
                for name, c in p.time.comm.items()
            },
        }
        entry.update(tokens_per_s=p.tokens_per_s, hours=p.hours, cost_usd=p.cost)
    if p.kind.zero_stage:
        entry["deepspeed_config"] = zero_settings(planner.trainers[p.kind]).source
    if p.fits:
        entry["launch"] = launch_command(planner.cfg, p.kind, p.gpus, planner.per_node)
    return entry


def _advice(planner: Planner, plans: dict[TrainerKind, TrainerPlan], p: TrainerPlan) -> str:
    """What would fit instead: more processes of this trainer, or the trainers that fit."""
    more = next(
        (c for c in planner.counts() if c > p.gpus and planner.plan(p.kind, c).fits),
        None,
    )
    first = f"needs {more} GPUs" if more else f"does not fit on up to {planner.p.max_gpus} GPUs"
    others = [f"trainer={k.value} on {o.gpus}" for k, o in plans.items() if o.fits]
    return first + (f"; or {', '.join(others)}" if others else "")


def launch_command(cfg: PlanRunConfig, kind: TrainerKind, gpus: int, per_node: int) -> str:
    """The training command for `kind` on `gpus` processes, with the run's own overrides."""
    keep_trainer = kind == cfg.trainer.kind
    args = [
        o
        for o in _task_overrides()
        if not o.startswith(("plan.", "trainer="))
        and (keep_trainer or not o.startswith("trainer."))
    ]
    args = " ".join([*args, f"trainer={kind.value}"])
    if gpus == 1:
        return f"python -m sae_dist.train {args}"
    if cfg.plan.gpu == "cpu":
        env = "DS_ACCELERATOR=cpu " if kind.zero_stage else ""
        return f"{env}torchrun --nproc_per_node {gpus} -m sae_dist.train {args}"
    if gpus <= per_node:
        ds = f" --use_deepspeed --zero_stage {kind.zero_stage}" if kind.zero_stage else ""
        return f"accelerate launch{ds} --num_processes {gpus} -m sae_dist.train {args}"
    return (
        f"sbatch --nodes {-(-gpus // per_node)} --gpus-per-node {per_node} "
        f"launch/slurm/train.sbatch {args}"
    )


def _task_overrides() -> list[str]:
    """The command line's overrides (none outside a Hydra job)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def run_plan(cfg: PlanRunConfig) -> dict[str, Any]:
    """Print the plan of `cfg` (`plan.format`: table or json) and return it."""
    report = plan_run(cfg)
    print(json.dumps(report, indent=2) if cfg.plan.format == "json" else render(report))
    return report


# --- the table -------------------------------------------------------------------------------

COMPONENTS = (
    "runtime",
    "lm_weights",
    "lm_activations",
    "captured_activations",
    "shuffle_buffers",
    "sae_params",
    "sae_grads",
    "adam_state",
    "zero_master",
    "deepspeed_engine",
    "comm_buckets",
    "step_activations",
    "step_transient",
)


def render(r: dict[str, Any]) -> str:
    """The plan as text: the workload, the recommendation first, one row per trainer, the
    per-process memory at each trainer's peak."""
    m, s, t, dev = r["model"], r["saes"], r["train"], r["device"]
    lines = [
        f"model {m['name']}: {m['params'] / 1e9:.2f}B parameters in {m['dtype']}, "
        f"{m['layers_run']} layers run; {s['hookpoints']} {s['architecture']} SAEs "
        f"{s['d_in']} x {s['d_sae']} = {s['params'] / 1e9:.3g}B parameters; SAE state "
        f"(parameters + gradients + Adam, fp32) {s['state_bytes'] / 1e9:.1f} GB",
        f"latents per token {s['latents_per_token']}, AuxK {s['auxk_latents_per_token']} in "
        f"{s['auxk_share_of_steps']:.0%} of the steps (plan.dead_fraction)",
        f"train: {t['tokens']:,} tokens per SAE, batch {t['batch_size']}, context "
        f"{t['context_size']}, train-mask fraction {t['train_mask_fraction']:g}; FLOPs per token: "
        f"LM {r['flops_per_token']['lm_forward'] / 1e9:.3g} G, SAE step "
        f"{r['flops_per_token']['sae_step'] / 1e9:.3g} G",
        f"device {dev['name']}: {dev['spec']}",
        "",
    ]
    best = r["recommended"]
    if best:
        lines += [
            f"recommended: trainer={best['trainer']} on {best['gpus']} x {dev['name']}: "
            f"peak {_gib(best['memory_per_process']['peak_bytes'])} GiB per process "
            f"({_gib(best['memory_per_process']['headroom_bytes'])} GiB headroom), "
            f"{best['tokens_per_s']:,.0f} tokens/s per SAE, {best['hours']:,.1f} h, "
            f"${best['cost_usd']:,.0f}",
            f"  {best['launch']}",
            "",
        ]
    else:
        lines += ["recommended: nothing fits (see the problems below)", ""]
    lines += [
        "| trainer | GPUs | fits | SAEs/process | peak GiB | headroom GiB | step s | "
        "tokens/s | hours | cost $ |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in r["trainers"].items():
        mem = e.get("memory_per_process")
        lines.append(
            f"| {name} | {e['gpus']} | {'yes' if e['fits'] else 'no'} | "
            f"{e.get('saes_per_process', '-')} | "
            f"{_gib(mem['peak_bytes']) if mem else '-'} | "
            f"{_gib(mem['headroom_bytes']) if mem else '-'} | "
            + (
                f"{e['time']['step_seconds']:.3g} | {e['tokens_per_s']:,.0f} | "
                f"{e['hours']:,.1f} | {e['cost_usd']:,.0f} |"
                if "time" in e
                else "- | - | - | - |"
            )
        )
    lines += ["", "memory per process at its peak (GiB):", ""]
    sized = {n: e for n, e in r["trainers"].items() if "memory_per_process" in e}
    lines.append(
        "| component | " + " | ".join(f"{n} x{e['gpus']}" for n, e in sized.items()) + " |"
    )
    lines.append("|---|" + "---:|" * len(sized))
    for c in COMPONENTS:
        values = [e["memory_per_process"]["components"].get(c, 0.0) for e in sized.values()]
        if any(values):
            lines.append(f"| {c} | " + " | ".join(_gib(v) for v in values) + " |")
    lines.append(
        "| **peak** (phase) | "
        + " | ".join(
            f"{_gib(e['memory_per_process']['peak_bytes'])} "
            f"({e['memory_per_process']['peak_phase']})"
            for e in sized.values()
        )
        + " |"
    )
    problems = [
        f"- {n} on {e['gpus']}: {e['problem']}" + (f"; {e['advice']}" if "advice" in e else "")
        for n, e in r["trainers"].items()
        if e["problem"]
    ]
    return "\n".join(lines + ([""] + problems if problems else []))


def _gib(value: float) -> str:
    return f"{value / GiB:,.1f}"
