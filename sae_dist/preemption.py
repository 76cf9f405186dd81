"""Stop training cleanly when the scheduler asks: on SIGUSR1 (the warning SLURM sends before the
time limit: `launch/slurm/train.sbatch` asks for it with `--signal=B:USR1@<s>`) or SIGTERM
(preemption, `scontrol requeue`, `scancel`, `docker stop`), every process finishes its current
step, the run saves a checkpoint at that step boundary and exits with `REQUEUE_EXIT`; the run
restarted on the same `out_dir` resumes from that checkpoint.

The handlers only record the signal. The training loop asks `StopSignals.requested` at each
step boundary; in a multi-process run that is a collective, so every process stops at the same
step even when the signal reaches them at different times. Outside the training loop the
previous handlers are in place (by default a signal ends the process, as before).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from sae_dist.distributed import all_min, barrier

if TYPE_CHECKING:
    from sae_dist.tracking import RunLogger

log = logging.getLogger(__name__)

REQUEUE_EXIT = 75
"""Exit code of a run that stopped on a signal after saving its checkpoint (EX_TEMPFAIL:
"try again later"); launch/slurm/train.sbatch requeues a job whose processes exit with it."""
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""The signals that ask a run to checkpoint and stop."""


class RequeueExit(SystemExit):
    """Ends the process with REQUEUE_EXIT once the stop checkpoint is saved."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT)


class StopSignals:
    """While entered (a context manager around the training loop), SIGUSR1 and SIGTERM set
    `received` instead of ending the process. Only a signal with the default handler is taken
    over (one that something else handles, such as submitit's jobs, which requeue on SIGUSR2
    and ride out SIGTERM, keeps its handler), and only from the main thread, where Python runs
    handlers."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        """The last stop signal this process received, None before any."""
        self._previous: dict[signal.Signals, Any] = {}
        """The handlers replaced, by signal (restored on exit)."""

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                s: signal.signal(s, self._record)
                for s in STOP_SIGNALS
                if signal.getsignal(s) is signal.SIG_DFL
            }
        if os.environ.get("SLURM_JOB_ID"):
            log.info(
                "SLURM job %s, SLURM_RESTART_COUNT=%s, node %s: on %s the run saves a "
                "checkpoint at the next step and exits with %d",
                os.environ["SLURM_JOB_ID"],
                os.environ.get("SLURM_RESTART_COUNT", 0),
                os.environ.get("SLURMD_NODENAME", "?"),
                "/".join(s.name for s in self._previous) or "no signal",
                REQUEUE_EXIT,
            )
        return self

    def __exit__(
        self, kind: type | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is not None and issubclass(kind, RequeueExit):
            return  # `exit` has set the signals to be ignored for the rest of the process
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def requested(self, multiprocess: bool) -> bool:
        """Whether any process has received a stop signal (a collective when `multiprocess`:
        every process must call it at the same step)."""
        return not all_min(int(self.received is None), multiprocess)

    def exit(self, progress: str, logger: RunLogger | None = None) -> NoReturn:
        """After the stop checkpoint: log, close `logger` (a RunLogger, main process), wait for
        every process, and raise RequeueExit. From here on the stop signals are ignored: a
        second one (srun ending the other processes once the first has exited) must not cut
        the exit short (Python resets its own handlers to the default as it shuts down)."""
        what = self.received.name if self.received else "another process's signal"
        log.warning(
            "stopping on %s: checkpoint saved %s; exiting with %d to be requeued",
            what,
            progress,
            REQUEUE_EXIT,
        )
        if logger is not None:
            logger.finish()
        barrier()
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        raise RequeueExit()
