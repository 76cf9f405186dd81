"""`python -m sae_dist.export suite=<dir> format=<saelens|neuronpedia> out_dir=<dir>
release=<name> [repo_id=<owner/name>]` (conf/export.yaml): write a suite as a SAELens release
folder (`sae_dist.export.saelens`) or as Neuronpedia's upload layout
(`sae_dist.export.neuronpedia`).

The folder is built beside `out_dir` and renamed into place, so an interrupted export leaves
the previous one whole. `out_dir` may be new, empty, or an earlier export of the same format
(its pretrained_saes.yaml or neuronpedia.json), which is replaced; any other folder is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

from sae_dist.checkpoint import write_atomically
from sae_dist.config import ExportConfig
from sae_dist.errors import ConfigError
from sae_dist.export.neuronpedia import MANIFEST, export_neuronpedia
from sae_dist.export.saelens import YAML_FILE, export_saelens
from sae_dist.models import resolve_device
from sae_dist.suite import load_suite

MARKERS = {"saelens": YAML_FILE, "neuronpedia": MANIFEST}
"""The file an export of each format leaves at the top of out_dir."""


def validate_export(cfg: ExportConfig) -> None:
    """Checks before anything loads: the suite exists, out_dir may be written, the device."""
    if not Path(cfg.suite).exists():
        raise ConfigError("suite", cfg.suite, "an existing suite directory or SAE folder")
    out, suite = Path(cfg.out_dir).resolve(), Path(cfg.suite).resolve()
    if out == suite or out in suite.parents or suite in out.parents:
        raise ConfigError("out_dir", cfg.out_dir, "a folder neither inside nor around the suite")
    marker = MARKERS[cfg.format]
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise ConfigError(
            "out_dir",
            cfg.out_dir,
            f"a new or empty folder, or an earlier {cfg.format} export (with {marker})",
        )
    resolve_device(cfg.device, "device")


def run_export(cfg: ExportConfig) -> Path:
    """Write the export; returns out_dir."""
    validate_export(cfg)
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    if cfg.format == "saelens":
        suite = load_suite(cfg.suite, cfg.device, cfg.model)

        def write(tmp: Path) -> None:
            export_saelens(cfg, suite, tmp)

        summary = f"{len(suite.saes)} SAEs and {YAML_FILE} (release {cfg.release!r})"
    else:
        cfg.features.device = cfg.device

        def write(tmp: Path) -> None:
            export_neuronpedia(cfg, tmp)

        summary = f"the feature pages of every SAE ({MANIFEST})"
    write_atomically(out, write)
    print(f"Exported {summary} to {out} in {time.perf_counter() - start:.1f} s")
    return out
