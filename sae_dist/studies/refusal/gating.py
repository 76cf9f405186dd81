"""Choosing a gate on selection prompts (DESIGN.md section 9, "Gated interventions"): its
features (or direction), reduce and threshold by F1, and its held-out AUROC, precision, recall.

Activations come from every prompt position a gate reads (`gate.prompt_positions`: the rendered
prompt less its first token), one row per position, `segments` giving each row's prompt. Labels
are per prompt: True = should open (harmful), False = should stay closed (harmless, near miss).

- SAE gate at a hookpoint: every feature's per-prompt reduced activation (max or mean over the
  prompt's positions) is scored by AUROC between the two label sets; for each k of `ks` the top k
  features (AUROC > 0.5 only) get weights w_f = 1 / std_f (std_f: the spread of the reduced
  activation over the selection prompts, so each feature counts in units of its spread) and the
  gate score is the reduce of sum_f w_f z_f over the positions; the candidate (reduce, k) with
  the highest F1 at its best threshold wins (ties: fewer features, then max before mean).
- Direction gate (CAST's condition): u = the unit difference in means of the per-prompt mean
  activations, positives minus negatives; score <x_t, u> reduced by max or mean; best F1 wins.
- Threshold: the F1-maximising cut of `score >= threshold`, placed halfway between the lowest
  score called positive and the highest score below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sae_dist.hookpoints import Hookpoint
from sae_dist.sae import SparseAutoencoder
from sae_dist.steer import ContrastTokens, Gate, direction_gate, features_gate, render_prompts
from sae_dist.steer.contrast import auroc, collect, latents_dense
from sae_dist.steer.gate import REDUCES


def gate_tokens(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    hookpoints: list[Hookpoint],
    batch_size: int = 16,
    desc: str = "prompt positions",
) -> ContrastTokens:
    """Activations at every position a gate reads: each prompt rendered as `generate` renders
    it, less its first token (one row per position, `where` = (prompt index, position))."""
    seqs = render_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collect(
        model, hookpoints, seqs, [list(range(1, len(s))) for s in seqs], pad, batch_size, desc
    )


@dataclass
class GateData:
    """Gate-position activations of labelled prompts, concatenated."""

    acts: dict[Hookpoint, Tensor]
    """float32 [rows, d_model] per hookpoint."""
    segments: Tensor
    """int64 [rows]: the prompt of each row."""
    labels: Tensor
    """bool [n_prompts]: True = the gate should open."""

    @classmethod
    def of(cls, parts: Sequence[tuple[ContrastTokens, bool]]) -> GateData:
        """Concatenate (tokens, label) parts; prompts are numbered in part order."""
        acts = {hp: torch.cat([t.acts[hp] for t, _ in parts]) for hp in parts[0][0].acts}
        segments, labels, offset = [], [], 0
        for toks, label in parts:
            segments.append(torch.tensor([seq for seq, _ in toks.where], dtype=torch.long) + offset)
            labels += [label] * len(toks.sequences)
            offset += len(toks.sequences)
        return cls(acts, torch.cat(segments), torch.tensor(labels, dtype=torch.bool))


def segment_reduce(values: Tensor, segments: Tensor, n: int, reduce: str) -> Tensor:
    """Reduce rows of values [rows, ...] by segment id segments int64 [rows] -> [n, ...]."""
    shape = (n,) + tuple(values.shape[1:])
    index = segments.view(-1, *([1] * (values.dim() - 1))).expand_as(values)
    how = "amax" if reduce == "max" else "mean"
    init = torch.full(shape, float("-inf") if reduce == "max" else 0.0, dtype=values.dtype)
    return init.scatter_reduce(0, index, values, how, include_self=False)


def best_threshold(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """(threshold, F1) of the F1-maximising rule `score >= threshold`; scores [n], labels bool
    [n] with at least one True."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], labels[order].double()
    tp = torch.cumsum(y, 0)
    k = torch.arange(1, len(s) + 1, dtype=torch.float64)
    f1 = 2 * tp / (k + y.sum())
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] < s[:-1]  # a cut only where the score drops (ties go together)
    f1 = torch.where(last, f1, torch.tensor(-1.0, dtype=torch.float64))
    i = int(torch.argmax(f1))
    below = float(s[i + 1]) if i + 1 < len(s) else float(s[i]) - 1.0
    return (float(s[i]) + below) / 2, float(f1[i])


def gate_metrics(scores: Tensor, labels: Tensor, opened: Tensor) -> dict[str, float]:
    """AUROC of the scores, and precision / recall / F1 / false-positive rate of the decisions
    (scores [n] float, labels and opened bool [n])."""
    tp = int((opened & labels).sum())
    fp = int((opened & ~labels).sum())
    pos, neg = int(labels.sum()), int((~labels).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / pos if pos else float("nan")
    f1 = 2 * tp / (tp + fp + pos) if tp + fp + pos else float("nan")
    roc = (
        float(auroc(scores[labels, None], scores[~labels, None])[0])
        if pos and neg
        else float("nan")
    )
    return {
        "auroc": roc,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fpr": fp / neg if neg else float("nan"),
        "n_pos": pos,
        "n_neg": neg,
    }


@dataclass
class GateChoice:
    """The best gate of one kind at one hookpoint, and every candidate tried."""

    gate: Gate
    kind: str
    """sae or direction."""
    f1: float
    """Selection F1 at the chosen threshold."""
    auroc: float
    """Selection AUROC of the chosen score."""
    candidates: list[dict] = field(default_factory=list)
    """{reduce, k, threshold, f1, auroc} of every candidate."""


def _choose(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["f1"], -r.get("k", 0), r["reduce"] == "max"))


def calibrate_sae_gate(
    hp: Hookpoint,
    sae: SparseAutoencoder,
    acts: Tensor,
    segments: Tensor,
    labels: Tensor,
    ks: Sequence[int],
    reduces: Sequence[str] = REDUCES,
    chunk: int = 2048,
) -> GateChoice:
    """The SAE gate at `hp` from activations acts [rows, d] of the prompts' positions."""
    n = len(labels)
    z = torch.cat([latents_dense(sae, c) for c in acts.split(chunk)])  # [rows, d_sae]
    rows, best = [], None
    for reduce in reduces:
        per_prompt = segment_reduce(z, segments, n, reduce)
        roc = auroc(per_prompt[labels], per_prompt[~labels])
        order = torch.argsort(roc, descending=True, stable=True)
        spread = per_prompt.std(0).clamp_min(1e-6)
        for k in sorted(set(ks)):
            feats = [int(f) for f in order[:k] if roc[f] > 0.5]
            if len(feats) < k:
                continue
            w = (1 / spread[feats]).float()
            score = segment_reduce(z[:, feats] @ w, segments, n, reduce)
            threshold, f1 = best_threshold(score, labels)
            row = {
                "reduce": reduce,
                "k": k,
                "threshold": threshold,
                "f1": f1,
                "auroc": float(auroc(score[labels, None], score[~labels, None])[0]),
                "features": feats,
                "weights": w.tolist(),
            }
            rows.append(row)
    if not rows:
        raise ValueError(f"no feature of the SAE at {hp} is larger on the positive prompts")
    best = _choose(rows)
    gate = features_gate(
        hp, sae, best["features"], best["weights"], best["threshold"], best["reduce"]
    )
    return GateChoice(gate, "sae", best["f1"], best["auroc"], rows)


def calibrate_direction_gate(
    hp: Hookpoint, acts: Tensor, segments: Tensor, labels: Tensor, reduces: Sequence[str] = REDUCES
) -> GateChoice:
    """The difference-in-means condition at `hp` (CAST) from acts [rows, d]."""
    n = len(labels)
    means = segment_reduce(acts.double(), segments, n, "mean")
    u = (means[labels].mean(0) - means[~labels].mean(0)).float()
    u = u / u.norm().clamp_min(1e-12)
    proj = acts.float() @ u
    rows = []
    for reduce in reduces:
        score = segment_reduce(proj, segments, n, reduce)
        threshold, f1 = best_threshold(score, labels)
        rows.append(
            {
                "reduce": reduce,
                "threshold": threshold,
                "f1": f1,
                "auroc": float(auroc(score[labels, None], score[~labels, None])[0]),
            }
        )
    best = _choose(rows)
    gate = direction_gate(hp, u, best["threshold"], best["reduce"])
    return GateChoice(gate, "direction", best["f1"], best["auroc"], rows)
