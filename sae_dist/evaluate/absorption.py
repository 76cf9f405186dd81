"""Feature absorption on the first-letter task (SAEBench, Karvonen et al. 2025; the method of
Chanin et al. 2024, "A is for Absorption"), from the papers' description; definitions in
DESIGN.md section 8b.

Words: single-token vocabulary entries made of ASCII letters (with or without one leading
space); label = the first letter. Each word is put in a prompt of `icl_examples` solved
examples and `template` (`<word> has the first letter:`); the activation at the word's token is
read at every hookpoint (one forward pass per batch for all SAEs). Words are split into a
training part and a test part.

Per SAE and letter L:
1. the dense probe: logistic regression "first letter is L" on the training activations; its
   test F1; letters below `min_probe_f1` or with fewer than `min_true_positives` correctly
   classified test words are not evaluated;
2. the letter's latents: latents ranked by the mean difference of their activation between
   L-words and other words (training part); k-sparse probes (logistic regression on the top k)
   for k = 1..max_k; the main latents are the top k while each step raises the test F1 by more
   than `split_f1_jump` (k = 1 at least);
3. on each test word of L the probe classifies correctly (its true positives), with u the unit
   probe direction, P = <x, u> the activation's projection, p_f = z_f <W_dec[f], u> each
   latent's contribution to it and cos_f the cosine of W_dec[f] with u:
   - absorption fraction: M = sum of p_f over the main latents; A = sum of the `max_absorbers`
     largest positive p_f among the other latents with cos_f >= `fraction_cos`. It is 0 when
     P <= 0, M >= P or A < `projection_share` P; 1 when M <= 0; else a / (a + M) with
     a = min(A, P - M);
   - full absorption: no main latent fires, the latent with the largest p_f has cos_f >=
     `full_cos`, P >= 0, and that p_f >= `projection_share` P.
   The letter's absorption rate and full-absorption rate are the mean fraction and the share of
   full absorptions over its true positives.
The SAE's `absorption` and `full_absorption` are the means over evaluated letters;
`split_latents` the mean number of main latents; `absorption_letters` how many letters were
evaluated.

Memory: activations [words, d_model] per hookpoint and one SAE's latents [words, d_sae] at a
time, fixed by `words`.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.config import AbsorptionConfig
from sae_dist.data import special_token_ids
from sae_dist.evaluate.linear_probe import LinearProbe, f1, fit_probe
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.sae import SparseAutoencoder

log = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD = re.compile(r" ?[A-Za-z]+")
"""A single-token word: ASCII letters, optionally after one space."""


@dataclass
class WordSet:
    """Single-token words with their first letter, split into training and test parts."""

    ids: list[int]
    """Token id of each word."""
    texts: list[str]
    letters: Tensor
    """int64 [n]: index in LETTERS of each word's first letter."""
    train: Tensor
    """bool [n]: the word is in the training part."""


def vocabulary_words(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of every single-token word of the vocabulary, special tokens aside."""
    special = special_token_ids(tokenizer)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    return [(i, t) for i, t in zip(ids, texts) if WORD.fullmatch(t)]


def sample_words(tokenizer, cfg: AbsorptionConfig) -> WordSet:
    """`cfg.words` words drawn at random (seeded) and split `train_fraction` / rest."""
    words = vocabulary_words(tokenizer)
    if len(words) < cfg.words:
        raise ValueError(f"the vocabulary has {len(words)} single-token words, < {cfg.words}")
    rng = random.Random(cfg.seed)
    chosen = rng.sample(words, cfg.words)
    n_train = round(cfg.words * cfg.train_fraction)
    train = torch.zeros(cfg.words, dtype=torch.bool)
    train[:n_train] = True
    return WordSet(
        [i for i, _ in chosen],
        [t for _, t in chosen],
        torch.tensor([LETTERS.index(t.strip()[0].lower()) for _, t in chosen]),
        train,
    )


def prompt_ids(tokenizer, words: WordSet, cfg: AbsorptionConfig) -> list[tuple[list[int], int]]:
    """Per word: (token ids of its prompt, position of the word's token). The prompt is BOS
    (when the tokenizer has one), `icl_examples` solved examples from the other words, each
    `template` + " <LETTER>\\n", then `template` with the word; the word is its own token id."""
    rng = random.Random(cfg.seed + 1)
    before, after = cfg.template.split("{word}", 1)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    out = []
    for i, word_id in enumerate(words.ids):
        others = rng.sample(range(len(words.ids) - 1), cfg.icl_examples)
        examples = [words.texts[j if j < i else j + 1] for j in others]
        prefix = "".join(
            cfg.template.format(word=e) + " " + e.strip()[0].upper() + "\n" for e in examples
        )
        head = bos + tokenizer(prefix + before, add_special_tokens=False)["input_ids"]
        out.append((head + [word_id] + after_ids, len(head)))
    return out


@torch.no_grad()
def word_activations(
    model: nn.Module,
    hookpoints: list[Hookpoint],
    prompts: list[tuple[list[int], int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> dict[Hookpoint, Tensor]:
    """Activation at each prompt's word position, float32 [n, d_model] per hookpoint. Batches
    are right-padded (causal attention: padding after the word changes nothing before it)."""
    out: dict[Hookpoint, list[Tensor]] = {hp: [] for hp in hookpoints}
    for start in tqdm(range(0, len(prompts), batch_size), desc="absorption", leave=False):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
        for row, (p, _) in enumerate(batch):
            ids[row, : len(p)] = torch.tensor(p)
        at = torch.tensor([pos for _, pos in batch])
        acts = capture(model, hookpoints, ids.to(device), stop_early=True)
        for hp in hookpoints:
            out[hp].append(acts[hp][torch.arange(len(batch)), at.to(device)].float().cpu())
    return {hp: torch.cat(v) for hp, v in out.items()}


@dataclass
class LetterResult:
    letter: str
    probe_f1: float
    """Dense probe's F1 on the test words."""
    true_positives: int
    """Test words of the letter the probe classifies correctly."""
    main_latents: list[int]
    """The letter's main (split) latents."""
    k_sparse_f1: list[float]
    """Test F1 of the k-sparse probes, k = 1, 2, ... (up to the first k that adds nothing)."""
    absorption: float
    """Mean absorption fraction over the true positives (NaN when not evaluated)."""
    full_absorption: float
    """Share of the true positives fully absorbed (NaN when not evaluated)."""
    evaluated: bool


def latent_ranking(z: Tensor, positive: Tensor, k: int) -> Tensor:
    """The k latents of z [n, d_sae] with the largest mean(z | positive) - mean(z | not
    positive) (int64 [k], best first)."""
    diff = z[positive].double().mean(0) - z[~positive].double().mean(0)
    return diff.topk(min(k, z.shape[1])).indices


def main_latents(
    z_train: Tensor,
    y_train: Tensor,
    z_test: Tensor,
    y_test: Tensor,
    cfg: AbsorptionConfig,
) -> tuple[list[int], list[float]]:
    """(main latents, k-sparse test F1 for k = 1, 2, ... up to the first k that adds no split
    latent): the top-k latents by mean difference while each k (up to max_k) raises the
    k-sparse probe's test F1 by more than `split_f1_jump`."""
    ranked = latent_ranking(z_train, y_train, cfg.max_k)
    scores: list[float] = []
    for k in range(1, len(ranked) + 1):
        cols = ranked[:k]
        probe = fit_probe(z_train[:, cols], y_train)
        scores.append(f1(probe.decision(z_test[:, cols]) > 0, y_test))
        if k > 1 and scores[-1] <= scores[-2] + cfg.split_f1_jump:
            return [int(i) for i in ranked[: k - 1]], scores
    return [int(i) for i in ranked], scores


def absorption_scores(
    x: Tensor, z: Tensor, W_dec: Tensor, direction: Tensor, main: list[int], cfg: AbsorptionConfig
) -> tuple[Tensor, Tensor]:
    """Per word (rows of x [m, d_in] and their latents z [m, d_sae]): (absorption fraction
    float64 [m], full absorption bool [m]) for the probe `direction` [d_in] and the letter's
    `main` latents, as the module docstring defines them."""
    u = direction.double() / direction.double().norm()
    dec_u = W_dec.double().cpu() @ u
    cos = dec_u / W_dec.double().cpu().norm(dim=1).clamp_min(1e-12)
    total = x.double().cpu() @ u
    proj = z.double().cpu() * dec_u
    is_main = torch.zeros(len(dec_u), dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)
    can_absorb = (~is_main & (cos >= cfg.fraction_cos))[None, :] & (proj > 0)
    absorbers = proj.masked_fill(~can_absorb, 0).topk(min(cfg.max_absorbers, proj.shape[1])).values
    a_sum = absorbers.sum(1)
    safe_total = total.where(total > 0, torch.ones_like(total))
    none = (total <= 0) | (main_proj >= total) | (a_sum < cfg.projection_share * safe_total)
    a = torch.minimum(a_sum, total - main_proj)
    partial = (a / (a + main_proj).clamp_min(1e-300)).clamp(0, 1)
    fraction = torch.where(none, 0.0, torch.where(main_proj <= 0, 1.0, partial))
    top_proj, top = proj.max(1)
    full = (
        (z[:, main].abs() < 1e-8).all(1).cpu()
        & (cos[top] >= cfg.full_cos)
        & (total >= 0)
        & (top_proj >= cfg.projection_share * total)
    )
    return fraction, full


def letter_absorption(
    letter: int,
    x: Tensor,
    z: Tensor,
    words: WordSet,
    W_dec: Tensor,
    probe: LinearProbe,
    cfg: AbsorptionConfig,
) -> LetterResult:
    """One letter's probe quality, main latents and absorption rates on the test words (x [n,
    d_in] and z [n, d_sae] hold every word's activation and latents)."""
    y = words.letters == letter
    train, test = words.train, ~words.train
    hit = probe.decision(x[test]) > 0
    probe_f1 = f1(hit, y[test])
    main, k_f1 = main_latents(z[train], y[train], z[test], y[test], cfg)
    tp = test.clone()
    tp[test] = hit & y[test]
    n_tp = int(tp.sum())
    if probe_f1 < cfg.min_probe_f1 or n_tp < cfg.min_true_positives:
        return LetterResult(LETTERS[letter], probe_f1, n_tp, main, k_f1, math.nan, math.nan, False)
    fraction, full = absorption_scores(x[tp], z[tp], W_dec, probe.weight, main, cfg)
    return LetterResult(
        LETTERS[letter],
        probe_f1,
        n_tp,
        main,
        k_f1,
        float(fraction.mean()),
        float(full.double().mean()),
        True,
    )


def sae_absorption(
    sae: SparseAutoencoder, x: Tensor, words: WordSet, cfg: AbsorptionConfig
) -> dict[str, Any]:
    """Every letter's result and the SAE's summary (module docstring) for activations x [n,
    d_in] of `words`."""
    with torch.no_grad():
        z = sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)).dense().float().cpu()
    W_dec = sae.W_dec.detach().float().cpu()
    letters = []
    for c in range(len(LETTERS)):
        y = words.letters == c
        if int(y[words.train].sum()) < 2 or not bool(y[~words.train].any()):
            continue
        probe = fit_probe(x[words.train], y[words.train])
        letters.append(letter_absorption(c, x, z, words, W_dec, probe, cfg))
    done = [r for r in letters if r.evaluated]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return {
        "absorption": mean([r.absorption for r in done]),
        "full_absorption": mean([r.full_absorption for r in done]),
        "split_latents": mean([float(len(r.main_latents)) for r in done]),
        "absorption_letters": len(done),
        "absorption_by_letter": [vars(r) for r in letters],
    }


def evaluate_absorption(
    model: nn.Module,
    tokenizer,
    saes: dict[Hookpoint, SparseAutoencoder],
    cfg: AbsorptionConfig,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Absorption of every SAE (keyed by hookpoint name): one set of prompts, one forward pass
    per batch for all hookpoints, then each SAE's probes and rates."""
    words = sample_words(tokenizer, cfg)
    prompts = prompt_ids(tokenizer, words, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acts = word_activations(model, list(saes), prompts, pad, cfg.batch_size, device)
    out = {}
    for hp, sae in tqdm(saes.items(), desc="absorption probes", leave=False):
        out[hp.name] = sae_absorption(sae, acts[hp], words, cfg)
        log.info(
            "%s: absorption %.3f, full absorption %.3f over %d letters",
            hp.name,
            out[hp.name]["absorption"],
            out[hp.name]["full_absorption"],
            out[hp.name]["absorption_letters"],
        )
    return out
