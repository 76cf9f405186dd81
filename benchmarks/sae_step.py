"""Tokens/s of one full SAE training step: forward, backward, parallel-grad removal, Adam step
and decoder renormalisation, for the sparse TopK kernels and the dense reference path.

    python benchmarks/sae_step.py                      # the figures in benchmarks/README.md
    python benchmarks/sae_step.py --paths sparse --autocast --dead-frac 0.5

Prints one Markdown table row per configuration (median of the timed steps after warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from sae_dist.config import sae_config
from sae_dist.sae import TopKSAE


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--paths", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    p.add_argument("--autocast", action="store_true", help="also run under bf16 autocast")
    p.add_argument("--dead-frac", type=float, default=0.0,
                   help="fraction of latents marked dead (adds the AuxK pass)")
    p.add_argument("--header", action="store_true", help="print the table header first")
    return p.parse_args()


def time_steps(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, bf16: bool,
               warmup: int, steps: int) -> float:
    """Median wall-clock seconds of one training step on batch x [B, d_in]."""
    sae.project_decoder_grads()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with ctx:
            out = sae(x, dead)
        opt.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        opt.step()
        sae.normalize_decoder()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    dead = torch.rand(args.d_sae) < args.dead_frac
    if args.header:
        print("| path | encoder matmul | dead latents (AuxK) | median step (ms) | tokens/s |")
        print("|---|---|---|---|---|")
    for bf16 in [False, True] if args.autocast else [False]:
        for path in args.paths:
            cfg = sae_config(d_sae=args.d_sae, k=args.k)
            sae = TopKSAE(cfg, args.d_in, sparse=path == "sparse")
            sec = time_steps(sae, x, dead, bf16, args.warmup, args.steps)
            print(f"| {path} | {'bf16 autocast' if bf16 else 'fp32'} | {int(dead.sum())} "
                  f"| {sec * 1e3:.0f} | {args.batch / sec:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
