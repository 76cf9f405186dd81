"""Evaluation of SAEs on held-out tokens (DESIGN.md section 8).

`python -m sae_dist.evaluate suite=<path> [model=<name>] [eval.tokens=<int>] out_dir=<path>`
(conf/eval.yaml) evaluates a suite directory, one SAE folder, or a folder of SAE folders on the
held-out split of the data config (every `holdout_every`-th document, never trained on).

Token sets: the token policy of training (`data.policy`, DESIGN.md section 5). The position set
is the train_mask (special tokens and BOS never in it); of it, reconstruction metrics use the
positions the policy's outlier filter keeps (sae_dist.policy, the producer's own rule), and
splices (SAE reconstruction, zeros, mean) replace the activation at exactly those positions; the
positions left out keep their clean activation and are counted (`excluded`). CE and KL count
position t iff train_mask[t] is True and t + 1 is in the row, with target input_ids[t + 1]; the
same positions for every CE and the KL. `eval.all_tokens` adds every metric over the whole
position set (`<metric>_all`).

Metrics, accumulated in float64 over those tokens:
- fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, explained_variance = 1 - fvu,
  mse = mean_tokens ||x - x_hat||^2 / d_in, cosine = mean_tokens cos(x, x_hat),
  l0 = mean_tokens #active latents, dead_frac = latents never active, dense_frac = latents active
  on more than 10% of tokens, dense_l0 = the part of l0 those dense latents carry, and a
  histogram of log10 latent frequencies;
- ce_clean, ce_spliced, ce_zero (ce_mean with eval.ce_mean), delta_loss = ce_spliced - ce_clean
  with delta_loss_se, its standard error over sequences (`ModelLevelAccumulator`),
  loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean),
  kl = mean_tokens KL(p_clean || p_spliced).

The scheme (implemented in `sae_dist.evaluate.model_level`; its costs for the demo suite are in
benchmarks/README.md, "Suite evaluation"):
1. One clean pass per batch (the decoder stack, no LM head) gives every SAE's input
   activations, ce_clean, and caches the hidden state entering each layer an SAE sits at, with
   the keyword arguments the model hands each decoder layer.
2. A splice at layer L changes nothing before L, so each spliced or ablated pass (SAE, zero,
   optional mean) replays only layers L..N-1 from the cache, then the final norm and the LM
   head. Passes that start at the same layer run as one batch of up to `max_variants` on an
   accelerator; on CPU a replay holds at most `max_batch_tokens` positions.
3. The LM head runs only at the CE positions, `logit_chunk` rows at a time, in the model's
   dtype (the logits z the model itself computes); the clean logits and probs are computed once
   per batch and reused by every variant.
4. After the head no log-softmax is materialised and nothing of size vocab is float64:
   CE = logsumexp(z) - z[target] (sum of exp in float32, log and add in float64) and
   KL(p_clean || p) = <p_clean, z_clean - z> + (lse - lse_clean) * sum(p_clean), which is
   sum p_clean (log p_clean - log p) regrouped; float32 differences of bf16 logits are exact,
   and an identity splice gives kl = delta_loss = 0 exactly. On CPU this work runs on slices of
   about 1M logits that stay in cache (fresh [256, vocab] float32 temporaries cost page faults
   and memory traffic comparable to the head matmul).
Float64 is used only for per-position scalars and the running sums (DESIGN.md section 8).
No autocast: the clean pass and the replays run the same layers in the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from sae_dist.config import ModelConfig
from sae_dist.data import TokenBatch
from sae_dist.evaluate.model_level import (
    CE_POSITIONS,
    SPLICE_POSITIONS,
    ModelLevelAccumulator,
    NextTokenScorer,
    ce_positions,
    clean_pass,
    masked_edit,
    replay_from,
)
from sae_dist.evaluate.reconstruction import ReconstructionAccumulator, SAELike, reconstruct
from sae_dist.evaluate.spread import DocumentSums, bootstrap_intervals, region_slices
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.policy import PositionFilter
from sae_dist.sae import SparseAutoencoder

log = logging.getLogger(__name__)


MAX_BATCH_TOKENS = 4096
"""Default cap on the positions of one evaluation forward batch, and on CPU of one replay batch
(memory of the clean logits and probs: 4096 x vocab x 6 bytes for a bf16 model, 1.2 GB for
SmolLM2, 3.7 GB for Qwen3)."""


@torch.no_grad()
def mean_activations(
    model: nn.Module,
    hookpoints: list[Hookpoint],
    batches: Sequence[TokenBatch],
    device: torch.device,
    outlier_factor: float | None,
) -> dict[Hookpoint, Tensor]:
    """Mean activation [d_model] (float64) of each hookpoint over the positions the token policy
    keeps in `batches` (a fresh `PositionFilter`, so the same positions as `evaluate_saes`; one
    extra pass, stopped after the last layer needed)."""
    sums: dict[Hookpoint, Tensor] = {}
    n = 0
    policy = PositionFilter([hp.name for hp in hookpoints], outlier_factor)
    for batch in batches:
        mask = batch.train_mask.to(device)
        acts = capture(model, hookpoints, batch.input_ids.to(device), stop_early=True)
        keep = policy.keep_positions(acts, mask)
        for hp in hookpoints:
            s = acts[hp][keep].double().sum(0)
            sums[hp] = sums[hp] + s if hp in sums else s
        n += int(keep.sum())
    return {hp: s / n for hp, s in sums.items()}


def split_batches(batches: Sequence[TokenBatch], max_tokens: int) -> list[TokenBatch]:
    """The same rows, in the same order, in batches of at most max(1, max_tokens // T) rows."""
    out = []
    for b in batches:
        rows = max(1, max_tokens // b.input_ids.shape[1])
        out += [
            TokenBatch(*parts)
            for parts in zip(
                b.input_ids.split(rows), b.train_mask.split(rows), b.doc_ids.split(rows)
            )
        ]
    return out


@dataclass
class _View:
    """The sums of one token set: the positions the policy keeps (suffix ""), or every
    position of the position set (the all-token figures, suffix "_all", no ce_mean)."""

    every_position: bool
    recon: dict[Hookpoint, ReconstructionAccumulator]
    ce: dict[Hookpoint, ModelLevelAccumulator]

    @property
    def suffix(self) -> str:
        return "_all" if self.every_position else ""


@torch.no_grad()
def evaluate_saes(
    model: nn.Module,
    saes: dict[Hookpoint, SAELike],
    batches: Sequence[TokenBatch],
    device: torch.device,
    *,
    outlier_factor: float | None,
    model_level: bool = True,
    ce_mean: bool = False,
    max_variants: int = 8,
    logit_chunk: int = 256,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    all_tokens: bool = False,
    bootstrap: int = 1000,
    slices: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Reconstruction (and with `model_level` the model-level) metrics of every SAE over the
    held-out `batches`; keyed by hookpoint name, in the order of `saes`. An SAE may be a plain
    function x [n, d] -> x_hat [n, d] (sparsity metrics are then None). Batches are split to at
    most `max_batch_tokens` positions per forward (the clean logits and float32 probs of a
    batch, positions x vocab each, are held in memory); on CPU a replay batch holds at most
    that many positions too (the module docstring gives the scheme).

    Token policy: of each batch's position set (train_mask) the positions a fresh
    `PositionFilter(outlier_factor)` over the evaluated hookpoints keeps (`outlier_factor` is
    required, normally `data.policy.outlier_factor`; None keeps every finite position) are
    reconstructed and spliced, the others keep their clean activation; `excluded` counts the
    positions left out.
    CE and KL are scored at the position set's CE positions. `all_tokens` adds every metric
    over the whole position set (no outlier left out) as `<metric>_all` (without ce_mean).
    Spread (sae_dist.evaluate.spread): with `bootstrap` > 0, `fvu_ci`, `l0_ci` and
    `delta_loss_ci`, [low, high] 95% percentile intervals over `bootstrap` resamples of the
    documents (seeded by `seed`); `docs`, the documents evaluated; with `slices` = k > 0,
    `slices`, the metrics on k disjoint regions of those documents by document id.
    Besides the scalars: `latent_freq_hist`, `latent_fire_counts` (tokens each latent fired on,
    [d_sae] ints, None for a plain function), and with `model_level` `delta_loss_by_sequence`
    (`ModelLevelAccumulator.by_sequence`, for paired comparisons of SAEs on the same batches)."""
    hps = list(saes)
    batches = split_batches(batches, max_batch_tokens)

    views = [
        _View(
            every,
            {
                hp: ReconstructionAccumulator(_d_in(sae, model), getattr(sae, "d_sae", None))
                for hp, sae in saes.items()
            },
            {hp: ModelLevelAccumulator() for hp in hps},
        )
        for every in ([False, True] if all_tokens else [False])
    ]
    policy = PositionFilter([hp.name for hp in hps], outlier_factor)
    means = (
        mean_activations(model, hps, batches, device, outlier_factor)
        if model_level and ce_mean
        else {}
    )
    excluded = 0
    for batch in tqdm(batches, desc="eval", unit="batch", leave=False):
        ids, mask = batch.input_ids.to(device), batch.train_mask.to(device)
        docs = batch.doc_ids.to(device)
        if model_level:
            clean = clean_pass(model, ids, hps, sorted({hp.layer for hp in hps}))
            acts = clean.acts
            sel, targets = ce_positions(ids, mask)
            scorer = NextTokenScorer(model, clean.final, sel, targets, logit_chunk)
            ce_docs = docs[sel]
        else:
            acts = capture(model, hps, ids, stop_early=True)
        keep = policy.keep_positions(acts, mask)
        excluded += int(mask.sum() - keep.sum())
        for v in views:
            positions = mask if v.every_position else keep
            x_hats = {}
            for hp, sae in saes.items():
                x = acts[hp][positions].float()
                x_hats[hp], latents = reconstruct(sae, x)
                v.recon[hp].update(x, x_hats[hp], docs[positions], latents)
            if model_level:
                _model_level_batch(
                    model,
                    clean,
                    scorer,
                    ce_docs,
                    positions,
                    x_hats,
                    {} if v.every_position else means,
                    v.ce,
                    max_variants,
                    max_batch_tokens,
                )
    results = {}
    for hp in hps:
        res: dict[str, Any] = {}
        for v in views:
            part = v.recon[hp].result()
            if model_level:
                part.update(v.ce[hp].result())
            res.update({f"{k}{v.suffix}": val for k, val in part.items()})
        res["excluded"] = excluded
        res.update(_spread(views[0], hp, bootstrap, slices, seed))
        res["latent_freq_hist"] = views[0].recon[hp].frequency_histogram()
        res["latent_fire_counts"] = views[0].recon[hp].fire_count_list()
        if model_level:
            res["delta_loss_by_sequence"] = views[0].ce[hp].by_sequence()
        results[hp.name] = res
    return results


def _spread(view: _View, hp: Hookpoint, bootstrap: int, slices: int, seed: int) -> dict[str, Any]:
    """docs, the bootstrap intervals and the region slices of one SAE (see evaluate_saes)."""
    columns = view.recon[hp].by_document()
    if view.ce:
        columns.update(view.ce[hp].by_document())
    sums = DocumentSums.from_columns(columns)
    out: dict[str, Any] = {"docs": len(sums.ids)}
    if bootstrap:
        out.update(bootstrap_intervals(sums, bootstrap, seed))
    if slices:
        out["slices"] = region_slices(sums, slices)
    return out


def _d_in(sae: SAELike, model: nn.Module) -> int:
    return sae.d_in if isinstance(sae, SparseAutoencoder) else _hidden_size(model)


def _hidden_size(model: nn.Module) -> int:
    """The residual stream width of an HF model (its config's `hidden_size`)."""
    config = model.config
    assert isinstance(config, PretrainedConfig)  # an HF model
    return config.hidden_size


def _model_level_batch(
    model: nn.Module,
    clean,
    scorer: NextTokenScorer,
    ce_docs: Tensor,
    splice: Tensor,
    x_hats: dict[Hookpoint, Tensor],
    means: dict[Hookpoint, Tensor],
    acc: dict[Hookpoint, ModelLevelAccumulator],
    max_variants: int,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> None:
    """Score one batch: clean CE, then per start layer the SAE / zero / mean splices at the
    positions `splice` [B, T] of every hookpoint of that layer (`ce_docs` [n]: the document of
    each CE position), batched `max_variants` at a
    time (on CPU also at most `max_batch_tokens` positions per replay: larger batches are
    slower per token there)."""
    variants: dict[int, list[tuple[Hookpoint, str, Any]]] = {}
    d_model = _hidden_size(model)
    per_replay = (
        max_variants
        if splice.device.type != "cpu"
        else max(1, min(max_variants, max_batch_tokens // splice.numel()))
    )
    rows = scorer.sel.nonzero(as_tuple=True)[0]
    for hp, x_hat in x_hats.items():
        acc[hp].add_clean(scorer.ce_clean, rows, ce_docs)
        kinds = [("spliced", x_hat), ("zero", x_hat.new_zeros(d_model))]
        kinds += [("mean", means[hp])] if hp in means else []
        variants.setdefault(hp.layer, []).extend((hp, k, masked_edit(splice, v)) for k, v in kinds)
    for layer, vs in sorted(variants.items()):
        for i in range(0, len(vs), per_replay):
            group = vs[i : i + per_replay]
            finals = replay_from(model, clean, layer, [{hp: edit} for hp, _, edit in group])
            for (hp, kind, _), final in zip(group, finals):
                ce, kl = scorer.score(final, with_kl=kind == "spliced")
                acc[hp].add(kind, ce, kl)


def eval_context(
    suite: str,
    model: ModelConfig,
    data: Any,
    batches: Sequence[TokenBatch],
    split: str = "eval",
    **extra: Any,
) -> dict[str, Any]:
    """What a per-SAE JSON records besides the metrics: suite, model and data configs, split
    (eval, or the reserved region), the token policy (named), splice and CE positions, and the
    sequences and tokens the evaluation read."""
    return {
        "suite": suite,
        "model": asdict(model),
        "data": asdict(data),
        "split": split,
        "token_policy": data.policy.describe(),
        "splice_positions": SPLICE_POSITIONS,
        "ce_positions": CE_POSITIONS,
        "sequences": sum(len(b.input_ids) for b in batches),
        "lm_tokens": sum(b.input_ids.numel() for b in batches),
        **extra,
    }


def scalar_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of one SAE's results: an interval `<m>_ci` as `<m>_ci_low` and
    `<m>_ci_high`; the frequency histogram, per-sequence records and slices left out."""
    out = {}
    for k, v in res.items():
        if k.endswith("_ci"):
            out[f"{k}_low"], out[f"{k}_high"] = v
        elif not isinstance(v, (dict, list)):
            out[k] = v
    return out
