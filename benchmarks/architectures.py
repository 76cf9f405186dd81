"""The four SAE architectures side by side on the embedded model, and their training-step speed.

    python benchmarks/architectures.py quality --out runs/arch_bench    # the README table
    python benchmarks/architectures.py speed                             # step time per arch

`quality` trains one SAE per architecture with the real entry point (`python -m sae_dist.train
experiment=demo`, SmolLM2-135M-Instruct, the same hookpoint, token budget, width and data) and
prints the held-out metrics of each suite.json (FVU, delta loss, L0, dead fraction) as a
Markdown table. JumpReLU aims at L0 = k through `sae.target_l0`, so that the TopK family and it
compare at the same sparsity; ReLU + L1 runs with its default coefficient.

`speed` times one full training step (forward, backward, parallel-grad removal, Adam step,
renormalisation; `sae_step.time_steps`) per architecture, with the sparse kernels and with the
dense reference path for the TopK family.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from sae_step import time_steps

from sae_dist.config import l0_overrides, sae_config
from sae_dist.sae import SAE_REGISTRY

ARCHS = ["topk", "batchtopk", "jumprelu", "relu"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("quality", help="train and evaluate every architecture")
    q.add_argument("--out", type=Path, default=Path("runs/arch_bench"))
    q.add_argument("--hookpoint", default="layers.12.resid")
    q.add_argument("--tokens", type=int, default=300_000)
    q.add_argument("--expansion", type=int, default=8)
    q.add_argument("--k", type=int, default=32)
    q.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    q.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    q.add_argument(
        "--reuse",
        action="store_true",
        help="read the runs already finished under --out instead of retraining",
    )
    s = sub.add_parser("speed", help="median training-step time per architecture")
    s.add_argument("--d-in", type=int, default=576)
    s.add_argument("--d-sae", type=int, default=4608)
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--batch", type=int, default=1024)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--steps", type=int, default=7)
    s.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    s.add_argument("--paths", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    return p.parse_args()


def train_command(args: argparse.Namespace, arch: str) -> list[str]:
    """The `python -m sae_dist.train` command line of one architecture's run."""
    overrides = [
        "experiment=demo",
        f"sites.hookpoints=[{args.hookpoint}]",
        f"sae={arch}",
        f"sae.expansion={args.expansion}",
        *l0_overrides(arch, args.k),
        f"train.tokens={args.tokens}",
        "logger=none",
        f"out_dir={args.out / arch}",
    ]
    return [sys.executable, "-m", "sae_dist.train", *overrides, *args.extra]


def quality(args: argparse.Namespace) -> None:
    """Train every architecture in turn (or, with --reuse, read a finished run), then print the
    table of held-out metrics."""
    rows = []
    for arch in args.archs:
        run_dir, cmd = args.out / arch, train_command(args, arch)
        if not (args.reuse and (run_dir / "bench.json").exists()):
            print("$", " ".join(cmd[1:]), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            (run_dir / "bench.json").write_text(
                json.dumps(
                    {"command": " ".join(cmd[1:]), "minutes": (time.perf_counter() - start) / 60}
                )
            )
        entry = json.loads((run_dir / "suite" / "suite.json").read_text())["saes"][0]
        rows.append((arch, entry, json.loads((run_dir / "bench.json").read_text())["minutes"]))
    print(
        "\n| architecture | FVU | delta loss (nats) | loss recovered | L0 | dead frac | "
        "run (min) |\n|---|---|---|---|---|---|---|"
    )
    for arch, e, minutes in rows:
        print(
            f"| {arch} | {e['fvu']:.4f} | {e['delta_loss']:.4f} | {e['loss_recovered']:.3f} | "
            f"{e['l0']:.1f} | {e['dead_frac']:.3f} | {minutes:.1f} |"
        )


def speed(args: argparse.Namespace) -> None:
    """One table row per architecture and decode path, at the same width and L0 (JumpReLU's
    thresholds are set so that each latent fires on k / d_sae of the batch)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    print("| architecture | decode | median step (ms) | tokens/s |\n|---|---|---|---|")
    for arch in args.archs:
        for path in args.paths if arch != "relu" else ["dense"]:
            sae = SAE_REGISTRY[arch](sae_config(arch, **arch_fields(arch, args)), args.d_in)
            sae.sparse = path == "sparse"
            if arch == "jumprelu":
                set_thresholds_for_l0(sae, x, args.k)
            sec = time_steps(sae, x, dead, False, args.warmup, args.steps)
            print(f"| {arch} | {path} | {sec * 1e3:.0f} | {args.batch / sec:,.0f} |", flush=True)


def arch_fields(arch: str, args: argparse.Namespace) -> dict:
    """Config keys of `arch` for width d_sae and L0 k."""
    if arch == "relu":
        return {"d_sae": args.d_sae}
    if arch == "jumprelu":
        return {"d_sae": args.d_sae, "target_l0": float(args.k)}
    return {"d_sae": args.d_sae, "k": args.k}


@torch.no_grad()
def set_thresholds_for_l0(sae: torch.nn.Module, x: torch.Tensor, k: int) -> None:
    """Each latent's threshold = its (1 - k / d_sae) quantile of pre-activations on x, so the
    mean L0 on x is about k."""
    pre = sae.pre_acts(x)
    rank = max(1, round(x.shape[0] * k / sae.d_sae))
    sae.log_threshold.copy_(pre.topk(rank, dim=0).values[-1].clamp_min(1e-6).log())


def main() -> None:
    args = parse_args()
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
