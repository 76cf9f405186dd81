"""TopK, BatchTopK and JumpReLU at matched L0 on the same hookpoints, on the held-out metrics
and SAEBench's absorption and sparse probing (DESIGN.md section 8b).

    python benchmarks/saebench_metrics.py --out runs/saebench    # trains, evaluates, prints

For each architecture: `python -m sae_dist.train experiment=demo sites.hookpoints=[...]
sae=<arch>` at the same width, token budget and L0 (k for the TopK family, target_l0 for
JumpReLU), then `python -m sae_dist.evaluate ... eval.probes=[absorption,sparse_probing]` on
its suite. Prints one Markdown table (hookpoint x architecture): FVU, delta loss with its
clustered standard error, L0, dead and dense fractions, absorption, full absorption, dense and
k-sparse probe accuracies, and the wall minutes of each run. One run at a time; --reuse reads
finished runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sae_dist.config import l0_overrides

ARCHS = ["topk", "batchtopk", "jumprelu"]
COLUMNS = (
    "fvu",
    "delta_loss",
    "l0",
    "dead_frac",
    "dense_frac",
    "absorption",
    "full_absorption",
    "absorption_letters",
    "probe_dense_acc",
    "probe_k1_acc",
    "probe_k2_acc",
    "probe_k5_acc",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/saebench"))
    p.add_argument(
        "--hookpoints", nargs="+", default=["layers.6.resid", "layers.12.resid", "layers.12.mlp"]
    )
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    p.add_argument("--seed", type=int, default=0, help="train.seed (the evaluation is the same)")
    p.add_argument("--reuse", action="store_true", help="read finished runs under --out")
    return p.parse_args()


def commands(args: argparse.Namespace, arch: str) -> list[list[str]]:
    """The training and the evaluation command lines of one architecture."""
    run = args.out / arch
    train = [
        "experiment=demo",
        f"sites.hookpoints=[{','.join(args.hookpoints)}]",
        f"sae={arch}",
        f"sae.expansion={args.expansion}",
        *l0_overrides(arch, args.k),
        f"train.tokens={args.tokens}",
        f"train.seed={args.seed}",
        "train.eval_tokens=0",
        "logger=none",
        f"out_dir={run}",
    ]
    evaluate = [
        f"suite={run / 'suite'}",
        f"out_dir={run / 'eval'}",
        f"eval.tokens={args.eval_tokens}",
        "eval.probes=[absorption,sparse_probing]",
        "logger.mode=offline",
    ]
    return [
        [sys.executable, "-m", "sae_dist.train", *train],
        [sys.executable, "-m", "sae_dist.evaluate", *evaluate],
    ]


def run(args: argparse.Namespace, arch: str) -> dict:
    """Train and evaluate `arch` (unless --reuse finds it done); returns its bench.json."""
    bench = args.out / arch / "bench.json"
    if args.reuse and bench.exists():
        return json.loads(bench.read_text())
    record: dict = {"commands": [], "minutes": []}
    for cmd in commands(args, arch):
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        record["commands"].append(" ".join(cmd[1:]))
        record["minutes"].append((time.perf_counter() - start) / 60)
    bench.write_text(json.dumps(record, indent=2))
    return record


def cell(res: dict, key: str) -> str:
    value = res.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if key == "delta_loss":
        return f"{value:.4f} ± {res['delta_loss_se']:.4f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    args = parse_args()
    minutes = {arch: run(args, arch)["minutes"] for arch in args.archs}
    print(
        "\n| hookpoint | architecture | "
        + " | ".join(COLUMNS)
        + " | train + eval (min) |\n|---|---|"
        + "---:|" * (len(COLUMNS) + 1)
    )
    for hp in args.hookpoints:
        for arch in args.archs:
            res = json.loads((args.out / arch / "eval" / "saes" / f"{hp}.json").read_text())
            times = " + ".join(f"{m:.0f}" for m in minutes[arch])
            cells = " | ".join(cell(res, c) for c in COLUMNS)
            print(f"| {hp} | {arch} | {cells} | {times} |")


if __name__ == "__main__":
    main()
