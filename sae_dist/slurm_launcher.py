"""Hydra multirun on SLURM: `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) is
hydra-submitit-launcher's SlurmLauncher (each point of the sweep one task of a SLURM job array)
with two additions (the launcher class itself is in hydra_plugins/sae_dist_launcher/, where
Hydra looks for launchers):

- job states from squeue where sacct fails (a cluster without accounting). submitit reads job
  states from sacct only; without them it learns that a job has ended from the job's result
  file alone, and waits forever for a job that died without writing one (killed, out of
  memory, cancelled). squeue lists ended jobs for MinJobAge seconds (300 by default); a job it
  no longer lists has ended too.
- a summary of the points once every job has returned: overrides, SLURM job id, status and
  the suite each wrote.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from sae_dist.checkpoint import SUITE_FILE, read_suite_index

log = logging.getLogger(__name__)

POLL_S = 60
"""Longest interval between two state queries of the running jobs (submitit's sacct default is
600 s); result files are checked every second."""
GONE = "NOT_IN_SQUEUE"
"""The state of a job squeue no longer lists (it ended over MinJobAge seconds ago)."""


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """submitit's watcher of SLURM job states: sacct while it works, squeue after it fails."""

    def __init__(self, delay_s: int = POLL_S) -> None:
        super().__init__(delay_s)
        self.sacct = True
        """False once sacct has failed: states come from squeue from then on."""

    def update(self) -> None:
        command = self._make_command()  # sacct's; None when no job is pending
        if command is None:
            return
        pending = self._registered - self._finished
        self._num_calls += 1
        if self.sacct:
            try:
                out = subprocess.run(command, capture_output=True, check=True)
                self._info_dict.update(self.read_info(out.stdout))
            except (OSError, subprocess.CalledProcessError) as e:
                stderr = getattr(e, "stderr", b"") or b""
                log.info(
                    "sacct failed (%s): job states come from squeue",
                    stderr.decode(errors="replace").strip() or e,
                )
                self.sacct = False
        if not self.sacct:
            self._info_dict.update(squeue_states(pending))
        self._last_status_check = time.time()
        self._finished |= {job for job in pending if self.is_done(job, mode="cache")}


def squeue_states(job_ids: set[str]) -> dict[str, dict[str, str]]:
    """{job id: {"State": state}} for submitit job ids ("123", or "123_4" for an array task)
    from squeue; GONE for a job it does not list; {} if squeue itself fails (no news)."""
    mains = sorted({job.split("_")[0] for job in job_ids})
    proc = subprocess.run(
        [
            "squeue",
            "--noheader",
            "--states=all",
            "--array",
            "--format=%i|%T",
            "--jobs=" + ",".join(mains),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        log.warning("squeue failed: %s", proc.stderr.strip())
        return {}
    listed = dict(line.split("|", 1) for line in proc.stdout.split())
    return {job: {"State": listed.get(job, GONE)} for job in job_ids}


def launch_watched(
    launch: Callable[[], Sequence[JobReturn]], sweep_dir: Path
) -> Sequence[JobReturn]:
    """Run hydra-submitit-launcher's `launch` with its jobs watched by SqueueFallbackWatcher
    (submitit's jobs share one watcher, a class attribute: it is swapped for the launch only),
    then print the summary of the points."""
    previous = SlurmJob.watcher
    SlurmJob.watcher = SqueueFallbackWatcher()
    try:
        returns = launch()
    finally:
        SlurmJob.watcher = previous
    print(summary(returns, sweep_dir))
    return returns


def summary(returns: Sequence[JobReturn], sweep_dir: Path) -> str:
    """One line per point of the sweep (the overrides that tell it from the others, its SLURM
    job, status and suite), after a header line."""
    done = sum(r.status == JobStatus.COMPLETED for r in returns)
    lines = [f"SLURM sweep in {sweep_dir}: {done} of {len(returns)} points completed"]
    points = [filter_overrides(r.overrides or []) for r in returns]
    shared = set.intersection(*map(set, points)) if len(points) > 1 else set()
    for r, point in zip(returns, points):
        assert r.hydra_cfg is not None  # set by hydra's run_job in every job
        job, output_dir = r.hydra_cfg.hydra.job, r.hydra_cfg.hydra.runtime.output_dir
        overrides = " ".join(o for o in point if o not in shared) or "(no overrides)"
        lines.append(
            f"  job{job.num} [SLURM {job.id}] {overrides}: {r.status.name}, "
            f"{_suite_line(Path(output_dir) / 'suite')}"
        )
    return "\n".join(lines)


def _suite_line(suite_dir: Path) -> str:
    """What a point's suite holds: its SAEs and their mean held-out FVU, if evaluated."""
    if not (suite_dir / SUITE_FILE).is_file():
        return "no suite"
    saes: list[dict[str, Any]] = read_suite_index(suite_dir)["saes"]
    fvus = [s["fvu"] for s in saes if s.get("fvu") is not None]
    quality = f"mean FVU {sum(fvus) / len(fvus):.4f}" if fvus else "not evaluated"
    return f"suite {suite_dir} ({len(saes)} SAEs, {quality})"
