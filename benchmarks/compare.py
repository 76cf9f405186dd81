"""sae_dist against EleutherAI sparsify and SAELens on one activation file, in one go: runs
`sae_step.py`, `sparsify_step.py` and `saelens_step.py` (each in its own environment) with the
same settings, in rotation (sae_dist, sparsify, saelens, sae_dist, ...) for --repeats rounds, and
prints a Markdown table (median tokens/s; metrics of the first run) with the load average seen
before and after every run.

    python benchmarks/compare.py --data ACTS.safetensors --key acts --d-sae 9216 --k 32 \\
        --batch 4096 --tokens 400000 --threads 2 --dtypes fp32 bf16

Environments: /work/envs/sparsify (torch==2.13.0, eai-sparsify==1.3.3, safetensors) and
/work/envs/saelens (torch==2.13.0, sae-lens, safetensors); override with --sparsify-python /
--saelens-python. The raw JSON lines are printed as they come (and saved with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import actsfile

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actsfile.add_args(p)
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=1, help="rounds over the three tools")
    p.add_argument(
        "--tools",
        nargs="+",
        default=["sae_dist", "sparsify", "saelens"],
        choices=["sae_dist", "sparsify", "saelens"],
    )
    p.add_argument("--sae-dist-python", default=sys.executable)
    p.add_argument("--sparsify-python", default="/work/envs/sparsify/bin/python")
    p.add_argument("--saelens-python", default="/work/envs/saelens/bin/python")
    p.add_argument("--out", type=Path, help="append the JSON lines to this file")
    args = p.parse_args()
    if not args.data:
        p.error("--data is required")
    return args


def command(args: argparse.Namespace, tool: str, dtype: str) -> list[str]:
    """The script command of `tool` with the shared settings."""
    script = {
        "sae_dist": "sae_step.py",
        "sparsify": "sparsify_step.py",
        "saelens": "saelens_step.py",
    }[tool]
    python = getattr(args, f"{tool}_python")
    cmd = [
        python,
        str(HERE / script),
        "--data",
        args.data,
        "--key",
        args.key,
        "--arch",
        args.arch,
        "--d-sae",
        str(args.d_sae),
        "--k",
        str(args.k),
        "--batch",
        str(args.batch),
        "--tokens",
        str(args.tokens),
        "--threads",
        str(args.threads),
        "--dtype",
        dtype,
        "--lr",
        str(args.lr or actsfile.default_lr(args.d_sae)),
    ]
    return cmd


def load() -> str:
    """The 1-minute load average."""
    return f"{os.getloadavg()[0]:.1f}"


def run(cmd: list[str]) -> dict:
    """Run one script and parse its JSON line (the last line of stdout)."""
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": cmd[cmd.index("--threads") + 1],
        "PYTHONPATH": str(HERE.parent),
    }  # sae_step.py imports this checkout's sae_dist
    before = load()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_before"], result["load_after"] = before, load()
    return result


def table(results: list[dict]) -> str:
    """Markdown: one row per (dtype, tool); median tokens/s over the repeats, its ratio to
    sparsify's, metrics of the first run, the loads seen."""
    rows = [
        "| tool | dtype | tokens/s (median) | runs | x sparsify | held-out FVU | L0 | "
        "dead frac | peak RSS (MB) | load before/after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dtype"], r["tool"]), []).append(r)
    for (dtype, tool), runs in groups.items():
        speed = statistics.median(r["tokens_per_s"] for r in runs)
        ref = groups.get((dtype, "sparsify"))
        ratio = f"{speed / statistics.median(r['tokens_per_s'] for r in ref):.2f}" if ref else ""
        first = runs[0]
        loads = ", ".join(f"{r['load_before']}/{r['load_after']}" for r in runs)
        rows.append(
            f"| {tool} | {dtype} | {speed:,.0f} | {len(runs)} | {ratio} | "
            f"{first['fvu']:.4f} | {first['l0']:.1f} | {first['dead_frac']:.3f} | "
            f"{first['peak_rss_mb']:,.0f} | {loads} |"
        )
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    results = []
    for dtype in args.dtypes:
        for _ in range(args.repeats):
            for tool in args.tools:
                result = run(command(args, tool, dtype))
                print(json.dumps(result), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(result) + "\n")
                results.append(result)
    print(table(results))


if __name__ == "__main__":
    main()
