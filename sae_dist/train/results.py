"""The end of a training run: evaluate the trained SAEs on held-out tokens, save the suite
(SAELens layout + suite.json), write the report, log tables, plots and artifacts
(DESIGN.md sections 6 and 8). Main process only."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_dist.checkpoint import SUITE_FILE, read_suite_index, save_sae, write_suite_index
from sae_dist.config import TrainRunConfig
from sae_dist.data import TokenStream
from sae_dist.errors import DataError
from sae_dist.evaluate.command import evaluation_splits
from sae_dist.evaluate.evaluator import eval_context, evaluate_saes, scalar_metrics
from sae_dist.evaluate.outputs import (
    EVAL_COLUMNS,
    markdown_table,
    plot_training_curves,
    scalar_columns,
    write_eval_outputs,
)
from sae_dist.hookpoints import Hookpoint
from sae_dist.sae import SparseAutoencoder
from sae_dist.tracking import RunLogger

SAVED_METRICS = ("fvu", "l0", "dead_frac", "delta_loss", "delta_loss_se", "loss_recovered", "kl")
"""Held-out metrics copied into each SAE's cfg.json metadata."""


def sae_metadata(cfg: TrainRunConfig, hp: Hookpoint) -> dict[str, Any]:
    """The SAELens metadata keys of a trained SAE that do not depend on its training."""
    return {
        "model_name": cfg.model.path or cfg.model.name,
        "hook_name": hp.saelens_hook_name,
        "hookpoint": hp.name,
        "site": hp.site,
        "layer": hp.layer,
        "context_size": cfg.data.context_size,
        "dataset_path": cfg.data.source,
        "prepend_bos": cfg.data.prepend_bos,
        "exclude_special_tokens": True,
    }


def suite_info(
    cfg: TrainRunConfig, training_tokens: int, topology_info: dict[str, Any], evaluated: bool
) -> dict[str, Any]:
    """Run-level keys of suite.json."""
    return {
        "model": cfg.model.name,
        "architecture": cfg.sae.architecture,
        "training_tokens": training_tokens,
        "trainer": cfg.trainer.kind.value,
        **topology_info,
        "evaluated": evaluated,
        "token_policy": cfg.data.policy.describe(),
        "train_config": json.loads(json.dumps(asdict(cfg), default=_json_value)),
    }


def _json_value(value: Any) -> Any:
    """JSON form of the config values json cannot write (enums: their value)."""
    return getattr(value, "value", str(value))


def is_complete(out_dir: Path) -> bool:
    """Whether the run in `out_dir` finished: its suite.json is the last file a run writes."""
    return (Path(out_dir) / "suite" / SUITE_FILE).is_file()


def completed_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """{hookpoint: held-out metrics} of a finished run, as its suite.json records them."""
    index = read_suite_index(Path(out_dir) / "suite")
    return {
        e["hookpoint"]: {k: v for k, v in e.items() if k not in ("hookpoint", "path")}
        for e in index["saes"]
    }


def heldout_density(result: dict[str, Any] | None) -> Tensor | None:
    """Each latent's firing density [d_sae] (fires / tokens) on the end-of-run evaluation's
    held-out tokens, from its `latent_fire_counts`; None without an evaluation."""
    if not result or result.get("latent_fire_counts") is None:
        return None
    return torch.tensor(result["latent_fire_counts"], dtype=torch.float64) / result["tokens"]


def write_suite(
    cfg: TrainRunConfig,
    saes: dict[Hookpoint, SparseAutoencoder],
    training: dict[str, dict[str, Any]],
    model: nn.Module,
    tokenizer,
    device,
    logger: RunLogger,
    info: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Evaluate (unless train.eval_tokens=0), save every SAE with its metadata (and, when
    evaluated, `sparsity.safetensors`: the densities on the held-out evaluation tokens,
    `sparsity_source` "heldout_eval" in the metadata), then suite.json, the report and the W&B
    outputs; returns the held-out metrics per hookpoint.

    `training`: {hookpoint: training metadata (training tokens, input scale, drops)}."""
    out_dir, suite_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "suite"
    by_split = {
        split: evaluate_split(cfg, split, saes, model, tokenizer, device)
        for split in (evaluation_splits(cfg.data) if cfg.train.eval_tokens else [])
    }
    results = by_split.get("eval", {})
    entries = []
    for hp, sae in saes.items():
        res = scalar_metrics(results[hp.name]) if results else {}
        metadata = {
            **sae_metadata(cfg, hp),
            **training[hp.name],
            **({"eval_tokens": res["tokens"], "sparsity_source": "heldout_eval"} if res else {}),
            **{k: res[k] for k in SAVED_METRICS if k in res},
        }
        save_sae(sae, suite_dir / hp.name, metadata, heldout_density(results.get(hp.name)))
        logger.log_sae_artifact(suite_dir / hp.name, f"sae-{hp.name}", metadata)
        entries.append({"hookpoint": hp.name, "path": hp.name, **res})
    report = write_report(cfg, by_split, logger)
    logger.finish()
    write_suite_index(suite_dir, entries, {**info, "evaluated": bool(results)})
    print(
        f"\n{report}\nSAE suite written to {suite_dir}\nW&B run: {logger.location}\n"
        f"Report: {out_dir / 'report.md'}"
    )
    return {name: scalar_metrics(r) for name, r in results.items()}


def evaluate_split(
    cfg: TrainRunConfig,
    split: str,
    saes: dict[Hookpoint, SparseAutoencoder],
    model: nn.Module,
    tokenizer,
    device,
) -> dict[str, dict[str, Any]]:
    """Evaluate every SAE on `train.eval_tokens` tokens of `split` (the held-out split, or the
    reserved region) and write the outputs under out_dir/eval (out_dir/eval/reserved)."""
    stream = TokenStream(cfg.data, tokenizer, split)
    batches = list(stream.batches_until(cfg.train.eval_tokens, cfg.train.forward_batch_seqs))
    if not batches:
        raise DataError(
            f"data.source={cfg.data.source!r} has no {split} batch of "
            f"{cfg.train.forward_batch_seqs} sequences (every {cfg.data.holdout_every}-th "
            f"document is held out; data.reserved_frac={cfg.data.reserved_frac}): use more "
            "data or train.eval_tokens=0 (the suite is then saved unevaluated)"
        )
    results = evaluate_saes(
        model, saes, batches, device, outlier_factor=cfg.data.policy.outlier_factor
    )
    out = Path(cfg.out_dir) / "eval" / ("" if split == "eval" else split)
    context = eval_context(str(Path(cfg.out_dir) / "suite"), cfg.model, cfg.data, batches, split)
    write_eval_outputs(results, out, context)
    return results


SPLIT_TITLES = {
    "eval": "Held-out metrics (every {holdout}-th document of the reading order, never trained on)",
    "reserved": "The reserved region (the last {reserved:.0%} of the file's records, read by "
    "neither training nor the held-out split)",
}


def write_report(
    cfg: TrainRunConfig, by_split: dict[str, dict[str, dict[str, Any]]], logger: RunLogger
) -> str:
    """report.md (per evaluated split a table with its token count, links) and the training
    curve; the tables, curve and evaluation plots also go to W&B. Returns the tables' text."""
    out_dir = Path(cfg.out_dir)
    curve = plot_training_curves(out_dir / "metrics.jsonl", out_dir / "fvu_curve.png")
    logger.log_images({"train/fvu_curve": curve})
    tables = []
    for split, results in by_split.items():
        first = next(iter(results.values()))
        title = SPLIT_TITLES[split].format(
            holdout=cfg.data.holdout_every, reserved=cfg.data.reserved_frac
        )
        tables.append(
            f"{title}, token policy {cfg.data.policy.describe()} (the policy of training): "
            f"{first['tokens']} tokens of {first['docs']} documents (`*_ci`: 95% bootstrap "
            f"intervals over documents), {first['excluded']} outlier positions left out and "
            f"unspliced; every SAE spliced alone:\n\n{markdown_table(results, EVAL_COLUMNS)}"
        )
        logger.log_table(
            f"{split}/results",
            {hp: scalar_metrics(r) for hp, r in results.items()},
            scalar_columns(EVAL_COLUMNS),
        )
        plots = out_dir / "eval" / ("" if split == "eval" else split)
        logger.log_images({f"{split}/{p.stem}": p for p in sorted(plots.glob("*.png"))})
    table = "\n\n".join(tables) or (
        "Not evaluated (train.eval_tokens=0): run `python -m sae_dist.evaluate`."
    )
    (out_dir / "report.md").write_text(
        f"# Training report: {cfg.model.name}\n\n{table}\n\nSuite: `{out_dir / 'suite'}`\n"
        f"W&B: `{logger.location}`\nTraining curves: `{curve}`\n"
        f"Evaluation (per-SAE JSON, layer x site tables, plots): `{out_dir / 'eval'}`\n"
    )
    return table
