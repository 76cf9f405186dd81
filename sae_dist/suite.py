"""Open a saved suite: find its SAE folders, the model they belong to, and load them.

A suite is a directory with `suite.json` (written by training), one SAE folder in the SAELens
layout (`cfg.json` + `sae_weights.safetensors`), or a folder of such folders (DESIGN.md section
6). `load_suite` is the one way evaluation, the feature browser, steering and the studies open
one: it resolves the device, the model config, every hookpoint, and checks each SAE's width
against the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sae_dist.checkpoint import CFG_FILE, CheckpointError, load_sae, read_suite_index
from sae_dist.cli import CONF_DIR
from sae_dist.config import DataConfig, ModelConfig
from sae_dist.errors import ConfigError
from sae_dist.hookpoints import Hookpoint
from sae_dist.models import resolve_device
from sae_dist.sae import SparseAutoencoder

logger = logging.getLogger(__name__)

DOCUMENT_ORDER_KEYS = ("seed", "shuffle", "reserved_frac", "holdout_every")
"""The data keys that, with the source, decide which documents are held out from training."""


@dataclass
class LoadedSuite:
    """A suite's SAEs on one device, keyed by hookpoint (sorted by layer, then site), and what
    they were trained with, as far as the suite records it."""

    path: Path
    """The directory or SAE folder that was opened."""
    saes: dict[Hookpoint, SparseAutoencoder]
    """The SAEs in eval mode, each taking raw activations [n, d_model] of its hookpoint."""
    folders: dict[str, Path]
    """Hookpoint name -> SAE folder."""
    sae_configs: dict[str, dict[str, Any]]
    """Hookpoint name -> the folder's cfg.json (SAELens keys + `metadata`)."""
    model: ModelConfig
    """The model config the SAEs belong to (given, or the conf/model/ entry the suite names)."""
    device: torch.device
    token_policy: str | None
    """The token policy of training, `PolicyConfig.describe()`; None where the suite does not
    record it (suites of other tools)."""
    train_config: dict[str, Any] | None
    """The training run's config (`TrainRunConfig` as a dict); None where not recorded."""

    @property
    def hookpoints(self) -> list[Hookpoint]:
        return list(self.saes)

    def held_out_data(self, data: DataConfig) -> DataConfig:
        """`data` reading its source in the document order the suite was trained with, when
        that source is the training's: the keys of DOCUMENT_ORDER_KEYS taken from suite.json's
        train_config (logged when they change), so the held-out split is the one training never
        read. Another source, or a suite that records no training config, keeps `data`."""
        trained = (self.train_config or {}).get("data") or {}
        if trained.get("source") != data.source:
            return data
        order = {k: trained[k] for k in DOCUMENT_ORDER_KEYS if k in trained}
        changed = {k: v for k, v in order.items() if getattr(data, k) != v}
        if changed:
            logger.info("data in the suite's training order (from suite.json): %s", changed)
        return replace(data, **order)


def load_suite(
    path: Path | str,
    device: str | torch.device = "auto",
    model: ModelConfig | None = None,
    hookpoints: Sequence[str] | None = None,
) -> LoadedSuite:
    """Open the suite at `path` on `device` (`auto`: CUDA when present, else CPU).

    `model`: the model config; None = the conf/model/ entry of the model the suite names.
    `hookpoints`: the SAEs to load (None = all). Raises ConfigError for a missing path, a
    hookpoint the suite lacks or a suite that names no model, CheckpointError for a corrupt SAE
    folder or an SAE whose d_in is not the model's d_model."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("suite", str(path), "an existing suite directory or SAE folder")
    folders, suite_model = discover_saes(path)
    if model is None:
        if not suite_model:
            raise ConfigError("model", None, "model=<name>: the suite does not name its model")
        model = model_config_for(suite_model)
    for name in hookpoints or []:
        if name not in folders:
            raise ConfigError(
                "hookpoints", name, f"hookpoints of the suite {path}: {', '.join(folders)}"
            )
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    saes: dict[Hookpoint, SparseAutoencoder] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name in hookpoints or list(folders):
        hp = Hookpoint.parse(name, model.n_layers)
        sae, sae_cfg = load_sae(folders[name], dev)
        if sae.d_in != model.d_model:
            raise CheckpointError(
                f"{folders[name]}: d_in={sae.d_in} but {model.name} has d_model={model.d_model}"
            )
        saes[hp], configs[name] = sae.eval(), sae_cfg
    index = read_suite_index(path) if (path / "suite.json").is_file() else {}
    return LoadedSuite(
        path,
        dict(sorted(saes.items(), key=lambda kv: kv[0].site_order)),
        {n: folders[n] for n in configs},
        configs,
        model,
        dev,
        index.get("token_policy"),
        index.get("train_config"),
    )


def discover_saes(path: Path) -> tuple[dict[str, Path], str | None]:
    """{hookpoint name: SAE folder} of a suite dir (suite.json), one SAE folder (cfg.json) or a
    folder of SAE folders, and the model name the suite or the SAEs' metadata give (or None)."""
    path = Path(path)
    if (path / "suite.json").is_file():
        index = read_suite_index(path)
        return {e["hookpoint"]: path / e["path"] for e in index["saes"]}, index.get("model")
    folders = (
        [path]
        if (path / CFG_FILE).is_file()
        else sorted(p for p in path.glob("*") if (p / CFG_FILE).is_file())
    )
    if not folders:
        raise ConfigError(
            "suite",
            str(path),
            "a suite directory (suite.json), an SAE folder "
            "(cfg.json + sae_weights.safetensors) or a folder of SAE folders",
        )
    found: dict[str, Path] = {}
    model = None
    for folder in folders:
        meta = json.loads((folder / CFG_FILE).read_text()).get("metadata", {})
        name = hookpoint_name(meta, folder)
        if name in found:
            raise ConfigError(
                "suite",
                str(path),
                f"one SAE per hookpoint ({name} appears in "
                f"{found[name]} and {folder}); evaluate them separately",
            )
        found[name] = folder
        model = model or meta.get("model_name")
    return found, model


def hookpoint_name(metadata: dict[str, Any], folder: Path) -> str:
    """`layers.{i}.{site}` from our metadata, from a TransformerLens `hook_name`
    (blocks.{i}.hook_resid_post / hook_mlp_out / hook_attn_out), or from the folder name."""
    if "hookpoint" in metadata:
        return metadata["hookpoint"]
    hp = Hookpoint.from_saelens_hook_name(str(metadata.get("hook_name", "")))
    return hp.name if hp is not None else folder.name


def model_config_for(name: str) -> ModelConfig:
    """The conf/model/*.yaml whose file stem, `name` or `path` equals `name`."""
    known = []
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        raw = OmegaConf.load(path)
        assert isinstance(raw, DictConfig)  # a model config is a mapping
        known.append(path.stem)
        if name in (path.stem, raw.get("name"), raw.get("path")):
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
            assert isinstance(cfg, ModelConfig)  # the object of a structured ModelConfig
            return cfg
    raise ConfigError(
        "model",
        name,
        f"model=<name> with one of {', '.join(known)} (the suite "
        "names a model that has no conf/model/ entry)",
    )
