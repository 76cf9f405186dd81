"""Stop signals (sae_dist.preemption) and a W&B service that a job's signal has ended: the
handlers only record, stay out of signals that something else handles, and are restored after
the loop; a lost W&B service does not end the run. The training paths: tests/train/test_train.py
(one process), tests/train/test_distributed.py (a signal to one of two processes),
tests/project/test_slurm.py (SLURM's own signals, on a real cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sae_dist.preemption import REQUEUE_EXIT, STOP_SIGNALS, StopSignals

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def handlers_restored():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_is_recorded_and_the_handlers_are_restored(sig):
    with StopSignals() as stop:
        assert stop.received is None and not stop.requested(multiprocess=False)
        os.kill(os.getpid(), sig)
        assert stop.received == sig and stop.requested(multiprocess=False)
    assert all(signal.getsignal(s) is signal.SIG_DFL for s in STOP_SIGNALS)


def test_a_signal_that_something_else_handles_keeps_its_handler():
    """submitit's jobs ride out SIGTERM with a handler of their own: it stays."""
    seen = []

    def theirs(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGTERM, theirs)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) is theirs
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is theirs


def test_exit_ends_with_the_requeue_code_and_ignores_further_signals(caplog):
    with pytest.raises(SystemExit) as stopped, StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        stop.exit("at step 3 of 9")
    assert stopped.value.code == REQUEUE_EXIT == 75
    assert "stopping on SIGTERM: checkpoint saved at step 3 of 9; exiting with 75" in caplog.text
    assert all(signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS)


WANDB_LOST = """
import os, signal, subprocess, sys, time
from pathlib import Path
from sae_dist.config import LoggerConfig
from sae_dist.tracking import RunLogger
out = Path(sys.argv[1])
logger = RunLogger(LoggerConfig(kind="wandb", mode="offline"), out, {}, name="lost")
logger.log({"a": 1.0}, step=1)
service = subprocess.run(["pgrep", "-P", str(os.getpid()), "wandb-core"], capture_output=True,
                         text=True).stdout.split()
assert len(service) == 1, service
os.kill(int(service[0]), signal.SIGTERM)  # as SLURM signals every process of a job step
time.sleep(2)
logger.log({"a": 2.0}, step=2)
logger.finish()
print("finished")
"""


def test_a_wandb_service_ended_by_the_jobs_signal_does_not_end_the_run(tmp_path):
    """SLURM signals every process of a job step, W&B's service (wandb-core) included, which
    then drops its connection (wandb/wandb#9963): logging warns and goes on into
    metrics.jsonl, and closing the run does not raise. The child starts its own service: a W&B
    run earlier in this pytest process leaves WANDB_SERVICE set, which would attach the child
    to the parent's service instead."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env |= {"PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", WANDB_LOST, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr[-3000:]
    assert "W&B service lost" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
