"""Entry point for the multi-process tests: `torchrun ... tests/train/dist_worker.py <overrides>`
runs `python -m sae_dist.train <overrides>`, optionally with a fault injected on one process.

SAE_DIST_TEST_FAULT="<rank>:<forward batch>:<kill|raise|usr1>" makes that process SIGKILL itself
(as `kill -9` would), raise, or send itself SIGUSR1 (SLURM's time-limit warning) and go on, just
before its n-th LM forward pass (1-based)."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sae_dist.producer import ActivationProducer  # noqa: E402
from sae_dist.train.__main__ import main  # noqa: E402


def inject_fault(spec: str) -> None:
    rank, at, kind = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    original, calls = ActivationProducer.activations, {"n": 0}

    def faulty(self, batches):
        calls["n"] += 1
        if calls["n"] == int(at):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "usr1":
                os.kill(os.getpid(), signal.SIGUSR1)
                return original(self, batches)
            raise RuntimeError(f"injected failure on rank {rank} at forward batch {at}")
        return original(self, batches)

    ActivationProducer.activations = faulty


if __name__ == "__main__":
    if os.environ.get("SAE_DIST_TEST_FAULT"):
        inject_fault(os.environ["SAE_DIST_TEST_FAULT"])
    main()
