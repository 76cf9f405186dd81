"""An interpretability score without an external model: each feature's simplest token-set
explanation and its detection F1 on held-out tokens (DESIGN.md section 9b).

The explanation of feature f is a set S of at most `max_set` token ids; it predicts "f fires at
token t" (activation > 0) iff the id of t is in S. On the explanation part of the tokens (the
first ones streamed) S is grown greedily: start empty, add the candidate token that raises
F1 = 2 TP / (fires + predicted) most, stop when no token raises it. Candidates are the
`n_candidates` tokens with the best single-token F1 on that part. The score is the F1 of S on
the disjoint rest of the tokens (the held-out part), with precision TP / predicted and recall
TP / fires there.

Memory: the explanation part keeps one int64 per firing (feature, token id) pair, so it is
capped at `explain_tokens` tokens; the held-out part keeps three counters per feature and one
per vocabulary entry, whatever its length.

An LLM explainer (any OpenAI-compatible chat-completions endpoint) can add a natural-language
explanation from a feature's top contexts: `OpenAIExplainer`, configured by `ExplainerConfig`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.request
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sae_dist.config import ExplainerConfig

log = logging.getLogger(__name__)


@dataclass
class TokenSetScores:
    """Per-feature explanations and their scores (d_sae = F)."""

    sets: Tensor
    """int64 [F, max_set]: explanation token ids, -1 padded (all -1: no explanation)."""
    f1_explain: Tensor
    """float64 [F]: F1 on the explanation part (NaN where the feature never fired there)."""
    f1: Tensor
    """float64 [F]: F1 on the held-out part (NaN when the feature never fired there and the
    explanation predicts nothing)."""
    precision: Tensor
    """float64 [F]: held-out TP / predicted (NaN when nothing is predicted)."""
    recall: Tensor
    """float64 [F]: held-out TP / fires (NaN when the feature never fired there)."""
    explain_tokens: int
    """Tokens of the explanation part."""
    heldout_tokens: int
    """Tokens of the held-out part."""


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den in float64, NaN where den == 0."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


def rank_within_groups(group: Tensor, priority: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """Order events by group, then by descending priority within a group (stable: ties keep
    input order). Returns (order [E], rank [E]): order[j] is the event at sorted place j and
    rank[j] its 0-based place within its group."""
    order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=group.device) - starts[group[order]]
    return order, rank


def fit_token_sets(
    pair_keys: Tensor, token_counts: Tensor, d_sae: int, max_set: int, n_candidates: int
) -> tuple[Tensor, Tensor]:
    """Greedy token-set explanations from the explanation part.

    pair_keys: int64 [E], one per firing, feature * V + token id; token_counts: int64 [V]
    occurrences of each token id among the scored tokens. Returns (sets int64 [F, max_set],
    -1 padded; F1 on this part float64 [F], NaN for features that never fired)."""
    vocab = token_counts.numel()
    uniq, tp = pair_keys.unique(return_counts=True)
    feat, tok = uniq // vocab, uniq % vocab
    fires = torch.zeros(d_sae, dtype=torch.int64).index_add_(0, feat, tp).double()
    single = 2 * tp.double() / (fires[feat] + token_counts[tok].double())
    order, rank = rank_within_groups(feat, single, d_sae)
    keep = rank < n_candidates
    rows, cols, picked = feat[order][keep], rank[keep], order[keep]
    cand = torch.full((d_sae, n_candidates), -1, dtype=torch.int64)
    cand_tp = torch.zeros(d_sae, n_candidates, dtype=torch.float64)
    cand_n = torch.zeros(d_sae, n_candidates, dtype=torch.float64)
    cand[rows, cols] = tok[picked]
    cand_tp[rows, cols] = tp[picked].double()
    cand_n[rows, cols] = token_counts[tok[picked]].double()
    sets, f1 = _greedy(cand, cand_tp, cand_n, fires, max_set)
    return sets, torch.where(fires > 0, f1, torch.full_like(f1, math.nan))


def _greedy(
    cand: Tensor, cand_tp: Tensor, cand_n: Tensor, fires: Tensor, max_set: int
) -> tuple[Tensor, Tensor]:
    """Grow every feature's set one candidate at a time while F1 rises. cand [F, C] token ids
    (-1 = none), cand_tp / cand_n [F, C] firings on / occurrences of that token, fires [F].
    Returns (sets [F, max_set], F1 [F])."""
    d_sae = cand.shape[0]
    tp_sum = torch.zeros(d_sae, dtype=torch.float64)
    pred_sum = torch.zeros(d_sae, dtype=torch.float64)
    best = torch.zeros(d_sae, dtype=torch.float64)
    usable = cand >= 0
    sets = torch.full((d_sae, max_set), -1, dtype=torch.int64)
    for step in range(max_set):
        den = (fires + pred_sum)[:, None] + cand_n
        f1 = (2 * (tp_sum[:, None] + cand_tp) / den.clamp_min(1)).masked_fill(~usable, -1.0)
        value, col = f1.max(1)
        rows = (value > best).nonzero().squeeze(1)
        if len(rows) == 0:
            break
        c = col[rows]
        sets[rows, step] = cand[rows, c]
        tp_sum[rows] += cand_tp[rows, c]
        pred_sum[rows] += cand_n[rows, c]
        best[rows] = value[rows]
        usable[rows, c] = False
    return sets, best


class TokenSetScorer:
    """Streams (token ids, firings) of one SAE: the first `explain_tokens` scored tokens find the
    explanations, every later token measures them."""

    def __init__(
        self,
        d_sae: int,
        vocab_size: int,
        explain_tokens: int,
        max_set: int = 5,
        n_candidates: int = 64,
    ):
        self.d_sae, self.vocab = d_sae, vocab_size
        self.explain_tokens, self.max_set, self.n_candidates = explain_tokens, max_set, n_candidates
        self.seen_explain = 0
        self._pairs: list[Tensor] = []
        self.counts_explain = torch.zeros(vocab_size, dtype=torch.int64)
        self.sets: Tensor | None = None
        self.f1_explain: Tensor | None = None
        self.heldout_tokens = 0
        self.counts_heldout = torch.zeros(vocab_size, dtype=torch.int64)
        self.fires_heldout = torch.zeros(d_sae, dtype=torch.int64)
        self.tp_heldout = torch.zeros(d_sae, dtype=torch.int64)

    def update(self, token_ids: Tensor, ev_token: Tensor, ev_feature: Tensor) -> None:
        """token_ids int64 [n]: ids of the scored tokens of a batch, in stream order; ev_token
        int64 [E] (index into token_ids) and ev_feature int64 [E]: the firings among them."""
        token_ids, ev_token, ev_feature = token_ids.cpu(), ev_token.cpu(), ev_feature.cpu()
        split = max(0, min(len(token_ids), self.explain_tokens - self.seen_explain))
        if split > 0:
            first = ev_token < split
            self._pairs.append(ev_feature[first] * self.vocab + token_ids[ev_token[first]])
            self.counts_explain += torch.bincount(token_ids[:split], minlength=self.vocab)
            self.seen_explain += split
        if split == len(token_ids):
            return
        self._fit()
        rest = ev_token >= split
        self._measure(token_ids[split:], ev_token[rest] - split, ev_feature[rest])

    def _fit(self) -> None:
        """Find the explanations (once) and free the explanation part's firings."""
        if self.sets is not None:
            return
        keys = torch.cat(self._pairs) if self._pairs else torch.zeros(0, dtype=torch.int64)
        self.sets, self.f1_explain = fit_token_sets(
            keys, self.counts_explain, self.d_sae, self.max_set, self.n_candidates
        )
        self._pairs = []

    def _measure(self, token_ids: Tensor, ev_token: Tensor, ev_feature: Tensor) -> None:
        self.heldout_tokens += len(token_ids)
        self.counts_heldout += torch.bincount(token_ids, minlength=self.vocab)
        self.fires_heldout += torch.bincount(ev_feature, minlength=self.d_sae)
        assert self.sets is not None  # _fit runs before the held-out part
        hit = (self.sets[ev_feature] == token_ids[ev_token][:, None]).any(1)
        self.tp_heldout += torch.bincount(ev_feature[hit], minlength=self.d_sae)

    def nbytes(self) -> int:
        """Bytes of state held (the explanation part's firings included)."""
        tensors = [
            *self._pairs,
            self.counts_explain,
            self.counts_heldout,
            self.fires_heldout,
            self.tp_heldout,
            *(t for t in (self.sets, self.f1_explain) if t is not None),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def result(self) -> TokenSetScores:
        """Explanations and held-out scores (explanations fitted now if the stream was shorter
        than the explanation part: the held-out scores are then NaN)."""
        self._fit()
        sets, f1_explain = self.sets, self.f1_explain
        assert sets is not None and f1_explain is not None  # set by _fit
        valid = sets >= 0
        predicted = (self.counts_heldout[sets.clamp_min(0)] * valid).sum(1)
        tp, fires = self.tp_heldout, self.fires_heldout
        return TokenSetScores(
            sets,
            f1_explain,
            _ratio(2 * tp, fires + predicted),
            _ratio(tp, predicted),
            _ratio(tp, fires),
            self.seen_explain,
            self.heldout_tokens,
        )


def f1_summary(f1: Tensor, threshold: float) -> dict[str, float | int]:
    """Distribution of the finite held-out F1s of one SAE: count, quartiles, mean, and how
    many reach `threshold` (token-level features)."""
    x = f1[torch.isfinite(f1)].double()
    if len(x) == 0:
        return {"scored": 0, "token_level": 0}
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {
        "scored": len(x),
        "f1_q25": float(q[0]),
        "f1_median": float(q[1]),
        "f1_q75": float(q[2]),
        "f1_mean": float(x.mean()),
        "token_level": int((x >= threshold).sum()),
        "token_level_frac": float((x >= threshold).double().mean()),
    }


# ----------------------------------------------------------------------- LLM explanations

Context = list[tuple[str, float]]
"""One example: (token text, activation) per token of its window."""


class Explainer(Protocol):
    """Anything that turns a feature's top contexts into a short explanation."""

    def explain(self, contexts: list[Context]) -> str: ...


PROMPT = (
    "Below are text excerpts on which one neuron of a language model activates. Tokens "
    "where it is active are marked as <<token>> (activation in brackets). In at most 15 "
    "words, say what the neuron detects. Answer with the explanation only.\n\n{examples}"
)


def explainer_prompt(contexts: list[Context], max_examples: int = 10) -> str:
    """The prompt text for the top `max_examples` contexts."""
    lines = []
    for k, ctx in enumerate(contexts[:max_examples]):
        text = "".join(f"<<{t}>>[{a:.2g}]" if a > 0 else t for t, a in ctx)
        lines.append(f"{k + 1}. {text!r}")
    return PROMPT.format(examples="\n".join(lines))


class OpenAIExplainer:
    """Explanations from an OpenAI-compatible `POST {endpoint}/chat/completions`."""

    def __init__(self, cfg: ExplainerConfig):
        self.cfg = cfg

    def explain(self, contexts: list[Context]) -> str:
        body = {
            "model": self.cfg.model,
            "temperature": 0,
            "max_tokens": 60,
            "messages": [{"role": "user", "content": explainer_prompt(contexts)}],
        }
        headers = {"Content-Type": "application/json"}
        endpoint = self.cfg.endpoint
        assert endpoint is not None  # an explainer is made only for a configured endpoint
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            f"{endpoint.rstrip('/')}/chat/completions",
            data=json.dumps(body).encode(),
            headers=headers,
        )
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            reply = json.loads(response.read())
        return str(reply["choices"][0]["message"]["content"]).strip()
