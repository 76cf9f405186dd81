"""First-hour check of a new machine: an all-reduce across its GPUs (NCCL), then one DDP step,
one ZeRO-3 step and one bf16 step of the project's SAE trainer (`SuiteTrainer` under
`make_accelerator`, as `sae_dist.train` runs them) on the demo's shapes, each with its time,
peak memory and a numerical check, printed as one table. Without GPUs the same steps run in 2
CPU processes on gloo, and ZeRO-3, which DeepSpeed runs on CUDA only, is reported as skipped.

    python -m sae_dist.gpu_check [--processes N] [--steps S] [--out table.json] [key=value ...]
    bash launch/gpu_check.sh ...

Every check runs in its own single-node `torchrun --nproc_per_node N` (N = the GPU count, or
2 on CPU), so a failing or hanging check (`--timeout`) is reported and the next one still runs.
The trainer checks compose `experiment=demo` (12 TopK SAEs, 576 x 4608, k = 128, global batch 512
tokens) with `trainer=ddp` (float32 step), `trainer=zero3` (its config: bf16) and `trainer=ddp
trainer.mixed_precision=bf16`; trailing `key=value` arguments are Hydra overrides of all three
(e.g. `sites.layers=[6]` for 3 SAEs). Their activations are random normal rows: the steps are
the trainer's real ones, the losses are not the demo's.

Columns: `first s` is the first call (all-reduce: communicator set-up; trainer: the input-scale
calibration and the DDP / DeepSpeed wrapping), `step s` the median of the next `--steps` calls,
`peak MB` the largest over processes of the CUDA memory allocated during the check (GPU) or of
the process's peak resident memory, Python and torch included (CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_dist.cli import CONF_DIR
from sae_dist.config import TopKConfig, TrainRunConfig, register_configs, validate
from sae_dist.hookpoints import grid_hookpoints
from sae_dist.models import resolve_mixed_precision
from sae_dist.train.loop import make_accelerator
from sae_dist.train.suite_trainer import SuiteTrainer

ALLREDUCE_MIB = {"cuda": 256, "cpu": 16}
"""Size of the all-reduced float32 tensor per process, in MiB."""
TRAINER_CHECKS = {
    "ddp": ["trainer=ddp", "trainer.mixed_precision=no"],
    "zero3": ["trainer=zero3"],
    "bf16": ["trainer=ddp", "trainer.mixed_precision=bf16"],
}
"""Hydra overrides (on top of `experiment=demo`) of each trainer check."""
CHECKS = ["allreduce", *TRAINER_CHECKS]
NEEDS_CUDA = {"zero3"}


@dataclass
class Row:
    """One line of the table."""

    check: str
    status: str
    """`ok`, `FAIL: <why>` or `skipped: <why>`."""
    processes: int
    backend: str
    first_s: float | None = None
    step_s: float | None = None
    peak_mb: float | None = None
    detail: str = ""


# ------------------------------------------------------------------------------ the driver


def main(argv: list[str] | None = None) -> int:
    """Run every check (or, with `--worker`, be one process of one check); exit code 1 when a
    check failed."""
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    cuda = torch.cuda.is_available()
    processes = args.processes or torch.cuda.device_count() or 2
    rows = []
    for check in CHECKS:
        if check in NEEDS_CUDA and not cuda:
            rows.append(Row(check, "skipped: needs CUDA", processes, "-"))
            continue
        print(f"gpu_check: {check} on {processes} processes ...", file=sys.stderr, flush=True)
        rows.append(launch(check, processes, args))
        print(f"gpu_check: {check}: {rows[-1].status}", file=sys.stderr, flush=True)
    print(format_table(rows, device_name()))
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return int(any(r.status.startswith("FAIL") for r in rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sae_dist.gpu_check", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="processes per check (default: the GPU count, 2 without GPUs)",
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="timed calls after the first one (default 5)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds one check may take (default 600)"
    )
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    parser.add_argument("--worker", choices=CHECKS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Hydra overrides of the trainer checks' config",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def launch(check: str, processes: int, args: argparse.Namespace) -> Row:
    """One check under torchrun; its row (FAIL with the root cause from its log if it
    failed)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        result, log = Path(tmp) / "row.json", Path(tmp) / "log.txt"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={processes}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "sae_dist.gpu_check",
            "--worker",
            check,
            "--result",
            str(result),
            "--steps",
            str(args.steps),
            "--timeout",
            str(args.timeout),
            *args.overrides,
        ]
        env = dict(os.environ)
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        with log.open("w") as out:
            code = run_with_timeout(command, env, out, args.timeout)
        if code is None:
            return Row(check, f"FAIL: no result after {args.timeout:g} s", processes, "-")
        if code != 0 or not result.exists():
            return Row(
                check, f"FAIL: exit code {code}: {last_error(log.read_text())}", processes, "-"
            )
        return Row(**json.loads(result.read_text()))


def run_with_timeout(
    command: list[str], env: dict[str, str], out: IO[str], timeout: float
) -> int | None:
    """Exit code of `command` (stdout and stderr to `out`), or None when it ran past `timeout`
    seconds: then it is killed with all its processes (torchrun's workers too, in its own
    session)."""
    process = subprocess.Popen(
        command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the check's rendezvous (one node: its processes
    meet on the loopback address, which works where the host name does not resolve)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: )?(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.+)$")
"""The last line of a Python traceback, `[module.]Name: message` (torchrun prefixes a worker's
lines with `[rank<i>]: `)."""


def last_error(text: str) -> str:
    """The root cause in a failed check's log: the first exception a process raised (`Name:
    message`, before torchrun's own ChildFailedError), else the log's last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        match = EXCEPTION_LINE.match(line)
        if match:
            return f"{match[1]}: {match[2]}"[:300]
    return (lines or ["no output"])[-1][:300]


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores), no CUDA"


def format_table(rows: list[Row], device: str) -> str:
    """The rows as a Markdown table under a line naming the machine and torch."""

    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"gpu_check on {device}; torch {torch.__version__}",
        "",
        "| check | status | processes | backend | first s | step s | peak MB | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.check} | {r.status} | {r.processes} | {r.backend} | "
            f"{num(r.first_s, 4)} | {num(r.step_s, 4)} | {num(r.peak_mb, 0)} | "
            f"{r.detail} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the workers


def run_worker(args: argparse.Namespace) -> None:
    """One process of one check under torchrun (any process count, 1 included); the main
    process writes the row to `args.result`."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.worker == "allreduce":
        row = check_allreduce(args.steps)
    else:
        row = check_trainer(args.worker, args.steps, args.overrides)
    row.peak_mb = global_max(peak_memory_mb())
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(asdict(row)))
    dist.barrier()
    dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def timed(call: Callable[[], object]) -> float:
    """Seconds `call` takes, device work included."""
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb() -> float:
    """CUDA: the most memory allocated since the check began; CPU: the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def global_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def global_spread(value: float) -> float:
    """max - min of `value` over the processes."""
    return global_max(value) + global_max(-value)


def check_allreduce(steps: int) -> Row:
    """All-reduce (sum) of a float32 tensor filled with rank + 1 on every process; every
    element must come back as N(N+1)/2 on every process. Bus bandwidth as nccl-tests reports it:
    bytes / time x 2(N-1)/N."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mib = ALLREDUCE_MIB[device().type]
    x = torch.empty(mib * 2**20 // 4, device=device())
    expected, wrong, times = world * (world + 1) / 2, 0, []
    for _ in range(steps + 1):
        x.fill_(rank + 1)
        times.append(timed(lambda: dist.all_reduce(x)))
        wrong += int((x != expected).sum())
    wrong = int(global_max(float(wrong)))
    step = statistics.median(times[1:])
    busbw = mib * 2**20 / step * 2 * (world - 1) / world / 1e9
    status = "ok" if wrong == 0 else f"FAIL: {wrong} elements differ from {expected:g}"
    return Row(
        "allreduce",
        status,
        world,
        dist.get_backend(),
        times[0],
        step,
        detail=f"{mib} MiB float32 per process, sum checked; bus bandwidth "
        + (f"{busbw:.2f} GB/s" if world > 1 else "n/a (1 process)"),
    )


def check_trainer(check: str, steps: int, overrides: list[str]) -> Row:
    """`1 + steps` steps of the trainer on random activations [batch / N, d_model] per
    hookpoint, then the folded SAEs as the end of a run collects them. Checks: finite losses,
    the same loss on every process, the parameters identical on every process (gathered under
    ZeRO-3) and changed by the steps, finite folded SAEs."""

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = compose_demo([*TRAINER_CHECKS[check], *overrides])
    accelerator = make_accelerator(cfg, world)
    hookpoints = grid_hookpoints(cfg.sites, cfg.model.n_layers)
    trainer = SuiteTrainer(hookpoints, cfg, cfg.model.d_model, accelerator, world)
    local = cfg.train.batch_size // world
    gen = torch.Generator().manual_seed(rank)
    batches = [
        {
            hp.name: torch.randn(local, cfg.model.d_model, generator=gen).to(device())
            for hp in hookpoints
        }
        for _ in range(steps + 1)
    ]
    before = parameter_checksum(trainer)
    losses: list[float] = []

    def step(batch: dict[str, torch.Tensor]) -> None:
        metrics = trainer.step(batch)
        losses.append(sum(float(m["loss"]) for m in metrics.values()))

    times = [timed(lambda b=b: step(b)) for b in batches]
    after = parameter_checksum(trainer)
    folded = trainer.folded_saes()
    problems = []
    if not all(math.isfinite(v) for v in losses):
        problems.append(f"non-finite loss {losses}")
    if global_spread(losses[-1]) > 1e-4 * abs(losses[-1]):
        problems.append("the loss differs between processes")
    if global_spread(after) > 1e-6 * abs(after):
        problems.append("the parameters differ between processes")
    if after == before:
        problems.append("the steps left the parameters unchanged")
    if not all(torch.isfinite(p).all() for sae in folded.values() for p in sae.parameters()):
        problems.append("non-finite folded SAE weights")
    sae, memory = trainer.sae(hookpoints[0].name), trainer.memory_mb()
    precision = resolve_mixed_precision(cfg.trainer.mixed_precision, device())
    assert isinstance(cfg.sae, TopKConfig)  # experiment=demo: TopK SAEs
    detail = (
        f"SAEs: {len(hookpoints)} x {sae.d_in}x{sae.d_sae} k={cfg.sae.k}, batch "
        f"{cfg.train.batch_size} ({local}/process), mixed precision {precision}; loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}; SAE params {memory['sae_params_mb']:.0f} MB "
        f"+ optimizer {memory['optimizer_mb']:.0f} MB per process"
    )
    status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    return Row(
        check,
        status,
        world,
        dist.get_backend(),
        times[0],
        statistics.median(times[1:]),
        detail=detail,
    )


def compose_demo(overrides: list[str]) -> TrainRunConfig:
    """The validated TrainRunConfig of `experiment=demo` with `overrides` (no model is
    loaded)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        composed = compose(
            "train", overrides=["experiment=demo", "logger=none", "out_dir=unused", *overrides]
        )
    cfg = OmegaConf.to_object(composed)
    assert isinstance(cfg, TrainRunConfig)
    validate(cfg)
    return cfg


def parameter_checksum(trainer) -> float:
    """Sum of every SAE parameter of this process (in float64), gathered from the partitions
    under ZeRO-3."""
    params = list(trainer.suite.parameters())
    if trainer.zero_stage == 3 and trainer.engine is not None:
        import deepspeed  # only under ZeRO: its import takes seconds and probes the accelerator

        with deepspeed.zero.GatheredParameters(params):
            return sum(float(p.double().sum()) for p in params)
    return sum(float(p.double().sum()) for p in params)


if __name__ == "__main__":
    sys.exit(main())
