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

from sae_dist.config import ConfigError, EvalRunConfig
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


def run_evaluation(cfg: EvalRunConfig) -> dict[str, dict[str, Any]]:
    """Load the suite and the model, evaluate, write JSONs / tables / plots and log to W&B."""

    validate_eval(cfg)
    suite = load_suite(cfg.suite, cfg.eval.device, cfg.model)
    cfg.model, device, saes = suite.model, suite.device, suite.saes
    sae_info = {
        name: {
            "path": str(suite.folders[name]),
            **{k: c.get(k) for k in ("architecture", "d_in", "d_sae", "k")},
        }
        for name, c in suite.sae_configs.items()
    }
    model, tokenizer = load_model(cfg.model, device)
    stream = TokenStream(cfg.data, tokenizer, "eval", seed=cfg.eval.seed)
    batches = list(stream.batches_until(cfg.eval.tokens, cfg.eval.batch_seqs))
    probes = run_probes(cfg, model, tokenizer, saes, device)
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
    )
    seconds = time.perf_counter() - start
    for name, figures in probes.items():
        results[name].update(figures)
    context = eval_context(
        str(cfg.suite), cfg.model, cfg.data, batches, eval=asdict(cfg.eval), seconds=seconds
    )
    out_dir = Path(cfg.out_dir)
    files = write_eval_outputs(results, out_dir, context, sae_info)
    logger = RunLogger(cfg.logger, out_dir, asdict(cfg), name=f"eval-{Path(cfg.suite).name}")
    flat = {
        f"{hp}/{k}": v
        for hp, r in results.items()
        for k, v in scalar_metrics(r).items()
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
    }
    logger.log(flat, step=0)
    logger.summary(flat)
    logger.log_images({f"eval/{p.stem}": p for p in files["plots"]})
    logger.log_table(
        "eval/results",
        {hp: scalar_metrics(r) for hp, r in results.items()},
        EVAL_METRICS + probe_columns(results),
    )
    logger.finish()
    print(
        f"\n{files['table_md'].read_text()}\nEvaluated {len(saes)} SAEs on "
        f"{results[next(iter(results))]['tokens']} held-out tokens in {seconds:.1f} s; "
        f"outputs in {out_dir}\nW&B run: {logger.location}"
    )
    return results
