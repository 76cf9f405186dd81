"""The near-miss prompt set (`data/near_miss.jsonl`, shipped in the package): harmless requests
that look harmful, in XSTest's categories, each paired with an unsafe contrast.

Each line is {"prompt", "category", "kind": "safe" | "unsafe", "pair_id"}; a pair_id names one
safe prompt and its unsafe contrast (same category). Written for this project (not XSTest's
text): 24 pairs in each of homonyms, figurative language, safe targets, safe contexts,
definitions, history and privacy of public figures (public facts vs private data).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sae_dist.errors import ConfigError

DATA = Path(__file__).parent / "data" / "near_miss.jsonl"
CATEGORIES = (
    "homonyms",
    "figurative",
    "safe_targets",
    "safe_contexts",
    "definitions",
    "history",
    "privacy_public",
)
KINDS = ("safe", "unsafe")


def load_near_miss(path: Path | None = None) -> list[dict]:
    """The rows of the set (default: the shipped file); ConfigError naming the line when one is
    malformed or a pair is incomplete."""
    path = Path(path) if path else DATA
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = (
                isinstance(row.get("prompt"), str)
                and row["prompt"].strip()
                and row.get("category") in CATEGORIES
                and row.get("kind") in KINDS
                and isinstance(row.get("pair_id"), str)
            )
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ConfigError(
                "near_miss",
                f"{path}:{n}",
                "{prompt, category (one of "
                f"{', '.join(CATEGORIES)}), kind (safe|unsafe), pair_id}}",
            )
        rows.append(row)
    kinds: dict[str, list[str]] = {}
    for row in rows:
        kinds.setdefault(row["pair_id"], []).append(row["kind"])
    bad = [p for p, k in kinds.items() if sorted(k) != ["safe", "unsafe"]]
    if bad:
        raise ConfigError(
            "near_miss", f"{path}: pairs {bad[:3]}", "one safe and one unsafe prompt per pair_id"
        )
    return rows


@dataclass
class NearMissSplit:
    """Selection and measurement parts, split by pair (a safe prompt and its contrast are in the
    same part) within each category."""

    safe_select: list[str]
    unsafe_select: list[str]
    safe_measure: list[str]
    unsafe_measure: list[str]
    category: dict[str, str] = field(default_factory=dict)
    """prompt -> category."""


def split_near_miss(rows: list[dict], select_fraction: float, seed: int) -> NearMissSplit:
    """Per category, the pairs shuffled with `seed`; the first round(select_fraction * n) go to
    selection, the rest to measurement."""
    by_pair: dict[str, dict[str, str]] = {}
    for row in rows:
        by_pair.setdefault(row["pair_id"], {})[row["kind"]] = row["prompt"]
    split = NearMissSplit([], [], [], [], {r["prompt"]: r["category"] for r in rows})
    rng = random.Random(seed)
    for cat in CATEGORIES:
        pairs = sorted({r["pair_id"] for r in rows if r["category"] == cat})
        rng.shuffle(pairs)
        n_select = round(select_fraction * len(pairs))
        for i, pid in enumerate(pairs):
            safe, unsafe = (
                (split.safe_select, split.unsafe_select)
                if i < n_select
                else (split.safe_measure, split.unsafe_measure)
            )
            safe.append(by_pair[pid]["safe"])
            unsafe.append(by_pair[pid]["unsafe"])
    return split
