"""The static feature report: one folder that opens from disk (`file://`), with no server and no
network (DESIGN.md section 9b).

Browsers block `fetch` of local files, so every data file is a script that hands its payload to
a callback of the page (`SAEReport.<kind>(...)`), loaded on demand by adding a `<script>` tag:

    index.html, assets/app.js, assets/app.css     the page (package data: report_assets/)
    data/suite.js      run info, per hookpoint its suite metrics and score summary, steering
    data/vocab.js      text of every token id the report shows, and the special token ids
    data/<hp>/list.js  per feature: density, max activation, F1, explanation, top token
    data/<hp>/<b>.js   features b*per_file .. (b+1)*per_file-1: contexts, histogram, logit lens
    features.json      run info, figures and per-hookpoint summaries (`sae_dist.features`)

Contexts are compact: token ids as base64 little-endian uint16 (uint24 for vocabularies over
65,535 ids; 0xFFFF... = outside the row); the feature's activation only where it is active, as
base64 byte pairs (window offset, uint8 in units of its maximum activation / 255, at least 1);
and the exact activation of the centre token. Numbers carry 4 significant digits.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from sae_dist.checkpoint import read_suite_index
from sae_dist.data import special_token_ids
from sae_dist.features.collect import HookpointFeatures, KeptExamples

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "report_assets"
"""index.html, app.js and app.css of the report (package data)."""
INTERVENTION_FILE = "intervention.json"
RESULT_FILES = ("results.json", "summary.json", "metrics.json")
"""JSON files beside intervention.json shown on the steered features' pages (when present)."""
MAX_RESULT_CHARS = 200_000
"""Result files larger than this are linked by name only."""


# ------------------------------------------------------------------------------ encoding


def _num(x: float) -> float | None:
    """4 significant digits; None for NaN / inf."""
    return float(f"{x:.4g}") if math.isfinite(x) else None


def encode_examples(kept: KeptExamples, scale: Tensor, width: int) -> list[list[list | None]]:
    """Per feature and slot: [centre activation, token ids b64, activations b64], or None for
    an empty slot. Token ids as little-endian unsigned ints of `width` bytes (-1 as all ones).
    Activations sparsely, as byte pairs (window offset, q) for the tokens where the feature is
    active, q = round(255 * a / scale[f]) clamped to 1..255 (scale [F])."""
    tok = kept.tokens.numpy().astype(np.int64)
    tok[tok < 0] = (1 << (8 * width)) - 1
    raw = np.ascontiguousarray(tok.astype("<u4").view(np.uint8).reshape(*tok.shape, 4)[..., :width])
    acts = kept.acts.double()
    q = (acts / scale.double().clamp_min(1e-30)[:, None, None] * 255).round().clamp(1, 255)
    q = torch.where(acts > 0, q, 0).to(torch.uint8).numpy()
    offsets = np.arange(q.shape[2], dtype=np.uint8)
    values, filled = kept.value.tolist(), (kept.position >= 0).tolist()
    b64 = base64.b64encode

    def sparse(qs: np.ndarray) -> str:
        on = qs > 0
        return b64(np.stack([offsets[on], qs[on]], 1).tobytes()).decode()

    return [
        [
            [_num(values[f][s]), b64(raw[f, s].tobytes()).decode(), sparse(q[f, s])]
            if filled[f][s]
            else None
            for s in range(kept.n)
        ]
        for f in range(len(values))
    ]


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Display text of each token id (special tokens as their name)."""
    return [tokenizer.decode([i]) for i in ids]


# ------------------------------------------------------------------------------ steering


@dataclass
class SteeringRecord:
    """The refusal case study's interventions and whatever results lie beside them."""

    source: str
    interventions: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)
    """File name -> parsed JSON (or a note when too large or unreadable)."""
    tables: dict[str, str] = field(default_factory=dict)
    """File name -> text of the Markdown files beside intervention.json (table.md first)."""

    def marks(self, hookpoint: str) -> dict[int, list[int]]:
        """feature id -> indices of the interventions on it at `hookpoint`."""
        out: dict[int, list[int]] = {}
        for k, item in enumerate(self.interventions):
            if item["hookpoint"] == hookpoint:
                for f in item["features"]:
                    out.setdefault(f, []).append(k)
        return out


def _intervention(raw: Any) -> dict[str, Any] | None:
    """A checked copy of one intervention.json entry, or None when it is unusable."""
    if not isinstance(raw, dict) or not isinstance(raw.get("hookpoint"), str):
        return None
    features = raw.get("features")
    if not isinstance(features, list) or not all(isinstance(f, int) for f in features):
        return None
    keep = ("sae", "hookpoint", "features", "alpha", "mode", "positions")
    return {k: raw[k] for k in keep if k in raw and isinstance(raw[k], (str, int, float, list))}


def load_steering(path: Path) -> SteeringRecord:
    """Read a steering folder (or its intervention.json) defensively: unusable entries and
    unreadable result files are skipped with a warning."""
    path = Path(path)
    file = path / INTERVENTION_FILE if path.is_dir() else path
    folder = file.parent
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("steering: cannot read %s (%s); no features marked", file, e)
        return SteeringRecord(str(file), [])
    items = raw if isinstance(raw, list) else [raw]
    interventions = [x for x in map(_intervention, items) if x is not None]
    if len(interventions) < len(items):
        log.warning(
            "steering: %d of %d entries of %s are unusable",
            len(items) - len(interventions),
            len(items),
            file,
        )
    steering = SteeringRecord(str(file), interventions)
    for name in RESULT_FILES:
        if (folder / name).is_file():
            steering.results[name] = _read_json(folder / name)
    for md in sorted(folder.glob("*.md"), key=lambda f: (f.name != "table.md", f.name))[:5]:
        text = md.read_text(errors="replace")
        steering.tables[md.name] = text[:MAX_RESULT_CHARS]
    return steering


def _read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_RESULT_CHARS:
        return f"({path.name}: {path.stat().st_size} bytes, not embedded)"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"({path.name} unreadable: {e})"


# ---------------------------------------------------------------------------- the data


@dataclass
class EncodedFeatures:
    """One SAE's per-feature data, encoded once for all its batch files."""

    top: list[list[list | None]]
    sample: list[list[list | None]]
    order: list[list[int]]
    """Per feature, the sample slots by ascending activation (-1 = none)."""
    group: list[list[int]]
    """Per feature, the quantile bin of each entry of `order`."""

    @classmethod
    def of(cls, r: HookpointFeatures, width: int) -> EncodedFeatures:
        scale = r.stats.top.value[:, 0]
        order, group = r.stats.quantile_groups()
        return cls(
            encode_examples(r.stats.top, scale, width),
            encode_examples(r.stats.sample, scale, width),
            order.tolist(),
            group.tolist(),
        )


def feature_record(r: HookpointFeatures, f: int, enc: EncodedFeatures) -> dict[str, Any]:
    """Everything a feature's page shows, compactly (module docstring)."""
    st, lens, sc = r.stats, r.lens, r.scores
    hist = st.hist[f]
    nz = hist.nonzero().squeeze(1)
    rec: dict[str, Any] = {
        "i": f,
        "n": int(st.fires[f]),
        "top": [e for e in enc.top[f] if e is not None],
        "q": [
            [g] + cast(list, enc.sample[f][s])  # order names filled slots only (s >= 0)
            for s, g in zip(enc.order[f], enc.group[f])
            if s >= 0
        ],
        "h": [int(nz[0]), *hist[nz[0] : nz[-1] + 1].tolist()] if len(nz) else [],
        "lp": [lens.top_ids[f].tolist(), [_num(v) for v in lens.top_values[f].tolist()]],
        "ln": [lens.bottom_ids[f].tolist(), [_num(v) for v in lens.bottom_values[f].tolist()]],
        "ex": [int(t) for t in sc.sets[f] if t >= 0],
        "f1": _num(float(sc.f1[f])),
        "p": _num(float(sc.precision[f])),
        "r": _num(float(sc.recall[f])),
        "f1e": _num(float(sc.f1_explain[f])),
    }
    if f in r.llm_explanations:
        rec["llm"] = r.llm_explanations[f]
    return rec


def feature_list(r: HookpointFeatures, steering: SteeringRecord | None) -> dict[str, Any]:
    """Columns of the hookpoint's feature list (index = feature id)."""
    st, sc = r.stats, r.scores
    freq = st.fires.double() / max(st.tokens, 1)
    top_tok = st.top.tokens[:, 0, st.cfg.window_before].tolist()
    marks = steering.marks(r.hookpoint) if steering else {}
    return {
        "freq": [_num(x) for x in freq.tolist()],
        "max": [_num(x) for x in st.top.value[:, 0].tolist()],
        "f1": [_num(x) for x in sc.f1.tolist()],
        "ex": [[int(t) for t in row if t >= 0] for row in sc.sets],
        "top": top_tok,
        "steer": {str(k): v for k, v in marks.items()},
    }


def _used_ids(results: list[HookpointFeatures]) -> set[int]:
    ids: set[int] = set()
    for r in results:
        for kept in (r.stats.top, r.stats.sample):
            ids.update(kept.tokens.unique().tolist())
        for t in (r.lens.top_ids, r.lens.bottom_ids, r.scores.sets):
            ids.update(t.unique().tolist())
    ids.discard(-1)
    return ids


def _js(path: Path, call: str, *args: Any) -> int:
    """Write `SAEReport.<call>(args...);` to path; returns its size in bytes."""
    body = ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in args)
    text = f"SAEReport.{call}({body});\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def interpretability_table(summaries: dict[str, dict[str, Any]], threshold: float) -> str:
    """Markdown: per hookpoint the held-out F1 quartiles and the token-level count."""
    lines = [
        f"| hookpoint | features | live | scored | F1 q25 | F1 median | F1 q75 | "
        f"F1 >= {threshold:g} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hp, s in summaries.items():
        q = [f"{s[k]:.3f}" if k in s else "–" for k in ("f1_q25", "f1_median", "f1_q75")]
        lines.append(
            f"| {hp} | {s['d_sae']} | {s['live']} | {s['scored']} | {' | '.join(q)} | "
            f"{s['token_level']} |"
        )
    return "\n".join(lines)


def _suite_metrics(suite: Path) -> dict[str, dict[str, Any]]:
    """Scalar metrics per hookpoint from suite.json (empty for an SAE folder)."""
    if not (suite / "suite.json").is_file():
        return {}
    return {
        e["hookpoint"]: {
            k: v
            for k, v in e.items()
            if k not in ("hookpoint", "path")
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
        for e in read_suite_index(suite)["saes"]
    }


def write_report(
    out_dir: Path,
    results: list[HookpointFeatures],
    tokenizer,
    info: dict[str, Any],
    suite: Path,
    steering: SteeringRecord | None = None,
) -> dict[str, int]:
    """Write the report folder; returns byte counts: total, features (the per-feature batch
    files), lists, vocab."""
    out_dir = Path(out_dir)
    data = out_dir / "data"
    shutil.rmtree(data, ignore_errors=True)
    (out_dir / "assets").mkdir(parents=True, exist_ok=True)
    for name in ("app.js", "app.css"):
        shutil.copyfile(ASSETS / name, out_dir / "assets" / name)
    shutil.copyfile(ASSETS / "index.html", out_dir / "index.html")
    per_file = info["features"]["features_per_file"]
    vocab_size = max(r.lens.top_ids.max().item() for r in results) + 1
    vocab_size = max(vocab_size, len(tokenizer))
    width = 2 if vocab_size < 0xFFFF else 3
    sizes = {"features": 0, "lists": 0}
    metrics = _suite_metrics(suite)
    hookpoints = []
    for r in results:
        enc = EncodedFeatures.of(r, width)
        sizes["lists"] += _js(
            data / r.hookpoint / "list.js", "list", r.hookpoint, feature_list(r, steering)
        )
        for b in range(math.ceil(r.stats.d_sae / per_file)):
            recs = [
                feature_record(r, f, enc)
                for f in range(b * per_file, min(r.stats.d_sae, (b + 1) * per_file))
            ]
            sizes["features"] += _js(data / r.hookpoint / f"{b}.js", "batch", r.hookpoint, b, recs)
        hookpoints.append(
            {
                "name": r.hookpoint,
                "folder": r.folder,
                "summary": r.summary,
                "metrics": metrics.get(r.hookpoint, {}),
            }
        )
    ids = sorted(_used_ids(results))
    specials = sorted(special_token_ids(tokenizer) & set(ids))
    sizes["vocab"] = _js(
        data / "vocab.js",
        "vocab",
        {"ids": ids, "text": token_texts(tokenizer, ids), "special": specials},
    )
    edges = results[0].stats.edges.tolist()
    suite_data = {
        "info": {k: v for k, v in info.items() if k != "data"},
        "hookpoints": hookpoints,
        "hist_edges": [_num(e) for e in edges],
        "token_width": width,
        "window_before": info["features"]["window_before"],
        "per_file": per_file,
        "steering": None
        if steering is None
        else {
            "source": steering.source,
            "interventions": steering.interventions,
            "results": steering.results,
            "tables": steering.tables,
        },
    }
    _js(data / "suite.js", "suite", suite_data)
    files = [out_dir / "index.html", *(out_dir / "assets").iterdir(), *data.rglob("*.js")]
    sizes["total"] = sum(p.stat().st_size for p in files)
    sizes["per_feature"] = sizes["total"] // max(1, sum(r.stats.d_sae for r in results))
    return sizes
