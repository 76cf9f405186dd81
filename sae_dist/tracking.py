"""Metrics and artifacts: W&B (offline when there are no credentials or network) plus a local
`metrics.jsonl` that is always written, so curves survive without W&B."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from sae_dist.config import LoggerConfig

log = logging.getLogger(__name__)


def resolve_wandb_mode(mode: str) -> str:
    """`auto` -> online when an API key or a netrc login exists, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text()
    return "online" if has_key else "offline"


class RunLogger:
    """Logs scalar dicts to metrics.jsonl and W&B; logs SAE folders as W&B artifacts."""

    def __init__(self, cfg: LoggerConfig, out_dir: Path, run_config: dict[str, Any], name: str):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a")
        self.cfg = cfg
        self.run = None
        if cfg.kind == "wandb":
            import wandb

            mode = resolve_wandb_mode(cfg.mode)
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=name, mode=mode,
                                  dir=str(self.out_dir), config=run_config, resume="allow",
                                  id=_run_id(self.out_dir))
            log.info("W&B run %s (%s mode) in %s", self.run.id, mode, self.run.dir)

    @property
    def location(self) -> str:
        """Where the W&B run lives (URL online, directory offline), or 'disabled'."""
        if self.run is None:
            return "disabled"
        return self.run.url or str(Path(self.run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_sae_artifact(self, folder: Path, name: str, metadata: dict[str, Any]) -> None:
        if self.run is None or not self.cfg.log_artifacts:
            return
        import wandb

        artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        self.jsonl.close()
        if self.run is not None:
            self.run.finish()


def _run_id(out_dir: Path) -> str:
    """A W&B run id stored in the run dir, so a resumed run continues the same W&B run."""
    path = out_dir / "wandb_run_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
