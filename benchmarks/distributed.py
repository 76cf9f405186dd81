"""Training throughput and memory per process: 1 vs 2 processes, data parallel (DDP, ZeRO-2)
and hookpoint sharded, on the embedded model (issue 5).

Each configuration is a real `python -m sae_dist.train` run (torchrun for 2 processes) of the
demo suite (12 SAEs) for `--tokens` tokens per SAE; the figures come from the run's
`train_stats.json`: training wall time (model load excluded; no end-of-run evaluation), LM
tokens (passing the train mask) per second over all processes, and per process its peak
resident memory and the memory of its SAEs (parameters; what the optimizer steps plus Adam
moments). Quality: the held-out FVU of the first run's SAEs (`python -m sae_dist.evaluate`,
reconstruction metrics). `data_shards=2` in one process has the data order of the 2-process
runs.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py --tokens 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "single, 1 process": (1, ["trainer=single"]),
    "single, 1 process, data_shards=2": (1, ["trainer=single", "train.data_shards=2"]),
    "ddp, 2 processes": (2, ["trainer=ddp"]),
    "zero2, 2 processes": (2, ["trainer=zero2"]),
    "sharded, 2 processes": (2, ["trainer=sharded"]),
}


def run(processes: int, overrides: list[str], out_dir: Path, tokens: int) -> dict:
    """One training run; returns its train_stats.json."""
    threads = str(2 // processes)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "DS_ACCELERATOR": "cpu"}
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        if processes > 1
        else [sys.executable]
    )
    cmd = [
        *launcher,
        "-m",
        "sae_dist.train",
        "experiment=demo",
        "logger=none",
        f"train.tokens={tokens}",
        "train.eval_tokens=0",
        f"out_dir={out_dir}",
        *overrides,
    ]
    print(" ".join(cmd[-8:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return json.loads((out_dir / "train_stats.json").read_text())


def held_out_fvu(out_dir: Path, tokens: int) -> dict[str, float]:
    """{hookpoint: FVU} of a run's suite on held-out tokens (`python -m sae_dist.evaluate`,
    reconstruction only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_dist.evaluate",
            f"suite={out_dir / 'suite'}",
            f"eval.tokens={tokens}",
            "eval.model_level=false",
            "logger=none",
            f"out_dir={out_dir / 'eval'}",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    return {
        p.stem: json.loads(p.read_text())["fvu"]
        for p in sorted((out_dir / "eval" / "saes").glob("*.json"))
    }


def summarize(stats: list[dict]) -> dict:
    """Median tokens/s and, per process, the median memory figures."""
    out = {
        "lm_tokens_per_s": statistics.median(s["lm_train_tokens_per_s"] for s in stats),
        "train_seconds": statistics.median(s["train_seconds"] for s in stats),
    }
    for key in stats[0]:
        if key.startswith("process") and "/" in key:
            out[key] = statistics.median(s[key] for s in stats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=8000,
        help="held-out tokens for the FVU of each configuration's first run",
    )
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            processes, overrides = CONFIGS[name]
            dirs = [Path(tmp) / f"{len(rows)}-{i}" for i in range(args.repeats)]
            stats = [run(processes, overrides, d, args.tokens) for d in dirs]
            rows[name] = summarize(stats)
            fvu = held_out_fvu(dirs[0], args.eval_tokens)
            rows[name]["mean_fvu"] = statistics.mean(fvu.values())
            rows[name]["fvu"] = fvu
            print(name, json.dumps(rows[name]), flush=True)
    print(
        "\n| configuration | LM tokens/s (all processes) | held-out FVU (mean of 12) | "
        "process | peak RSS (MB) | SAE params (MB) | optimizer (MB) |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for name, row in rows.items():
        ranks = sorted({k.split("/")[0] for k in row if k.startswith("process") and "/" in k})
        for i, rank in enumerate(ranks):
            rate = f"{row['lm_tokens_per_s']:,.0f}" if i == 0 else ""
            fvu = f"{row['mean_fvu']:.4f}" if i == 0 else ""
            print(
                f"| {name if i == 0 else ''} | {rate} | {fvu} | {rank[7:]} | "
                f"{row[rank + '/peak_rss_mb']:,.0f} | {row[rank + '/sae_params_mb']:,.1f} | "
                f"{row[rank + '/optimizer_mb']:,.1f} |"
            )


if __name__ == "__main__":
    main()
