"""Metrics and artifacts: W&B (offline when there are no credentials or network) plus a local
`metrics.jsonl` that is always written, so curves survive without W&B."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from sae_dist.config import LoggerConfig

log = logging.getLogger(__name__)


WandbMode = Literal["online", "offline", "disabled", "shared"]
"""The `mode` values `wandb.init` is typed with."""


def resolve_wandb_mode(mode: str) -> str:
    """`auto` -> online when an API key or a netrc login exists, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = (
        bool(os.environ.get("WANDB_API_KEY"))
        or (Path.home() / ".netrc").exists()
        and "api.wandb.ai" in (Path.home() / ".netrc").read_text()
    )
    return "online" if has_key else "offline"


class RunLogger:
    """Logs scalar dicts to metrics.jsonl and W&B; tables, images, SAE folders as artifacts.

    One history per run, also across restarts: a run resumed from a checkpoint at step
    `resume_step` keeps the metrics.jsonl rows up to that step (the later ones are recomputed),
    continues the same W&B run id, and in offline mode replays the kept rows into the new
    offline run directory, which then replaces the earlier ones: the newest offline run holds
    every logged step once. Online, W&B itself keeps the history of the resumed run."""

    def __init__(
        self,
        cfg: LoggerConfig,
        out_dir: Path,
        run_config: dict[str, Any],
        name: str,
        resume_step: int | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        history = _rewrite_history(self.out_dir / "metrics.jsonl", resume_step)
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run, closed by finish()
        self.cfg = cfg
        self.step = history[-1]["step"] if history else 0
        """The last step logged; tables and images are logged at it."""
        self.run = None
        if cfg.kind == "wandb":
            self.run = self._init_wandb(run_config, name, resume_step is not None)
            if self.run.offline:
                for row in history:
                    step = row.pop("step")
                    self.run.log(row, step=step)

    def _init_wandb(self, run_config: dict[str, Any], name: str, resumed: bool):
        import wandb  # only when a run logs to W&B: its import takes seconds

        mode = resolve_wandb_mode(self.cfg.mode)
        run_id = _run_id(self.out_dir, new=not resumed)
        run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=name,
            mode=cast(WandbMode, mode),  # wandb.init validates it
            dir=str(self.out_dir),
            config=run_config,
            resume="allow",
            id=run_id,
            settings=wandb.Settings(quiet=True),
        )
        current = Path(run.dir).parent.name
        for old in (self.out_dir / "wandb").glob(f"offline-run-*-{run_id}"):
            if old.name != current:  # superseded by the replay into the current directory
                shutil.rmtree(old, ignore_errors=True)
        log.info("W&B run %s (%s mode) in %s", run.id, mode, run.dir)
        return run

    @property
    def location(self) -> str:
        """Where the W&B run lives (URL online, directory offline), or 'disabled'."""
        if self.run is None:
            return "disabled"
        if self.run.offline:
            return str(Path(self.run.dir).parent)
        return self.run.url or "disabled"  # W&B's disabled mode has no URL

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        self.step = step
        run = self.run
        if run is not None:
            self._wandb(lambda: run.log(metrics, step=step))

    def log_table(
        self,
        name: str,
        results: dict[str, dict[str, Any]],
        columns: Sequence[str],
        key: str = "hookpoint",
    ) -> None:
        """A W&B table: one row per entry of `results` (its key in the first column, named
        `key`), one column per metric."""
        if self.run is None:
            return
        import wandb  # only when a run logs to W&B: its import takes seconds

        rows: list[Iterable[Any]] = [
            [hp, *(res.get(c) for c in columns)] for hp, res in results.items()
        ]
        self.run.log({name: wandb.Table(columns=[key, *columns], data=rows)}, step=self.step)

    def log_images(self, images: dict[str, Path]) -> None:
        """PNG files as W&B images, by key."""
        if self.run is None or not images:
            return
        import wandb  # only when a run logs to W&B: its import takes seconds

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=self.step)

    def log_sae_artifact(self, folder: Path, name: str, metadata: dict[str, Any]) -> None:
        """The SAE folder as a W&B model artifact, by reference (file:// with checksums): W&B
        copies nothing into a staging area."""
        if self.run is None or not self.cfg.log_artifacts:
            return
        import wandb  # only when a run logs to W&B: its import takes seconds

        artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
        artifact.add_reference(Path(folder).resolve().as_uri())
        self.run.log_artifact(artifact)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        self.jsonl.close()
        if self.run is not None:
            self._wandb(self.run.finish)

    def _wandb(self, call: Callable[[], Any]) -> None:
        """Run a W&B call. If the W&B service has gone (SLURM signals every process of a job
        step, the service included: wandb/wandb#9963), warn and leave W&B for the rest of
        this process: metrics.jsonl still gets every row, and a resumed run replays them."""
        try:
            call()
        except ConnectionError as e:
            log.warning(
                "W&B service lost (%s): metrics go on to metrics.jsonl only in this process", e
            )
            self.run = None


def _rewrite_history(path: Path, resume_step: int | None) -> list[dict[str, Any]]:
    """Keep the rows of metrics.jsonl with step <= resume_step, once per step (a fresh run,
    resume_step None, starts an empty file); returns the kept rows."""
    rows: dict[int, dict[str, Any]] = {}
    if resume_step is not None and path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if row.get("step", resume_step + 1) <= resume_step:
                rows[row["step"]] = row
    kept = [rows[step] for step in sorted(rows)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(path)
    return [dict(row) for row in kept]


def _run_id(out_dir: Path, new: bool) -> str:
    """The W&B run id stored in the run dir, so a resumed run continues the same W&B run; a
    fresh start (`new`) draws a new one."""
    path = out_dir / "wandb_run_id"
    if new or not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
