"""`python -m sae_dist.features suite=<path> out_dir=<path>` (conf/features.yaml): open a
suite, stream held-out tokens through every SAE (sae_dist.features.collect), score each feature
(sae_dist.features.score), optionally ask an LLM explainer, and write the static report
(sae_dist.features.report) with a summary table."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sae_dist.config import FeaturesConfig, FeaturesRunConfig
from sae_dist.data import TokenStream
from sae_dist.errors import ConfigError
from sae_dist.features.collect import (
    FeatureStats,
    HookpointFeatures,
    collect,
    final_norm_gain,
    logit_lens,
)
from sae_dist.features.report import (
    interpretability_table,
    load_steering,
    token_texts,
    write_report,
)
from sae_dist.features.score import OpenAIExplainer, TokenSetScores, f1_summary
from sae_dist.hookpoints import unembedding
from sae_dist.models import load_model, resolve_device
from sae_dist.suite import load_suite

log = logging.getLogger(__name__)


def validate_features(cfg: FeaturesRunConfig) -> None:
    """Range checks before anything is loaded; ConfigError names key, value, allowed range."""
    f = cfg.features
    positive = (
        "tokens",
        "batch_seqs",
        "top_n",
        "quantile_bins",
        "per_bin",
        "logit_k",
        "hist_bins_per_decade",
        "explain_max_tokens",
        "explain_max_set",
        "explain_candidates",
        "features_per_file",
    )
    for key in positive:
        if getattr(f, key) < 1:
            raise ConfigError(f"features.{key}", getattr(f, key), ">= 1")
    for key in ("window_before", "window_after"):
        if getattr(f, key) < 0:
            raise ConfigError(f"features.{key}", getattr(f, key), ">= 0")
    if not 0 < f.explain_fraction < 1:
        raise ConfigError("features.explain_fraction", f.explain_fraction, "(0, 1)")
    if not 0 <= f.token_level_f1 <= 1:
        raise ConfigError("features.token_level_f1", f.token_level_f1, "[0, 1]")
    if len(f.hist_range) != 2 or not 0 < f.hist_range[0] < f.hist_range[1]:
        raise ConfigError("features.hist_range", list(f.hist_range), "[low, high], 0 < low < high")
    resolve_device(f.device, "features.device")
    if f.explainer.max_features < 0:
        raise ConfigError("features.explainer.max_features", f.explainer.max_features, ">= 0")
    if not Path(cfg.suite).exists():
        raise ConfigError("suite", cfg.suite, "an existing suite directory or SAE folder")
    if f.steering is not None and not Path(f.steering).exists():
        raise ConfigError(
            "features.steering", f.steering, "a steering output folder or its intervention.json"
        )


def explain_tokens(cfg: FeaturesConfig) -> int:
    """Scored tokens of the explanation part: explain_fraction of the tokens, capped."""
    return max(1, min(round(cfg.tokens * cfg.explain_fraction), cfg.explain_max_tokens))


def summarise(stats: FeatureStats, scores: TokenSetScores, cfg: FeaturesConfig) -> dict[str, Any]:
    """Per-SAE figures: tokens, live/dead features, and the F1 distribution."""
    live = int((stats.fires > 0).sum())
    return {
        "d_sae": stats.d_sae,
        "tokens": stats.tokens,
        "live": live,
        "dead": stats.d_sae - live,
        "explain_tokens": scores.explain_tokens,
        "heldout_tokens": scores.heldout_tokens,
        **f1_summary(scores.f1, cfg.token_level_f1),
    }


def run_features(cfg: FeaturesRunConfig) -> dict[str, dict[str, Any]]:
    """Load the suite and the model, stream, score, write the report; returns the per-SAE
    summaries keyed by hookpoint name."""

    start = time.perf_counter()
    results, tokenizer, info = compute_features(cfg)
    f = cfg.features
    steering = load_steering(Path(f.steering)) if f.steering else None
    sizes = write_report(Path(cfg.out_dir), results, tokenizer, info, Path(cfg.suite), steering)
    seconds = time.perf_counter() - start
    summaries = {r.hookpoint: r.summary for r in results}
    figures = {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "report_bytes": sizes}
    (Path(cfg.out_dir) / "features.json").write_text(
        json.dumps({"info": info, **figures, "summaries": summaries}, indent=2)
    )
    _print_summary(summaries, sizes, cfg, seconds)
    return summaries


def compute_features(
    cfg: FeaturesRunConfig,
) -> tuple[list[HookpointFeatures], Any, dict[str, Any]]:
    """Every SAE's feature statistics, logit lens, token-set scores and summary (and LLM
    explanations when an explainer is configured): (one `HookpointFeatures` per SAE, the
    tokenizer, run info). The feature browser and the Neuronpedia export both use it."""

    validate_features(cfg)
    start = time.perf_counter()
    f = cfg.features
    suite = load_suite(cfg.suite, f.device, cfg.model)
    cfg.model, device, saes = suite.model, suite.device, suite.saes
    cfg.data = suite.held_out_data(cfg.data)
    folders = suite.folders
    model, tokenizer = load_model(cfg.model, device)
    vocab = unembedding(model).weight.shape[0]
    stats = {
        hp: FeatureStats(sae.d_sae, vocab, cfg.data.context_size, f, explain_tokens(f))
        for hp, sae in saes.items()
    }
    stream = TokenStream(cfg.data, tokenizer, "eval")
    lm_tokens = collect(
        model,
        saes,
        stats,
        stream.batches_until(f.tokens, f.batch_seqs),
        f.tokens,
        device,
        cfg.data.policy.outlier_factor,
    )
    W_U, gain = unembedding(model).weight.detach(), final_norm_gain(model)
    results = []
    for hp, sae in saes.items():
        scores = stats[hp].scorer.result()
        lens = logit_lens(sae.W_dec.detach(), gain, W_U, f.logit_k)
        results.append(
            HookpointFeatures(
                hp.name,
                str(folders[hp.name]),
                stats[hp],
                lens,
                scores,
                summarise(stats[hp], scores, f),
                {},
            )
        )
    _llm_explanations(results, tokenizer, f)
    info = {
        "suite": str(cfg.suite),
        "model": cfg.model.name,
        "lm_tokens": lm_tokens,
        "seconds_to_scores": time.perf_counter() - start,
        "features": asdict(f),
        "data": asdict(cfg.data),
    }
    return results, tokenizer, info


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _llm_explanations(results: list[HookpointFeatures], tokenizer, cfg: FeaturesConfig) -> None:
    """With an explainer endpoint, explain the most frequent live features of each SAE."""
    if not cfg.explainer.endpoint:
        return

    explainer = OpenAIExplainer(cfg.explainer)
    for r in results:
        fires = r.stats.fires
        chosen = [
            int(i)
            for i in fires.argsort(descending=True)[: cfg.explainer.max_features]
            if fires[i] > 0
        ]
        for feature in tqdm(chosen, desc=f"explain {r.hookpoint}", leave=False):
            contexts = []
            for slot in range(r.stats.top.n):
                if r.stats.top.position[feature, slot] < 0:
                    break
                toks = r.stats.top.tokens[feature, slot].tolist()
                texts = token_texts(tokenizer, [t for t in toks if t >= 0])
                acts = [a for t, a in zip(toks, r.stats.top.acts[feature, slot].tolist()) if t >= 0]
                contexts.append(list(zip(texts, acts)))
            try:
                r.llm_explanations[feature] = explainer.explain(contexts)
            except OSError as e:
                log.warning("explainer failed for %s feature %d: %s", r.hookpoint, feature, e)


def _print_summary(
    summaries: dict[str, dict[str, Any]],
    sizes: dict[str, int],
    cfg: FeaturesRunConfig,
    seconds: float,
) -> None:

    n = sum(s["d_sae"] for s in summaries.values())
    print(
        f"\n{interpretability_table(summaries, cfg.features.token_level_f1)}\n\n"
        f"{len(summaries)} SAEs, {n} features, {seconds:.1f} s, peak RSS "
        f"{peak_rss_bytes() / 2**20:.0f} MiB; report {sizes['total']} bytes "
        f"({sizes['per_feature']} bytes per feature): {Path(cfg.out_dir) / 'index.html'}"
    )
