"""Where the time of a training run goes: the real loop of `python -m sae_dist.train` (one
process) against its parts measured alone on the same token batches.

    python benchmarks/end_to_end.py [--batches 12] [--threads 2] [overrides ...]
    python benchmarks/end_to_end.py --batches 12 experiment=demo    # the default overrides

It builds the run exactly as `sae_dist.train` does (`TrainingRun`, from conf/train.yaml plus the
overrides; nothing written but a temporary out_dir), then times on the same forward batches:
1. the training loop (`train_loop`'s body: producer step, shuffle buffers, SAE steps), each
   phase apart;
2. a bare forward of the same layers (the decoder layers up to the deepest hookpoint, no
   hooks, no mask or filter): what the capture costs on top of the model;
3. the SAE steps alone: a fresh trainer of the same SAEs stepping on the batches the loop
   popped, replayed from memory.
Prints one JSON line: seconds and LM tokens/s of each, `capture_over_bare` (producer step /
bare forward) and `overhead_ratio` = loop / (bare forward + isolated steps).
Warm-up, not timed: the forward batches until the shuffle buffers release their first steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import OmegaConf

from sae_dist.cli import _compose
from sae_dist.config import TrainRunConfig, register_configs
from sae_dist.distributed import Topology
from sae_dist.hookpoints import decoder_stack
from sae_dist.train.loop import TrainingRun
from sae_dist.train.suite_trainer import SuiteTrainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=12, help="timed forward batches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "overrides",
        nargs="*",
        default=["experiment=demo"],
        help="Hydra overrides of conf/train.yaml",
    )
    return p.parse_args()


def compose_config(overrides: list[str], out_dir: str) -> TrainRunConfig:
    """conf/train.yaml plus the overrides, composed as `python -m sae_dist.train` does."""
    register_configs()
    cfg, _ = _compose("train", [*overrides, "logger=none", f"out_dir={out_dir}"])
    return OmegaConf.to_object(cfg)


@contextmanager
def truncated(model: torch.nn.Module, n_layers: int) -> Iterator[torch.nn.Module]:
    """The model's decoder stack cut to its first `n_layers` layers, restored on exit."""
    stack = decoder_stack(model)
    layers = stack.layers
    stack.layers = layers[:n_layers]
    try:
        yield stack
    finally:
        stack.layers = layers


def time_loop(run: TrainingRun, n_batches: int) -> tuple[dict[str, float], list, list]:
    """Runs forward batches of the training loop until the shuffle buffers released their
    first steps (warm-up), then `n_batches` timed ones; returns the seconds of each phase over
    the timed ones, their token batches and the SAE batches they popped."""
    seconds = dict.fromkeys(["producer", "buffers", "steps"], 0.0)
    token_batches, sae_batches = [], []
    timed = -1
    while timed < n_batches:
        batches = run.producer.next_batches()
        if batches is None or run.all_done():
            raise SystemExit("data or train.tokens ran out: raise train.tokens")
        t0 = time.perf_counter()
        acts = run.producer.activations(batches)
        t1 = time.perf_counter()
        run.distribute(acts)
        t2 = time.perf_counter()
        popped = []
        for _ in range(run.ready_steps()):
            popped.append(run.next_batches())
            run.trainer.step(popped[-1])
        t3 = time.perf_counter()
        if timed < 0 and run.trainer.step_count:
            timed = 0
        elif timed >= 0:
            timed += 1
            for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[key] += dt
            token_batches.append(batches)
            sae_batches += popped
    return seconds, token_batches, sae_batches


@torch.no_grad()
def time_bare_forward(run: TrainingRun, token_batches: list) -> float:
    """Seconds of plain forwards through the layers the producer runs, on the same batches."""
    deepest = max(hp.layer for hp in run.hookpoints) + 1
    total = 0.0
    with truncated(run.model, deepest) as stack:
        for batches in token_batches:
            ids = torch.cat([b.input_ids for b in batches.values()]).to(run.device)
            start = time.perf_counter()
            stack(input_ids=ids, use_cache=False)
            total += time.perf_counter() - start
    return total


def time_isolated_steps(run: TrainingRun, sae_batches: list) -> float:
    """Seconds of the same SAE steps by a fresh trainer, batches replayed from memory (one
    untimed warm-up step first)."""
    trainer = SuiteTrainer(run.hookpoints, run.cfg, run.cfg.model.d_model, run.accelerator)
    trainer.step(sae_batches[0])
    start = time.perf_counter()
    for batch in sae_batches:
        trainer.step(batch)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = compose_config(args.overrides, out_dir)
        run = TrainingRun(cfg, Topology(0, 1, 1))
        loop, token_batches, sae_batches = time_loop(run, args.batches)
        bare = time_bare_forward(run, token_batches)
        isolated = time_isolated_steps(run, sae_batches)
    lm_tokens = sum(b.input_ids.numel() for bs in token_batches for b in bs.values())
    loop_total = sum(loop.values())
    result = {
        "overrides": args.overrides,
        "threads": args.threads,
        "forward_batches": args.batches,
        "lm_tokens": lm_tokens,
        "sae_steps": len(sae_batches),
        "saes": len(run.hookpoints),
        "model_dtype": str(next(run.model.parameters()).dtype).removeprefix("torch."),
        "loop_s": loop,
        "loop_total_s": loop_total,
        "bare_forward_s": bare,
        "isolated_steps_s": isolated,
        "loop_lm_tokens_per_s": lm_tokens / loop_total,
        "bare_forward_lm_tokens_per_s": lm_tokens / bare,
        "capture_over_bare": loop["producer"] / bare,
        "overhead_ratio": loop_total / (bare + isolated),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
