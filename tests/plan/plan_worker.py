"""One measured training run for tests/plan/test_plan.py: `[torchrun ...] plan_worker.py
<result.json> <overrides>` plans the run with the planner on this machine (measured here and
now, in this process, just before the run), then trains it with `sae_dist.train` and writes,
per process, `<result>.<rank>.json`: the prediction, the baseline RSS before training, the
peak RSS at the end of the training loop and every `SuiteTrainer.step`'s seconds.

The process loads the tokenizer once before its baseline is read (the run reuses it), so the
baseline holds the interpreter, the imports and the tokenizer: what the planner does not
count as the run's memory."""

import json
import os
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sae_dist import models  # noqa: E402
from sae_dist.config import PlanConfig, PlanRunConfig, TrainRunConfig, register_configs  # noqa: E402
from sae_dist.distributed import join_launch_group  # noqa: E402
from sae_dist.plan import Planner  # noqa: E402
from sae_dist.plan.command import cpu_shapes  # noqa: E402
from sae_dist.plan.gpus import Device, cpu_device, process_rss  # noqa: E402
from sae_dist.plan.timing import step_time  # noqa: E402
from sae_dist.plan.workload import sae_bf16  # noqa: E402
from sae_dist.train import loop  # noqa: E402
from sae_dist.train.suite_trainer import SuiteTrainer  # noqa: E402


def reset_peak_rss() -> None:
    """Reset this process's peak resident memory (VmHWM) to its current RSS (Linux: writing 5
    to /proc/self/clear_refs); getrusage's ru_maxrss cannot be reset and would keep the peak
    of whatever ran before the training."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_since_reset() -> float:
    """Peak resident memory since reset_peak_rss, bytes (VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def compose(overrides: list[str]) -> PlanRunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.cli import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = OmegaConf.to_object(hydra_compose(config_name="plan", overrides=overrides))
    assert isinstance(cfg, PlanRunConfig)
    return cfg


def mean_device(a: Device, b: Device) -> Device:
    """The rates of two measurements of the same device, averaged."""
    return replace(
        a,
        matmul_flops={k: (v + b.matmul_flops[k]) / 2 for k, v in a.matmul_flops.items()},
        bandwidth=(a.bandwidth + b.bandwidth) / 2,
        first_touch=(a.first_touch + b.first_touch) / 2,
        select_rates={k: (v + b.select_rates[k]) / 2 for k, v in a.select_rates.items()},
    )


def main() -> None:
    result, overrides = Path(sys.argv[1]), sys.argv[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = compose(overrides)
    if cfg.trainer.kind.zero_stage:
        import deepspeed  # noqa: F401  (its import is part of the baseline, as in the run)
    tokenizer = models._tokenizer_only(cfg.model)
    models._tokenizer_only = lambda _cfg: tokenizer  # the run reuses the baseline's tokenizer
    cfg.plan = PlanConfig(
        gpu="cpu",
        gpus=str(world),
        trainers=[cfg.trainer.kind.value],
        threads=torch.get_num_threads(),
        dead_fraction=cfg.plan.dead_fraction,
    )
    if world > 1:
        join_launch_group(600)  # the planner measures the collectives over it
    planner = Planner(cfg, clock=time.process_time)
    plan = planner.plan(cfg.trainer.kind, world)
    spec = planner.device(world).spec
    if world > 1:
        dist.destroy_process_group()
    steps: list[float] = []
    original_step, original_stats = SuiteTrainer.step, loop.write_train_stats
    peak: dict[str, float] = {}

    dead: list[int] = []

    def timed_step(self, batches):
        start = time.process_time()
        out = original_step(self, batches)
        steps.append(time.process_time() - start)
        dead.append(min(int(float(m["dead_frac"]) * self.sae(n).d_sae) for n, m in out.items()))
        return out

    def stats(run, seconds, start_tokens):
        peak["rss"] = peak_rss_since_reset()
        return original_stats(run, seconds, start_tokens)

    SuiteTrainer.step, loop.write_train_stats = timed_step, stats
    reset_peak_rss()  # the peak of the training alone, not of the set-up before it
    baseline = process_rss()
    train_cfg = TrainRunConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainRunConfig)})
    loop.train(train_cfg)
    assert plan.memory is not None and plan.time is not None and plan.share, plan.problem
    # the machine measured again after the run: the prediction uses the mean of both
    # measurements, as the load of a shared machine drifts while the run trains
    before = planner.device(world)
    after = cpu_device(
        cpu_shapes(planner.workload, world, False),
        world,
        torch.get_num_threads(),
        time.process_time,
    )
    device = mean_device(before, after)
    trainer = planner.trainers[cfg.trainer.kind]
    w = replace(planner.workload, sae_bf16=sae_bf16(trainer, "cpu"))
    time_mean = step_time(w, plan.share, trainer, device)
    out = {
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "baseline_rss": baseline,
        "runtime_rss": plan.memory.phases["sae_backward"]["runtime"],
        "peak_rss": peak["rss"],
        "step_seconds": steps,
        "dead_latents": dead,
        "predicted_peak": plan.memory.peak,
        "predicted_phases": plan.memory.phases,
        "predicted_step_before": plan.time.trainer_step,
        "predicted_step": time_mean.trainer_step,
        "predicted_parts": time_mean.parts,
        "predicted_kernels": time_mean.kernels,
        "device": spec,
        "device_after": after.spec,
        "share": asdict(plan.share) if plan.share else None,
    }
    Path(f"{result}.{rank}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
