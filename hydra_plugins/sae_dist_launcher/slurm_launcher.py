"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): hydra-submitit-launcher's
SlurmLauncher with job states from squeue where sacct fails and a summary of the points
(sae_dist.slurm_launcher). Defined only where hydra-submitit-launcher is installed (the
`cluster` extra); Hydra imports every module of `hydra_plugins` at start-up."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as SubmititSlurmLauncher,
    )
except ImportError:
    SubmititSlurmLauncher = None

if SubmititSlurmLauncher is not None:

    class SlurmLauncher(SubmititSlurmLauncher):
        """hydra-submitit-launcher's SlurmLauncher, launched by
        sae_dist.slurm_launcher.launch_watched."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from sae_dist.slurm_launcher import launch_watched

            assert self.config is not None  # set by Hydra's setup() before launch()
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            return launch_watched(
                lambda: super(SlurmLauncher, self).launch(job_overrides, initial_job_idx), sweep_dir
            )
