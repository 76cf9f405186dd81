"""The probing evaluations `eval.probes` names (DESIGN.md section 8b): first-letter absorption
(`absorption`) and sparse probing (`sparse_probing`), run after the held-out metrics on the
same model, their figures merged into each SAE's results; and the columns they add to the
tables."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from sae_dist.config import EvalRunConfig
from sae_dist.evaluate.absorption import evaluate_absorption
from sae_dist.evaluate.sparse_probing import evaluate_sparse_probing
from sae_dist.hookpoints import Hookpoint
from sae_dist.sae import SparseAutoencoder

ABSORPTION_COLUMNS = ("absorption", "full_absorption", "split_latents", "absorption_letters")
"""Scalar figures of `absorption` per SAE."""
PROBE_ACCURACY = re.compile(r"probe_(dense|k\d+)_acc")
"""Scalar figures of `sparse_probing` per SAE: probe_dense_acc, probe_k<k>_acc."""


def run_probes(
    cfg: EvalRunConfig,
    model: nn.Module,
    tokenizer,
    saes: dict[Hookpoint, SparseAutoencoder],
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """The figures of every probing evaluation of `cfg.eval.probes`, keyed by hookpoint name."""
    out: dict[str, dict[str, Any]] = {hp.name: {} for hp in saes}
    if "absorption" in cfg.eval.probes:
        for name, res in evaluate_absorption(
            model, tokenizer, saes, cfg.eval.absorption, device
        ).items():
            out[name].update(res)
    if "sparse_probing" in cfg.eval.probes:
        for name, res in evaluate_sparse_probing(
            model, tokenizer, saes, cfg.eval.sparse_probing, cfg.data, device
        ).items():
            out[name].update(res)
    return out


def probe_columns(results: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The probing figures present in `results` ({hookpoint: metrics}), in table order:
    absorption's, then the probe accuracies (dense first, then by k)."""
    keys = {k for r in results.values() for k in r}
    accuracy = sorted(
        (k for k in keys if PROBE_ACCURACY.fullmatch(k)),
        key=lambda k: -1 if k == "probe_dense_acc" else int(k[7:-4]),
    )
    return tuple(c for c in ABSORPTION_COLUMNS if c in keys) + tuple(accuracy)
