"""`python -m sae_dist.evaluate suite=<path> [model=<name>] [eval.tokens=<int>] out_dir=<path>`
(conf/eval.yaml): open a suite, evaluate it on the held-out split of the data config (every
`holdout_every`-th document, never trained on), write the outputs and log them to W&B.

Outputs under out_dir: saes/<hookpoint>.json (the metrics of sae_dist.evaluate.evaluator plus
the latent-frequency histogram, the SAE, suite, model, data and eval configs, splice and CE
positions, token counts), suite_table.md / suite_table.csv (one row per SAE; Markdown adds
layer x site tables), metrics_by_layer.png, l0_tradeoff.png, latent_frequency.png. With
`eval.probes` the probing figures (sae_dist.evaluate.probing) join each SAE's results.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sae_dist.config import ConfigError, DataConfig, EvalRunConfig
from sae_dist.data import TokenStream
from sae_dist.evaluate.evaluator import eval_context, evaluate_saes, scalar_metrics
from sae_dist.evaluate.outputs import EVAL_METRICS, write_eval_outputs
from sae_dist.evaluate.probing import probe_columns, run_probes
from sae_dist.models import load_model, resolve_device
from sae_dist.suite import load_suite
from sae_dist.tracking import RunLogger


def validate_eval(cfg: EvalRunConfig) -> None:
    e = cfg.eval
    for key, value in (
        ("eval.tokens", e.tokens),
        ("eval.batch_seqs", e.batch_seqs),
        ("eval.max_variants", e.max_variants),
        ("eval.logit_chunk", e.logit_chunk),
    ):
        if value < 1:
            raise ConfigError(key, value, ">= 1")
    resolve_device(e.device, "eval.device")
    if not Path(cfg.suite).exists():
        raise ConfigError("suite", cfg.suite, "an existing suite directory or SAE folder")


def evaluation_splits(data: DataConfig) -> list[str]:
    """The held-out split, and the reserved region when the data config has one."""
    return ["eval", "reserved"] if data.reserved_frac else ["eval"]


def run_evaluation(cfg: EvalRunConfig) -> dict[str, dict[str, Any]]:
    """Load the suite and the model, evaluate on the held-out split (and the reserved region),
    write JSONs / tables / plots (the reserved region's under out_dir/reserved) and log to W&B.
    Returns the held-out split's results."""

    validate_eval(cfg)
    suite = load_suite(cfg.suite, cfg.eval.device, cfg.model)
    cfg.data = suite.held_out_data(cfg.data)
    cfg.model, device, saes = suite.model, suite.device, suite.saes
    sae_info = {
        name: {
            "path": str(suite.folders[name]),
            **{k: c.get(k) for k in ("architecture", "d_in", "d_sae", "k")},
        }
        for name, c in suite.sae_configs.items()
    }
    model, tokenizer = load_model(cfg.model, device)
    probes = run_probes(cfg, model, tokenizer, saes, device)
    out_dir = Path(cfg.out_dir)
    logger = RunLogger(cfg.logger, out_dir, asdict(cfg), name=f"eval-{Path(cfg.suite).name}")
    by_split = {}
    for split in evaluation_splits(cfg.data):
        stream = TokenStream(cfg.data, tokenizer, split)
        batches = list(stream.batches_until(cfg.eval.tokens, cfg.eval.batch_seqs))
        start = time.perf_counter()
        results = evaluate_saes(
            model,
            saes,
            batches,
            device,
            outlier_factor=cfg.data.policy.outlier_factor,
            model_level=cfg.eval.model_level,
            ce_mean=cfg.eval.ce_mean,
            max_variants=cfg.eval.max_variants,
            logit_chunk=cfg.eval.logit_chunk,
            all_tokens=cfg.eval.all_tokens,
            bootstrap=cfg.eval.bootstrap,
            slices=cfg.eval.slices,
            seed=cfg.eval.seed,
        )
        seconds = time.perf_counter() - start
        if split == "eval":
            for name, figures in probes.items():
                results[name].update(figures)
        context = eval_context(
            str(cfg.suite),
            cfg.model,
            cfg.data,
            batches,
            split=split,
            eval=asdict(cfg.eval),
            seconds=seconds,
        )
        split_dir = out_dir if split == "eval" else out_dir / split
        files = write_eval_outputs(results, split_dir, context, sae_info)
        _log_split(logger, split, results, files["plots"])
        print(
            f"\n{split}: {files['table_md'].read_text()}\nEvaluated {len(saes)} SAEs on "
            f"{results[next(iter(results))]['tokens']} tokens of the {split} split in "
            f"{seconds:.1f} s; outputs in {split_dir}"
        )
        by_split[split] = results
    logger.finish()
    print(f"W&B run: {logger.location}")
    return by_split["eval"]


def _log_split(
    logger: RunLogger, split: str, results: dict[str, dict[str, Any]], plots: list[Path]
) -> None:
    """The scalar metrics (`<hookpoint>/<metric>`, prefixed `<split>/` except for the held-out
    split), the plots and the results table of one split."""
    prefix = "" if split == "eval" else f"{split}/"
    flat = {
        f"{prefix}{hp}/{k}": v
        for hp, r in results.items()
        for k, v in scalar_metrics(r).items()
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
    }
    logger.log(flat, step=0)
    logger.summary(flat)
    logger.log_images({f"{split}/{p.stem}": p for p in plots})
    logger.log_table(
        f"{split}/results",
        {hp: scalar_metrics(r) for hp, r in results.items()},
        EVAL_METRICS + probe_columns(results),
    )
