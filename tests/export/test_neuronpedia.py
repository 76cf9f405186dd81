"""The Neuronpedia export: its layout (one folder per source, batches of features in gzipped
JSON lines), every record against the schema documented in DESIGN.md section 9c, and the
figures against the feature browser's own statistics for the same suite and settings."""

import gzip
import json
import math
import re
from pathlib import Path

import pytest

from sae_dist.checkpoint import save_sae, write_suite_index
from sae_dist.config import FeaturesRunConfig
from sae_dist.export import run_export
from sae_dist.features.command import compute_features
from sae_dist.hookpoints import Hookpoint
from tests.evaluate.test_evaluate import topk_sae
from tests.export.test_saelens import compose_export

ROOT = Path(__file__).resolve().parents[2]
HPS = [Hookpoint(1, "resid"), Hookpoint(2, "attn")]
KINDS = ("model", "release", "sourceset", "source", "features", "activations", "explanations")
TYPES = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
}


def documented_schema() -> dict[str, dict[str, str]]:
    """{record kind: {field: type}} from the tables of DESIGN.md section 9c."""
    design = (ROOT / "DESIGN.md").read_text()
    out = {}
    for kind in KINDS:
        table = design.split(f"<!-- schema: {kind} -->", 1)[1].split("\n\n", 1)[0]
        rows = re.findall(r"^\| `(\w+)` \| ([\w\[\]?]+) \|", table, re.M)
        out[kind] = dict(rows)
    return out


def conforms(value, kind: str) -> bool:
    """Whether a JSON value has the documented type (`T?`: T or null; `list[T]`)."""
    if kind.endswith("?"):
        return value is None or conforms(value, kind[:-1])
    if kind.startswith("list["):
        return isinstance(value, list) and all(conforms(v, kind[5:-1]) for v in value)
    return TYPES[kind](value)


def read(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("np")
    suite = base / "suite"
    for i, hp in enumerate(HPS):
        meta = {"hookpoint": hp.name, "model_name": "tiny-qwen3", "hook_name": hp.saelens_hook_name}
        save_sae(topk_sae(i + 5), suite / hp.name, meta)
    write_suite_index(
        suite, [{"hookpoint": h.name, "path": h.name} for h in HPS], {"model": "tiny-qwen3"}
    )
    overrides = [
        f"suite={suite}",
        "format=neuronpedia",
        f"out_dir={base / 'np'}",
        "release=tiny-np",
        "repo_id=someone/tiny-saes",
        "neuronpedia.batch_features=100",
        "features.tokens=300",
        "features.batch_seqs=2",
        "data.context_size=40",
    ]
    cfg = compose_export(overrides)
    run_export(cfg)
    reference = FeaturesRunConfig(
        suite=str(suite), data=cfg.data, features=cfg.features, out_dir=str(base / "ref")
    )
    results, tokenizer, _ = compute_features(reference)
    return base / "np", {r.hookpoint: r for r in results}, tokenizer


def test_layout_and_schema(exported):
    out, _, _ = exported
    schema = documented_schema()
    assert all(schema[k] for k in KINDS) and "frac_nonzero" in schema["features"]
    manifest = json.loads((out / "neuronpedia.json").read_text())
    assert manifest["release"] == "tiny-np" and manifest["model_id"] == "tiny-qwen3"
    sources = {s["hookpoint"]: s for s in manifest["sources"]}
    assert [sources[h.name]["source"] for h in HPS] == ["1-res-tiny-np", "2-att-tiny-np"]
    assert sorted(p.name for p in out.iterdir()) == ["neuronpedia.json", "tiny-qwen3"]
    for hp in HPS:
        folder = out / "tiny-qwen3" / sources[hp.name]["source"]
        for kind in KINDS[:4]:
            (record,) = read(folder / f"{kind}.jsonl")
            assert set(record) == set(schema[kind]), kind
            for field, kind_type in schema[kind].items():
                assert conforms(record[field], kind_type), (kind, field, record[field])
        for kind in KINDS[4:]:
            files = sorted((folder / kind).iterdir())
            assert [f.name for f in files] == [f"batch-{n}.jsonl.gz" for n in range(3)]
            total = 0
            for n, path in enumerate(files):
                records = read(path)
                total += len(records)
                for record in records:
                    assert set(record) == set(schema[kind]), kind
                    for field, kind_type in schema[kind].items():
                        assert conforms(record[field], kind_type), (kind, field, record[field])
                    assert record["modelId"] == "tiny-qwen3"
                    assert record["layer"] == sources[hp.name]["source"]
                    assert 100 * n <= int(record["index"]) < 100 * (n + 1)
            assert total == sources[hp.name][kind]
        assert sources[hp.name]["features"] == 256


def test_records_carry_the_feature_browsers_figures(exported):
    out, reference, tokenizer = exported
    for hp in HPS:
        r = reference[hp.name]
        folder = out / "tiny-qwen3" / f"{hp.layer}-{'res' if hp.site == 'resid' else 'att'}-tiny-np"
        features = [
            rec for n in range(3) for rec in read(folder / "features" / f"batch-{n}.jsonl.gz")
        ]
        acts = [
            rec for n in range(3) for rec in read(folder / "activations" / f"batch-{n}.jsonl.gz")
        ]
        expl = [
            rec for n in range(3) for rec in read(folder / "explanations" / f"batch-{n}.jsonl.gz")
        ]
        assert [int(f["index"]) for f in features] == list(range(256))
        fired = 0
        for f, rec in enumerate(features):
            density = int(r.stats.fires[f]) / r.stats.tokens
            assert rec["frac_nonzero"] == pytest.approx(density, rel=1e-4, abs=1e-12)
            assert sum(rec["freq_hist_data_bar_heights"]) == int(r.stats.fires[f])
            top = r.stats.top
            assert rec["maxActApprox"] == pytest.approx(
                float(top.value[f, 0]) if top.position[f, 0] >= 0 else 0.0, rel=1e-4
            )
            assert rec["pos_str"] == [tokenizer.decode([i]) for i in r.lens.top_ids[f].tolist()]
            assert rec["neg_values"] == pytest.approx(r.lens.bottom_values[f].tolist(), rel=1e-4)
            fired += int(r.stats.fires[f]) > 0
        by_feature: dict[int, list[dict]] = {}
        for rec in acts:
            by_feature.setdefault(int(rec["index"]), []).append(rec)
        assert len(by_feature) == fired > 100  # dead features have no examples
        for f, recs in by_feature.items():
            tops = [x for x in recs if x["binMin"] is None]
            samples = [x for x in recs if x["binMin"] is not None]
            assert len(tops) == int((r.stats.top.position[f] >= 0).sum())
            assert len(samples) == int((r.stats.sample.position[f] >= 0).sum())
            for slot, x in enumerate(tops):
                q = x["qualifyingTokenIndex"]
                assert x["values"][q] == pytest.approx(float(r.stats.top.value[f, slot]), rel=1e-4)
                assert x["dataIndex"] == str(int(r.stats.top.position[f, slot]))
                assert x["maxValue"] == max(x["values"]) == x["values"][x["maxValueTokenIndex"]]
                ids = [t for t in r.stats.top.tokens[f, slot].tolist() if t >= 0]
                assert x["tokens"] == [tokenizer.decode([t]) for t in ids]
            shares = {(x["binMin"], x["binMax"]): x["binContains"] for x in samples}
            # quantile bins of a feature with repeated values can share their bounds (one key)
            assert 0 < sum(shares.values()) <= 1 + 1e-3
            for x in samples:
                centre = x["values"][x["qualifyingTokenIndex"]]
                assert x["binMin"] <= centre <= x["binMax"]
        with_set = [f for f in range(256) if (r.scores.sets[f] >= 0).any()]
        assert [int(e["index"]) for e in expl] == with_set and len(with_set) > 64
        for e in expl:
            f = int(e["index"])
            f1 = float(r.scores.f1[f])
            assert e["scoreV1"] == pytest.approx(f1 if math.isfinite(f1) else 0.0, rel=1e-4)
            words = [tokenizer.decode([t]) for t in r.scores.sets[f].tolist() if t >= 0]
            assert e["description"] == "fires on " + ", ".join(json.dumps(w) for w in words)
    source = read(out / "tiny-qwen3" / "1-res-tiny-np" / "source.jsonl")[0]
    assert source["saelensRelease"] == "tiny-np" and source["hfRepoId"] == "someone/tiny-saes"
    assert source["saelensConfig"]["d_sae"] == 256
