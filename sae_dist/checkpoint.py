"""On-disk formats: SAEs in the SAELens v6 layout (`<hookpoint>/cfg.json` +
`<hookpoint>/sae_weights.safetensors` [+ `sparsity.safetensors`]), the suite index
`suite.json`, and resumable training checkpoints. Every write goes to a temporary directory
first and is renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_dist.errors import UserError
from sae_dist.sae import SparseAutoencoder, sae_from_saelens

SAE_LENS_VERSION = "6.5.0"
"""The SAELens format version our cfg.json declares (v6 layout)."""
CFG_FILE, WEIGHTS_FILE, SUITE_FILE = "cfg.json", "sae_weights.safetensors", "suite.json"
SPARSITY_FILE = "sparsity.safetensors"
"""SAELens's per-SAE feature densities: tensor `sparsity` float32 [d_sae], log10 of the fraction
of tokens each latent fires on, plus 1e-10 (dead latents read -10)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or SAE folder is missing files, is corrupt, or belongs to another run."""


def write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)`, then move tmp_dir to `dest`, replacing any previous `dest`. A crash
    leaves either the old or the new complete folder (plus a stray temp folder)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def save_sae(
    sae: SparseAutoencoder,
    folder: Path,
    metadata: dict[str, Any],
    density: torch.Tensor | None = None,
) -> None:
    """Write one SAE (operating on raw activations) in the SAELens v6 layout; with `density`
    (fraction of tokens each latent fires on, [d_sae]) also `sparsity.safetensors`."""
    cfg = sae.saelens_cfg()
    cfg["metadata"] = {"sae_lens_version": SAE_LENS_VERSION, **metadata}

    def write(tmp: Path) -> None:
        save_file(sae.saelens_tensors(), str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2))
        if density is not None:
            save_sparsity(tmp, density)

    write_atomically(folder, write)


def log10_sparsity(density: torch.Tensor) -> torch.Tensor:
    """SAELens's `sparsity` from densities [d_sae] in [0, 1]: float32 log10(density + 1e-10)."""
    return torch.log10(density.double().cpu() + 1e-10).float()


def save_sparsity(folder: Path, density: torch.Tensor) -> None:
    """Write `sparsity.safetensors` (SAELens layout) for densities [d_sae] into `folder`."""
    if density.dim() != 1 or not bool(((density >= 0) & (density <= 1)).all()):
        raise ValueError("density must be a [d_sae] tensor of fractions in [0, 1]")
    save_file({"sparsity": log10_sparsity(density)}, str(Path(folder) / SPARSITY_FILE))


def load_sparsity(folder: Path) -> torch.Tensor | None:
    """The `sparsity` tensor [d_sae] (log10 density) of an SAE folder, None without the file."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["sparsity"]
    except (SafetensorError, OSError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def load_sae(
    folder: Path, device: str | torch.device = "cpu"
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load an SAE folder; returns the SAE and its cfg.json. Clear errors for bad folders."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: not an SAE folder (SAELens layout)")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights_path), device=str(device))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder} is corrupt: {e}") from e
    try:
        return sae_from_saelens(tensors, cfg), cfg
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder} does not hold a valid SAE: {e}") from e


def write_suite_index(suite_dir: Path, entries: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """`suite.json`: run-level `info` and one entry per SAE (hookpoint, path, metrics)."""
    index = {**info, "saes": entries}
    tmp = Path(suite_dir) / f".{SUITE_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(Path(suite_dir) / SUITE_FILE)


def read_suite_index(suite_dir: Path) -> dict[str, Any]:
    path = Path(suite_dir) / SUITE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a suite directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def load_suite_sae(
    suite_dir: Path, hookpoint: str, device: str | torch.device = "cpu"
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE of `hookpoint` in a suite."""
    index = read_suite_index(suite_dir)
    names = [e["hookpoint"] for e in index["saes"]]
    if hookpoint not in names:
        raise KeyError(f"hookpoint {hookpoint!r} not in suite {suite_dir}; it has {names}")
    entry = index["saes"][names.index(hookpoint)]
    return load_sae(Path(suite_dir) / entry["path"], device)


# --- resumable training checkpoints ----------------------------------------------------------
# <out_dir>/checkpoint/: run.pt (forward batches, data_shards, process count, trainer kind,
# producer counts), shards/<v>.pt (token stream position and outlier filters of data shard v),
# buffers/<hookpoint>/<v>.pt (shuffle buffer of a hookpoint and shard), saes/<hookpoint>.pt (SAE
# weights, Adam state by parameter name, input scale, dead counters, step, LR schedule), and
# under DeepSpeed deepspeed/ (accelerate.save_state). Every process writes its parts into
# .checkpoint.tmp/; the main process then swaps it in (checkpoint -> .checkpoint.old, tmp ->
# checkpoint, old removed), so a crash at any point leaves one complete checkpoint.


def _paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(f".{dest.name}.tmp"), dest.with_name(f".{dest.name}.old")


def begin_checkpoint(dest: Path, is_main: bool, barrier: Callable[[], None]) -> Path:
    """An empty temporary folder for the parts of a checkpoint to `dest` (collective)."""
    tmp, _ = _paths(Path(dest))
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def save_part(tmp: Path, name: str, state: Any) -> None:
    """Write one part (any torch-serialisable object) of a checkpoint being written."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def commit_checkpoint(tmp: Path, dest: Path, is_main: bool, barrier: Callable[[], None]) -> None:
    """Once every process wrote its parts, move `tmp` into place as `dest` (collective)."""
    barrier()
    if is_main:
        _, old = _paths(Path(dest))
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def checkpoint_exists(dest: Path) -> bool:
    """Whether a complete checkpoint is at `dest`; one left as .old by a crash during the swap
    is recovered (renamed back) first."""
    dest = Path(dest)
    _, old = _paths(dest)
    if not (dest / "run.pt").exists() and (old / "run.pt").exists():
        with contextlib.suppress(OSError):  # another process may have recovered it
            old.rename(dest)
    return (dest / "run.pt").exists()


def load_part(dest: Path, name: str) -> Any:
    path = Path(dest) / name
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"training checkpoint part {path} is missing or unreadable: {e}"
        ) from e


RUN_CONFIG_FILE = "config.json"
"""In a checkpoint: the config keys that shape training (JSON, read before any model loads)."""


def save_run_config(tmp: Path, shaping: dict[str, Any]) -> None:
    """Record the flattened training-shaping config {dotted key: value} in a checkpoint."""
    (tmp / RUN_CONFIG_FILE).write_text(json.dumps(shaping, indent=2, sort_keys=True))


def check_run_config(dest: Path, shaping: dict[str, Any]) -> None:
    """Raise CheckpointError, naming every differing key, when the checkpoint at `dest` was
    written with another training-shaping config than `shaping` (no checkpoint: nothing to
    check)."""
    if not checkpoint_exists(dest):
        return
    path = Path(dest) / RUN_CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is missing or unreadable ({e}): this checkpoint cannot "
            "be matched to the config; resume is refused"
        ) from e
    diff = [
        f"{k}: {saved.get(k, '<absent>')!r} in the checkpoint, {shaping.get(k, '<absent>')!r} now"
        for k in sorted(set(saved) | set(shaping))
        if saved.get(k) != shaping.get(k)
    ]
    if diff:
        raise CheckpointError(
            f"the checkpoint in {dest} belongs to a run with another config:\n  "
            + "\n  ".join(diff)
            + "\nresume with the same values, or start over with "
            "train.resume=false (replaces this run) or another out_dir"
        )


def saved_data_shards(dest: Path) -> int | None:
    """The data_shards of the checkpoint at `dest`, None without one."""
    return load_part(dest, "run.pt")["data_shards"] if checkpoint_exists(dest) else None
