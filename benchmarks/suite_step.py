"""Time of one training step of a whole suite (`SuiteTrainer.step`, the step of
`python -m sae_dist.train`: input scaling, forward, backward, clipping, fused Adam, decoder
renormalisation) with a given fraction of dead latents (AuxK on), on random inputs.

    python -m benchmarks.suite_step [--dead 0 0.01 0.1 0.4] [--steps 12] [overrides ...]

The suite is the one the overrides describe (default `experiment=demo`: 12 SAEs, d_in 576,
d_sae 4608, k 128, batch 512); every SAE gets its own [batch, d_in] Gaussian batch (x 3).
Dead latents: each latent of each SAE is drawn dead with probability `--dead` after the first
(calibrating) step and kept dead, so AuxK runs with `min(k_aux, n_dead)` latents. Prints one
JSON line per dead fraction: median and minimum milliseconds of `--steps` steps after
`--warmup`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from benchmarks.end_to_end import compose_config
from sae_dist.hookpoints import grid_hookpoints
from sae_dist.train.suite_trainer import SuiteTrainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--dead", type=float, nargs="+", default=[0.0, 0.01, 0.1, 0.4])
    p.add_argument("--steps", type=int, default=12, help="timed steps per dead fraction")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", default=["experiment=demo"])
    return p.parse_args()


def time_step(
    trainer: SuiteTrainer, batches: list[dict], dead: dict, warmup: int, steps: int
) -> list[float]:
    """Seconds of each of `steps` suite steps after `warmup` untimed ones, cycling `batches`;
    before each step the latents of `dead` ({name: bool [d_sae]}) are marked dead again (a
    step resets the counters of the latents that fired)."""
    times = []
    for i in range(warmup + steps):
        for name, mask in dead.items():
            trainer.tokens_since_fired[name][mask] = trainer.cfg.sae.dead_tokens
        start = time.perf_counter()
        trainer.step(batches[i % len(batches)])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = compose_config(args.overrides, out_dir)
    hookpoints = grid_hookpoints(cfg.sites, cfg.model.n_layers)
    d_in, batch = cfg.model.d_model, cfg.train.batch_size
    for dead in args.dead:
        torch.manual_seed(0)
        trainer = SuiteTrainer(hookpoints, cfg, d_in, Accelerator(cpu=True))
        batches = [{hp.name: torch.randn(batch, d_in) * 3 for hp in hookpoints} for _ in range(4)]
        trainer.step(batches[0])  # calibration and the first step
        masks = {n: torch.rand(c.shape) < dead for n, c in trainer.tokens_since_fired.items()}
        times = time_step(trainer, batches, masks, args.warmup, args.steps)
        print(
            json.dumps(
                {
                    "overrides": args.overrides,
                    "saes": len(hookpoints),
                    "batch": batch,
                    "dead_fraction": dead,
                    "threads": args.threads,
                    "median_ms": round(statistics.median(times) * 1e3, 1),
                    "min_ms": round(min(times) * 1e3, 1),
                    "tokens_per_s_per_sae": round(batch / statistics.median(times), 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
