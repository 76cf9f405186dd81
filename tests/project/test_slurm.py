"""SLURM for real, on a local cluster (marked `cluster`): ../shared/cluster/slurm/start.sh starts
slurmctld and two emulated compute nodes n1, n2 on this host (fake GPUs, a partition `high`
that preempts `main` with requeue, no accounting, so no sacct), and what this module started it
stops. Skipped, with the reason, where the machine cannot run it: not root, no cluster scripts,
SLURM packages not installable (no package mirror).

- launch/slurm/train.sbatch with one GPU per node trains with one rank per node (gloo, the nodes
  have no CUDA) and writes the suite a local 2-process DDP run writes;
- a job warned of its time limit, then preempted by a job in `high`, is requeued twice and ends
  with the weights and Adam state of an uninterrupted job, bit for bit, and one W&B run that
  holds every step once;
- a Hydra multirun through submitit runs as a job array and prints a summary, and a point whose
  job dies without a result ends the sweep with an error instead of a wait.

Jobs are followed with `scontrol show job` (`sbatch --wait` polls at growing intervals: up to
~20 s late here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sae_dist.checkpoint import CheckpointError, load_part, load_suite_sae, read_suite_index
from tests.train.test_distributed import assert_same_saes
from tests.train.test_train import assert_same_final_state, wandb_history_steps

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT.parent / "shared" / "cluster" / "slurm"
SBATCH = str(ROOT / "launch" / "slurm" / "train.sbatch")
RESOURCES = ["--nodes", "2", "--gpus-per-node", "1", "--cpus-per-task", "1", "--mem", "3G"]
RUN = [
    "model=tiny-qwen3",
    "sites=resid",
    "trainer=ddp",
    "logger=none",
    "train.tokens=20000",
    "train.eval_tokens=0",
]
"""The README's sbatch example (section "Clusters"): 4 SAEs, 4 steps."""
LONG_RUN = [*RUN, "train.tokens=160000", "train.checkpoint_every=5"]
"""39 steps (from the 8th forward batch on, once the shuffle buffers are full), a checkpoint
every 5 forward batches: long enough to be stopped twice."""
HOOKPOINTS = [f"layers.{i}.resid" for i in range(4)]
GUARD_S = 900
"""Hang guard for a job or a command (not a speed limit): far above any run here."""
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


@pytest.fixture(scope="module")
def slurm():
    """The local cluster: started unless it runs already, stopped afterwards if started here."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages, starts daemons)")
    if not (CLUSTER / "start.sh").is_file():
        pytest.skip(f"no cluster scripts in {CLUSTER} (shared/ beside the checkout)")
    running = (
        bool(shutil.which("sinfo"))
        and subprocess.run(["sinfo"], capture_output=True).returncode == 0
    )
    if not running:
        start = subprocess.run(
            [str(CLUSTER / "start.sh")], capture_output=True, text=True, timeout=GUARD_S
        )
        if start.returncode != 0:
            tail = (start.stdout + start.stderr).strip()[-800:]
            if not shutil.which("slurmctld"):
                pytest.skip(f"SLURM packages could not be installed (no package mirror?): {tail}")
            subprocess.run([str(CLUSTER / "stop.sh")], capture_output=True, timeout=GUARD_S)
            pytest.fail(f"the local SLURM cluster did not start: {tail}")
    yield
    if not running:
        subprocess.run([str(CLUSTER / "stop.sh")], check=True, capture_output=True, timeout=GUARD_S)


def job_env() -> dict[str, str]:
    """The jobs' environment (sbatch passes the submitter's on): this checkout's sae_dist, the
    running virtual environment, one thread per process (the emulated nodes share this host's
    cores: more threads than cores spin and run many times slower)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if sys.prefix != sys.base_prefix:
        env["SAE_DIST_VENV"] = sys.prefix
    else:
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def submit(*args: str, log: Path) -> str:
    """sbatch from the repository root; returns the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", *args],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def field(job: str, name: str) -> str:
    """One field of `scontrol show job` (kept MinJobAge = 300 s after the job ends)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
    ).stdout
    found = re.search(rf"\b{name}=(\S+)", out)
    return found.group(1) if found else ""


def wait_until(ready: Callable[[], bool], what: str) -> None:
    start = time.monotonic()
    while not ready():
        assert time.monotonic() - start < GUARD_S, f"no {what} after {GUARD_S} s"
        time.sleep(0.5)


def wait_ended(job: str, log: Path) -> str:
    """Wait for the job to end; its final state (asserted COMPLETED with exit code 0)."""
    wait_until(lambda: field(job, "JobState") in ENDED, f"end of job {job}")
    state = field(job, "JobState")
    text = log.read_text() if log.exists() else "(no log)"
    assert (state, field(job, "ExitCode")) == ("COMPLETED", "0:0"), text[-4000:]
    return text


def forward_batches(out_dir: Path) -> int:
    """Forward batches in the run's last checkpoint (0 before the first)."""
    try:
        return load_part(out_dir / "checkpoint", "run.pt")["forward_batches"]
    except (CheckpointError, OSError, EOFError, RuntimeError):  # none yet, or being replaced
        return 0


def local_ddp(overrides: list[str], out_dir: Path) -> subprocess.Popen:
    """The same run as 2 local processes (torchrun, gloo), started in the background (while a
    job runs: both take minutes, mostly start-up and waits); output in out_dir.log."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out_dir}.log", "w") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "sae_dist.train",
                *overrides,
                f"out_dir={out_dir}",
            ],
            cwd=ROOT,
            env=job_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_local(proc: subprocess.Popen, out_dir: Path) -> None:
    assert proc.wait(timeout=GUARD_S) == 0, Path(f"{out_dir}.log").read_text()[-3000:]


def test_sbatch_trains_one_rank_per_node_like_a_local_ddp_run(slurm, tmp_path):
    """The README's line as it is, `--wait` included (its exit code is the job's)."""
    out, log = tmp_path / "slurm", tmp_path / "job.out"
    sbatch = subprocess.Popen(
        ["sbatch", *RESOURCES, "--wait", f"--output={log}", SBATCH, *RUN, f"out_dir={out}"],
        cwd=ROOT,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    local = tmp_path / "local"
    wait_local(local_ddp(RUN, local), local)
    output = sbatch.communicate(timeout=GUARD_S)[0]
    text = log.read_text()
    assert sbatch.returncode == 0, output + text[-3000:]
    submitted = re.search(r"Submitted batch job (\d+)", output)
    assert submitted and field(submitted.group(1), "JobState") == "COMPLETED", output
    assert "n[1-2], 2 x 1 processes" in text
    ranks = re.findall(r"^rank (\d+) of (\d+) on node (\w+)", text, re.M)
    assert sorted(ranks) == [("0", "2", "n1"), ("1", "2", "n2")], text[-3000:]
    assert "process 0 of 2 (gloo)" in text and "process 1 of 2 (gloo)" in text
    index = read_suite_index(out / "suite")
    assert (index["trainer"], index["processes"], index["data_shards"]) == ("ddp", 2, 2)
    assert_same_saes(local, out, HOOKPOINTS)


def test_a_warned_then_preempted_job_resumes_to_the_uninterrupted_weights(slurm, tmp_path):
    out, log = tmp_path / "stopped", tmp_path / "stopped.out"
    job = submit(
        *RESOURCES,
        SBATCH,
        *LONG_RUN,
        "logger=wandb",
        "logger.mode=offline",
        f"out_dir={out}",
        log=log,
    )
    reference = tmp_path / "reference"  # uninterrupted, the same 2 processes (local: the job
    uninterrupted = local_ddp(LONG_RUN, reference)  # holds both nodes; a local run is bitwise
    # the same as a job, tested above within tolerance, measured to 0.0)
    # The time-limit warning: SIGUSR1 to the batch script, as --signal=B:USR1@300 sends it.
    wait_until(lambda: forward_batches(out) >= 10, "second checkpoint")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
    wait_until(lambda: "stopping on SIGUSR1" in log.read_text(), "stop on SIGUSR1")
    at_warning = forward_batches(out)
    wait_until(
        lambda: "restart 1:" in log.read_text() and forward_batches(out) > at_warning,
        "checkpoint after the first restart",
    )
    # Preemption: a job in the high-priority partition that needs both nodes.
    high_log = tmp_path / "high.out"
    high = submit(
        "--partition=high",
        "--nodes=2",
        "--exclusive",
        "--wrap=echo high ran on $SLURM_JOB_NODELIST",
        log=high_log,
    )
    text = wait_ended(job, log)
    assert "high ran on n[1-2]" in wait_ended(high, high_log)
    wait_local(uninterrupted, reference)
    assert field(job, "Restarts") == "2"
    for restart in range(3):
        assert f"job {job} restart {restart}: nodes n[1-2]" in text
    assert "SLURM_RESTART_COUNT=2" in text  # the trainer's log, too
    assert text.count("requeued (resumes from its checkpoint)") == 2
    stops = dict(
        re.findall(
            r"stopping on (SIGUSR1|SIGTERM): checkpoint saved at step (\d+) "
            r"of 39",
            text,
        )
    )
    assert set(stops) == {"SIGUSR1", "SIGTERM"}, text[-4000:]
    assert 0 < int(stops["SIGUSR1"]) < int(stops["SIGTERM"]) < 39
    assert_same_final_state(reference, out, HOOKPOINTS, 39)
    # One W&B run, with every logged step once.
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith((out / "wandb_run_id").read_text().strip())
    rows = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(row)["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 39 * 4096
    assert wandb_history_steps(runs[0]) == steps


SWEEP = [
    "-m",
    "hydra/launcher=slurm",
    *(o for o in RUN if o != "trainer=ddp"),
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
"""A multirun on the local cluster: one CPU per point (the nodes have 4)."""


def sweep(out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_dist.train", *SWEEP, f"out_dir={out_dir}", *overrides],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=GUARD_S,
    )


def test_a_multirun_runs_as_a_job_array_and_summarises_the_points(slurm, tmp_path):
    proc = sweep(tmp_path, "sae.k=8,16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SLURM sweep in {tmp_path}: 2 of 2 points completed" in proc.stdout
    points = re.findall(
        r"^  job(\d) \[SLURM (\d+)_(\d)\] sae\.k=(\d+): COMPLETED, suite (\S+) "
        r"\(4 SAEs, not evaluated\)$",
        proc.stdout,
        re.M,
    )
    assert [(n, task, k) for n, _, task, k, _ in points] == [("0", "0", "8"), ("1", "1", "16")]
    assert len({array for _, array, _, _, _ in points}) == 1  # one array job, two tasks
    for num, _, _, k, suite in points:
        assert suite == str(tmp_path / f"job{num}" / "suite")
        sae, _ = load_suite_sae(Path(suite), "layers.0.resid")
        assert sae.k == int(k)
    assert "job states come from squeue" in proc.stdout + proc.stderr  # no sacct here


def test_a_sweep_point_that_dies_without_a_result_ends_the_sweep_with_its_error(slurm, tmp_path):
    """The job's script fails before the point runs: no result file and no sacct, so submitit
    alone would wait forever; squeue tells the job FAILED."""
    proc = sweep(tmp_path, "sae.k=8", "hydra.launcher.setup=['exit 3']")
    assert proc.returncode != 0
    assert "has not produced any output (state: FAILED)" in proc.stderr, proc.stderr[-3000:]
