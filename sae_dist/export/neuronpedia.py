"""A suite's feature pages in Neuronpedia's upload layout (DESIGN.md section 9c, which lists
every record's fields): the layout Neuronpedia's own exports use and its importer reads, one
folder per source (SAE), records as JSON lines, batches gzipped.

    <out_dir>/neuronpedia.json                       what was exported (release, sources, counts)
    <out_dir>/<model id>/<source id>/model.jsonl     the model (one record)
                                    release.jsonl    the release (one record)
                                    sourceset.jsonl  the source set: res-, mlp- or att-<suffix>
                                    source.jsonl     the source: <layer>-<source set>, its SAE
                                    features/batch-N.jsonl.gz      one record per feature
                                    activations/batch-N.jsonl.gz   top and quantile examples
                                    explanations/batch-N.jsonl.gz  token-set (and LLM) ones

Batch N holds features N x batch_features .. (N + 1) x batch_features - 1 in all three folders.
Every figure comes from the feature browser's statistics (`sae_dist.features`): top activating
contexts, activation-quantile samples, firing density, activation histogram, logit lens, the
LLM-free token-set explanation with its held-out F1 (and LLM explanations when configured).
Memory: the browser's statistics (fixed by d_sae and the config) plus one batch of records.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_dist.config import ExportConfig, FeaturesRunConfig, ModelConfig
from sae_dist.export.saelens import site_set
from sae_dist.features.collect import HookpointFeatures, KeptExamples, histogram_edges
from sae_dist.features.command import compute_features
from sae_dist.hookpoints import Hookpoint

MANIFEST = "neuronpedia.json"
TOKEN_SET_TYPE = "sae_dist-token-set"
"""Explanation typeName of the LLM-free token-set explanation."""
LLM_TYPE = "sae_dist-llm"
"""Explanation typeName of the optional LLM explanations."""


def slug(text: str) -> str:
    """Lowercase letters, digits and '-' (Neuronpedia ids)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _num(x: float) -> float:
    """5 significant digits (0 for NaN / inf, which JSON lacks)."""
    return float(f"{x:.5g}") if x and math.isfinite(x) else 0.0


def vocabulary_texts(tokenizer) -> list[str]:
    """Display text of every token id (each decoded alone)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


@dataclass
class BatchExamples:
    """One batch of features' kept examples (`KeptExamples` rows) as Python lists."""

    tokens: list[list[list[int]]]
    """[features][slot][window] token ids, -1 outside the row."""
    acts: list[list[list[float]]]
    position: list[list[int]]
    """[features][slot] global position, -1 for an empty slot."""
    value: list[list[float]]

    @classmethod
    def of(cls, kept: KeptExamples, feats: slice) -> BatchExamples:
        return cls(
            kept.tokens[feats].tolist(),
            kept.acts[feats].tolist(),
            kept.position[feats].tolist(),
            kept.value[feats].tolist(),
        )


class Source:
    """Names and fixed fields of one SAE's Neuronpedia source."""

    def __init__(self, cfg: ExportConfig, model_id: str, hp: Hookpoint, sae_cfg: dict[str, Any]):
        self.cfg, self.model_id, self.hp, self.sae_cfg = cfg, model_id, hp, sae_cfg
        self.set_name = site_set(hp, cfg.neuronpedia.source_set or slug(cfg.release))
        self.id = f"{hp.layer}-{self.set_name}"
        self.creator = cfg.neuronpedia.creator

    def head(self, index: int) -> dict[str, Any]:
        """The fields every feature-level record starts with."""
        return {"modelId": self.model_id, "layer": self.id, "index": str(index)}


def model_record(source: Source, model: ModelConfig) -> dict[str, Any]:
    name = model.path or model.name
    return {
        "id": source.model_id,
        "displayName": name,
        "displayNameShort": model.name,
        "creatorId": source.creator,
        "layers": model.n_layers,
        "neuronsPerLayer": model.d_model,
        "dimension": model.d_model,
        "owner": name.split("/")[0] if "/" in name else source.creator,
        "visibility": "PUBLIC",
        "website": f"https://huggingface.co/{model.path}" if model.path else None,
    }


def release_record(source: Source, description: str) -> dict[str, Any]:
    cfg = source.cfg
    return {
        "name": cfg.release,
        "description": description,
        "descriptionShort": description.split(".")[0],
        "urls": [f"https://huggingface.co/{cfg.repo_id}"] if cfg.repo_id else [],
        "creatorName": source.creator,
        "creatorId": source.creator,
        "visibility": "PUBLIC",
    }


def sourceset_record(source: Source, description: str) -> dict[str, Any]:
    site = {"resid": "Residual stream", "mlp": "MLP output", "attn": "Attention output"}
    return {
        "modelId": source.model_id,
        "name": source.set_name,
        "description": f"{site[source.hp.site]} - {description}",
        "type": "sae",
        "creatorName": source.creator,
        "creatorId": source.creator,
        "urls": release_record(source, "")["urls"],
        "releaseName": source.cfg.release,
        "visibility": "PUBLIC",
        "hasDashboards": True,
    }


def source_record(source: Source, info: dict[str, Any]) -> dict[str, Any]:
    cfg, features = source.cfg, info["features"]
    return {
        "id": source.id,
        "modelId": source.model_id,
        "setName": source.set_name,
        "creatorId": source.creator,
        "hasDashboards": True,
        "visibility": "PUBLIC",
        "saelensRelease": cfg.release,
        "saelensSaeId": source.hp.name,
        "hfRepoId": cfg.repo_id,
        "hfFolderId": source.hp.name,
        "saelensConfig": source.sae_cfg,
        "dataset": f"{info['data']['source']} (held-out split)",
        "num_prompts": info["lm_tokens"] // info["data"]["context_size"],
        "num_tokens_in_prompt": info["data"]["context_size"],
        "notes": f"sae_dist feature statistics over {features['tokens']} held-out tokens",
    }


def feature_record(
    source: Source, r: HookpointFeatures, f: int, vocab: list[str], centres: list[float]
) -> dict[str, Any]:
    """One feature: density, maximum activation, activation histogram (its non-empty log-spaced
    bins, by centre), logit lens."""
    stats, lens = r.stats, r.lens
    hist = stats.hist[f].tolist()
    filled = [i for i, c in enumerate(hist) if c > 0]
    fired = int(stats.top.position[f, 0]) >= 0
    return {
        **source.head(f),
        "sourceSetName": source.set_name,
        "creatorId": source.creator,
        "hookName": source.sae_cfg.get("metadata", {}).get("hook_name", source.hp.name),
        "maxActApprox": _num(float(stats.top.value[f, 0])) if fired else 0.0,
        "frac_nonzero": _num(int(stats.fires[f]) / max(stats.tokens, 1)),
        "freq_hist_data_bar_heights": [float(hist[i]) for i in filled],
        "freq_hist_data_bar_values": [_num(centres[i]) for i in filled],
        "pos_str": [vocab[i] for i in lens.top_ids[f].tolist()],
        "pos_values": [_num(v) for v in lens.top_values[f].tolist()],
        "neg_str": [vocab[i] for i in lens.bottom_ids[f].tolist()],
        "neg_values": [_num(v) for v in lens.bottom_values[f].tolist()],
        "hasVector": False,
        "vector": [],
    }


@dataclass
class ExampleContext:
    """What every Activation record of one source shares."""

    source: Source
    vocab: list[str]
    before: int
    """Window tokens before the example's own token."""
    data_source: str


def _example(
    ctx: ExampleContext, f: int, key: str, tokens: list[int], acts: list[float], position: int
) -> dict[str, Any]:
    """One context window as an Activation record: tokens outside the row dropped; max over the
    window; the token the example was chosen for as qualifyingTokenIndex."""
    keep = [i for i, t in enumerate(tokens) if t >= 0]
    values = [_num(acts[i]) for i in keep]
    top = max(range(len(values)), key=values.__getitem__)
    return {
        "id": f"{ctx.source.model_id}@{ctx.source.id}@{f}@{key}",
        **ctx.source.head(f),
        "creatorId": ctx.source.creator,
        "dataSource": ctx.data_source,
        "dataIndex": str(position),
        "tokens": [ctx.vocab[tokens[i]] for i in keep],
        "values": values,
        "maxValue": values[top],
        "maxValueTokenIndex": top,
        "minValue": min(values),
        "qualifyingTokenIndex": keep.index(ctx.before),
        "binMin": None,
        "binMax": None,
        "binContains": None,
    }


def activation_records(
    ctx: ExampleContext,
    f: int,
    i: int,
    top: BatchExamples,
    sample: BatchExamples,
    groups: tuple[list[int], list[int]],
) -> Iterator[dict[str, Any]]:
    """Feature f's top examples (by activation), then its activation-quantile samples with
    their bin: binMin / binMax the bin's lowest and highest sampled activation, binContains the
    bin's share of the uniform sample (an estimate of its share of all firings). f is row i of
    the batch's `top` and `sample`; `groups`: f's row of `FeatureStats.quantile_groups()`."""
    for slot, position in enumerate(top.position[i]):
        if position < 0:
            break
        yield _example(ctx, f, f"top{slot}", top.tokens[i][slot], top.acts[i][slot], position)
    filled = [(o, g) for o, g in zip(*groups) if g >= 0]
    for b in sorted({g for _, g in filled}):
        slots = [o for o, g in filled if g == b]
        values = [sample.value[i][o] for o in slots]
        for j, o in enumerate(slots):
            rec = _example(
                ctx, f, f"q{b}.{j}", sample.tokens[i][o], sample.acts[i][o], sample.position[i][o]
            )
            rec.update(
                binMin=_num(min(values)),
                binMax=_num(max(values)),
                binContains=_num(len(slots) / len(filled)),
            )
            yield rec


def explanation_records(
    source: Source, r: HookpointFeatures, f: int, vocab: list[str], llm_model: str
) -> Iterator[dict[str, Any]]:
    """The token-set explanation (description: the tokens; scoreV1: its held-out F1; notes:
    precision and recall), and the LLM explanation where one was made."""
    ids = [i for i in r.scores.sets[f].tolist() if i >= 0]
    if ids:
        s = r.scores
        f1, p, rc = (float(t[f]) for t in (s.f1, s.precision, s.recall))
        yield {
            "id": f"{source.model_id}@{source.id}@{f}@token-set",
            **source.head(f),
            "description": "fires on " + ", ".join(json.dumps(vocab[t]) for t in ids),
            "authorId": source.creator,
            "typeName": TOKEN_SET_TYPE,
            "explanationModelName": None,
            "scoreV1": _num(f1),
            "notes": f"held-out F1 {f1:.4g}, precision {p:.4g}, recall {rc:.4g} over "
            f"{s.heldout_tokens} tokens",
        }
    if f in r.llm_explanations:
        yield {
            "id": f"{source.model_id}@{source.id}@{f}@llm",
            **source.head(f),
            "description": r.llm_explanations[f],
            "authorId": source.creator,
            "typeName": LLM_TYPE,
            "explanationModelName": llm_model,
            "scoreV1": 0.0,
            "notes": "unscored",
        }


def write_jsonl(path: Path, records: Iterable[dict[str, Any]], gz: bool = False) -> int:
    """Write records as JSON lines (gzipped when `gz`); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with gzip.open(path, "wt", compresslevel=5) if gz else open(path, "w") as out:
        for rec in records:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_source(
    cfg: ExportConfig,
    r: HookpointFeatures,
    source: Source,
    model: ModelConfig,
    info: dict[str, Any],
    vocab: list[str],
    folder: Path,
) -> dict[str, int]:
    """Every file of one source under `folder`; returns the record counts."""
    description = cfg.neuronpedia.description or (
        f"sae_dist SAEs on {model.path or model.name}, release {cfg.release}"
    )
    write_jsonl(folder / "model.jsonl", [model_record(source, model)])
    write_jsonl(folder / "release.jsonl", [release_record(source, description)])
    write_jsonl(folder / "sourceset.jsonl", [sourceset_record(source, description)])
    write_jsonl(folder / "source.jsonl", [source_record(source, info)])
    edges = histogram_edges(r.stats.cfg).tolist()
    centres = [math.sqrt(a * b) for a, b in zip(edges[:-1], edges[1:])]
    ctx = ExampleContext(
        source, vocab, r.stats.cfg.window_before, f"{info['data']['source']} held-out"
    )
    llm_model = info["features"]["explainer"]["model"]
    order, group = r.stats.quantile_groups()
    counts = {"features": 0, "activations": 0, "explanations": 0}
    step = cfg.neuronpedia.batch_features
    for n, start in enumerate(range(0, r.stats.d_sae, step)):
        rows = slice(start, min(start + step, r.stats.d_sae))
        feats = range(rows.start, rows.stop)
        top, sample = BatchExamples.of(r.stats.top, rows), BatchExamples.of(r.stats.sample, rows)
        groups = list(zip(order[rows].tolist(), group[rows].tolist()))
        name = f"batch-{n}.jsonl.gz"
        counts["features"] += write_jsonl(
            folder / "features" / name,
            (feature_record(source, r, f, vocab, centres) for f in feats),
            gz=True,
        )
        counts["activations"] += write_jsonl(
            folder / "activations" / name,
            (
                a
                for i, f in enumerate(feats)
                for a in activation_records(ctx, f, i, top, sample, groups[i])
            ),
            gz=True,
        )
        counts["explanations"] += write_jsonl(
            folder / "explanations" / name,
            (e for f in feats for e in explanation_records(source, r, f, vocab, llm_model)),
            gz=True,
        )
    return counts


def export_neuronpedia(cfg: ExportConfig, tmp: Path) -> dict[str, Any]:
    """Compute the feature statistics of every SAE of the suite and write the upload folder
    into `tmp` (empty); returns the manifest (also written as neuronpedia.json)."""
    fcfg = FeaturesRunConfig(
        suite=cfg.suite, model=cfg.model, data=cfg.data, features=cfg.features, out_dir=str(tmp)
    )
    results, tokenizer, info = compute_features(fcfg)
    model = fcfg.model
    assert model is not None  # compute_features sets the suite's model
    model_id = cfg.neuronpedia.model_id or slug(model.name)
    vocab = vocabulary_texts(tokenizer)
    sources = []
    for r in results:
        hp = Hookpoint.parse(r.hookpoint)
        sae_cfg = json.loads((Path(r.folder) / "cfg.json").read_text())
        source = Source(cfg, model_id, hp, sae_cfg)
        counts = write_source(cfg, r, source, model, info, vocab, tmp / model_id / source.id)
        sources.append(
            {"hookpoint": hp.name, "source": source.id, "set": source.set_name, **counts}
        )
    manifest = {
        "release": cfg.release,
        "model_id": model_id,
        "repo_id": cfg.repo_id,
        "batch_features": cfg.neuronpedia.batch_features,
        "sources": sources,
        "info": info,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
