"""Contrast sets: activations at chosen tokens of two sets of sequences, every SAE feature scored
by how it separates them, and the difference-in-means direction (DESIGN.md section 9).

Two token sets are used by the refusal study:
- prompt contrast: the end-of-instruction tokens (the chat template's text after the user's
  message: `<|im_end|>\\n<|im_start|>assistant\\n` for ChatML) of harmful vs harmless requests;
- response contrast: the first content tokens of assistant responses that refuse vs comply.

Scores per feature f over the latents z_f (float32, raw-activation SAEs):
- mean_diff = mean_pos z_f - mean_neg z_f (latent units = activation units along the unit-norm
  decoder row);
- auroc = P(z_f(pos) > z_f(neg)) + P(z_f(pos) = z_f(neg)) / 2 over token pairs (mid-ranks, so
  ties, mostly zeros of a sparse SAE, count half): 1 = f is larger on every positive token;
- freq_pos / freq_neg = fraction of tokens with z_f > 0.
The difference-in-means direction is mean_pos x - mean_neg x of the raw activations (Arditi et
al. 2024), in activation units.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.data import chat_content_spans
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.sae import SparseAutoencoder
from sae_dist.steer.generate import render_prompts

log = logging.getLogger(__name__)

_MARK = "\ue000"
"""Stand-in user content (a private-use character) that locates the template's own text."""


@dataclass
class ContrastTokens:
    """Activations at selected tokens of a set of sequences."""

    acts: dict[Hookpoint, Tensor]
    """float32 [n_tokens, d_model] per hookpoint, one row per selected token."""
    sequences: list[list[int]] = field(default_factory=list)
    """Token ids of every sequence (for contexts)."""
    where: list[tuple[int, int]] = field(default_factory=list)
    """(sequence index, position) of each activation row."""

    def context(self, tokenizer, row: int, before: int = 12) -> str:
        """The text up to and including the token of activation `row`, that token in [[ ]]."""
        seq, pos = self.where[row]
        ids = self.sequences[seq]
        left = tokenizer.decode(ids[max(0, pos - before) : pos])
        return f"{left}[[{tokenizer.decode(ids[pos : pos + 1])}]]".replace("\n", "\\n")


def eoi_length(tokenizer) -> int:
    """Number of end-of-instruction tokens: the template's tokens after a user message's content
    when the assistant header is appended."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
    )
    suffix = text[text.index(_MARK) + len(_MARK) :]
    return len(tokenizer(suffix, add_special_tokens=False)["input_ids"])


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    """(ids int64 [B, T], attention mask int64 [B, T]) padded on the left or the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.int64)
        mask[i, span] = 1
    return ids, mask


@torch.no_grad()
def collect(
    model: nn.Module,
    hookpoints: list[Hookpoint],
    sequences: list[list[int]],
    positions: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
    desc: str = "activations",
) -> ContrastTokens:
    """Activations at `positions[i]` (indices into `sequences[i]`) of every sequence, run in
    right-padded batches with their attention mask, stopping after the last layer needed."""
    device = next(model.parameters()).device
    acts: dict[Hookpoint, list[Tensor]] = {hp: [] for hp in hookpoints}
    where = []
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch", leave=False):
        rows = list(range(start, min(start + batch_size, len(sequences))))
        ids, mask = _pad([sequences[i] for i in rows], pad_id, left=False)
        out = capture(model, hookpoints, ids.to(device), attention_mask=mask.to(device))
        b = torch.tensor([j for j, i in enumerate(rows) for _ in positions[i]], dtype=torch.long)
        t = torch.tensor([p for i in rows for p in positions[i]], dtype=torch.long)
        for hp in hookpoints:
            acts[hp].append(out[hp][b.to(device), t.to(device)].float().cpu())
        where += [(i, p) for i in rows for p in positions[i]]
    return ContrastTokens({hp: torch.cat(a) for hp, a in acts.items()}, sequences, where)


def prompt_tokens(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    hookpoints: list[Hookpoint],
    batch_size: int = 16,
    desc: str = "prompt tokens",
) -> ContrastTokens:
    """Activations at the end-of-instruction tokens of each prompt (one user turn rendered with
    the chat template and the assistant header): `eoi_length` rows per prompt."""

    seqs = render_prompts(tokenizer, prompts)
    n = eoi_length(tokenizer)
    positions = [list(range(len(s) - n, len(s))) for s in seqs]
    return collect(model, hookpoints, seqs, positions, _pad_id(tokenizer), batch_size, desc)


def response_tokens(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    hookpoints: list[Hookpoint],
    n_tokens: int,
    batch_size: int = 16,
    desc: str = "response tokens",
) -> ContrastTokens:
    """Activations at the first `n_tokens` content tokens of the assistant message of each
    (user, assistant) pair, rendered as a two-turn chat (pairs the template cannot render, or
    with no assistant token, are skipped with a log line)."""
    seqs, positions = [], []
    for user, assistant in pairs:
        rendered = chat_content_spans(
            [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            tokenizer,
            assistant_only=True,
        )
        if rendered is None or not rendered[1]:
            continue
        text, spans = rendered
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ((lo, hi),) = spans
        inside = [
            t for t, (a, b) in enumerate(enc["offset_mapping"]) if a >= lo and b <= hi and b > a
        ]
        if inside:
            seqs.append(enc["input_ids"][: inside[min(n_tokens, len(inside)) - 1] + 1])
            positions.append(inside[:n_tokens])
    if len(seqs) < len(pairs):
        log.info("%s: %d of %d pairs skipped (template)", desc, len(pairs) - len(seqs), len(pairs))
    return collect(model, hookpoints, seqs, positions, _pad_id(tokenizer), batch_size, desc)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ----------------------------------------------------------------------------------- scores


@torch.no_grad()
def latents_dense(sae: SparseAutoencoder, x: Tensor, chunk: int = 1024) -> Tensor:
    """Dense latents float32 [n, d_sae] of activations x [n, d_in]."""
    return (
        torch.cat([sae.encode(c.to(sae.W_dec.dtype)).dense().float() for c in x.split(chunk)])
        if len(x)
        else x.new_zeros(0, sae.d_sae)
    )


def auroc(pos: Tensor, neg: Tensor, chunk: int = 512) -> Tensor:
    """Per column, P(pos > neg) + P(pos = neg) / 2 over all (pos row, neg row) pairs, from
    mid-ranks: pos [n_pos, F], neg [n_neg, F] -> float64 [F]."""
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both sets non-empty (got {n_pos} and {n_neg} rows)")
    out = []
    for cols in range(0, pos.shape[1], chunk):
        x = torch.cat([pos[:, cols : cols + chunk], neg[:, cols : cols + chunk]]).t().contiguous()
        s = x.sort(dim=1).values
        lo = torch.searchsorted(s, x, right=False)
        hi = torch.searchsorted(s, x, right=True)
        rank = (lo + hi + 1).double() / 2  # 1-based mean rank of the tied block
        out.append((rank[:, :n_pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return torch.cat(out)


@dataclass
class FeatureScores:
    """Per-feature contrast statistics of one SAE (all [d_sae])."""

    mean_pos: Tensor
    mean_neg: Tensor
    mean_diff: Tensor
    auroc: Tensor
    freq_pos: Tensor
    freq_neg: Tensor

    def ranking(self, by: str = "auroc") -> Tensor:
        """Feature ids, best first: by `auroc` or `mean_diff`, ties broken by the other; only
        features larger on the positive set (mean_diff > 0) rank before the rest."""
        if by not in ("auroc", "mean_diff"):
            raise ValueError(f"rank_by={by!r}; allowed: auroc, mean_diff")
        first, second = (
            (self.auroc, self.mean_diff) if by == "auroc" else (self.mean_diff, self.auroc)
        )
        order = torch.argsort(second.double(), descending=True, stable=True)
        order = order[torch.argsort(first.double()[order], descending=True, stable=True)]
        positive = self.mean_diff[order] > 0
        return torch.cat([order[positive], order[~positive]])

    def row(self, f: int) -> dict[str, float]:
        return {
            "feature": int(f),
            **{
                k: float(getattr(self, k)[f])
                for k in ("auroc", "mean_diff", "mean_pos", "mean_neg", "freq_pos", "freq_neg")
            },
        }


def score_features(sae: SparseAutoencoder, pos: Tensor, neg: Tensor) -> FeatureScores:
    """Scores of every feature of `sae` between activations pos [n_pos, d] and neg [n_neg, d]."""
    zp, zn = latents_dense(sae, pos), latents_dense(sae, neg)
    mp, mn = zp.double().mean(0), zn.double().mean(0)
    return FeatureScores(
        mp, mn, mp - mn, auroc(zp, zn), (zp > 0).double().mean(0), (zn > 0).double().mean(0)
    )


def diff_in_means(pos: Tensor, neg: Tensor) -> Tensor:
    """mean(pos) - mean(neg) of activations [n, d] -> float32 [d] (sums in float64)."""
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def top_contexts(
    sae: SparseAutoencoder,
    feature: int,
    sets: dict[str, ContrastTokens],
    hp: Hookpoint,
    tokenizer,
    n: int = 5,
) -> list[dict]:
    """The `n` tokens of `sets` (label -> tokens) where `feature` is largest, with their set,
    activation and text context."""
    found = []
    for label, toks in sets.items():
        z = latents_dense(sae, toks.acts[hp])[:, feature]
        vals, rows = z.topk(min(n, len(z)))
        found += [(float(v), label, toks, int(r)) for v, r in zip(vals, rows) if v > 0]
    found.sort(key=lambda t: -t[0])
    return [
        {"activation": v, "set": label, "context": toks.context(tokenizer, r)}
        for v, label, toks, r in found[:n]
    ]
