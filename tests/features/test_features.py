"""Feature discovery and the feature report: running statistics against exact references on
constructed activations, context alignment through the tiny Qwen3, bounded memory, the token-set
score on planted and random features, the logit lens, the report files, steering marks, and the
report opened in headless Chromium (skipped without `chromium`)."""

import base64
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from sae_dist.config import ConfigError, ExplainerConfig, FeaturesConfig, sae_config
from sae_dist.features.collect import FeatureStats, event_keys, logit_lens
from sae_dist.features.score import OpenAIExplainer, TokenSetScorer, f1_summary, fit_token_sets
from sae_dist.sae import Latents
from tests.conftest import one_document_per_row

T, VOCAB = 24, 50


def constructed(n_rows: int, d_sae: int, seed: int = 0, p_fire: float = 0.15):
    """Random ids [n_rows, T], scored mask (column 0 never) and dense activations [n_rows, T,
    d_sae] with distinct values, zero where not scored or not firing."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n_rows, T), generator=g)
    mask = torch.rand(n_rows, T, generator=g) > 0.2
    mask[:, 0] = False
    fire = (torch.rand(n_rows, T, d_sae, generator=g) < p_fire) & mask[..., None]
    values = torch.randperm(fire.numel(), generator=g).view(fire.shape).float() / fire.numel()
    acts = torch.where(fire, values * 10 + 1e-3, torch.zeros(()))
    return ids, mask, acts


def feed(stats: FeatureStats, ids, mask, acts, rows_per_batch: list[int], sparse: bool):
    """Stream the constructed data in batches of the given row counts."""
    row = 0
    for n in rows_per_batch:
        i, m, a = ids[row : row + n], mask[row : row + n], acts[row : row + n]
        dense = a[m]
        if sparse:  # TopK-style latents: the k largest per token (zeros padded)
            k = int((dense > 0).sum(1).max().clamp_min(1))
            top = dense.topk(k, dim=1)
            latents = Latents(top.values, top.indices, dense.shape[1])
        else:
            latents = Latents(dense, None, dense.shape[1])
        stats.update(i, m, latents, row)
        row += n


def small_cfg(**kw) -> FeaturesConfig:
    base = {
        "top_n": 4,
        "quantile_bins": 3,
        "per_bin": 2,
        "window_before": 3,
        "window_after": 2,
        "hist_bins_per_decade": 4,
        "hist_range": [1e-3, 1e2],
    }
    return FeaturesConfig(**{**base, **kw})


def window_ref(ids, acts, p: int, f: int, before: int, after: int):
    row, col = divmod(p, T)
    toks, vals = [], []
    for c in range(col - before, col + after + 1):
        inside = 0 <= c < T
        toks.append(int(ids[row, c]) if inside else -1)
        vals.append(float(acts[row, c, f]) if inside else 0.0)
    return toks, vals


@pytest.mark.parametrize("sparse", [False, True])
def test_running_statistics_equal_exact_ones(sparse):
    d_sae, cfg = 6, small_cfg()
    ids, mask, acts = constructed(20, d_sae)
    stats = FeatureStats(d_sae, VOCAB, T, cfg, explain_tokens=10_000)
    feed(stats, ids, mask, acts, [3, 1, 7, 4, 5], sparse)
    flat = acts.view(-1, d_sae)
    r = cfg.quantile_bins * cfg.per_bin
    for f in range(d_sae):
        pos = (flat[:, f] > 0).nonzero().squeeze(1)
        vals = flat[pos, f]
        assert int(stats.fires[f]) == len(pos)
        # top-N: the N largest activations, best first, and their positions
        best = vals.argsort(descending=True)[: cfg.top_n]
        assert stats.top.position[f].tolist() == pos[best].tolist()
        assert stats.top.value[f].tolist() == vals[best].tolist()
        # sample: the R firings of smallest key
        keys = event_keys(pos, torch.full_like(pos, f), cfg.seed)
        chosen = pos[keys.argsort()[:r]]
        assert sorted(stats.sample.position[f].tolist()) == sorted(chosen.tolist())
        # histogram in the fixed log bins (values beyond the range in the end bins)
        edges = stats.edges.log10()
        b = ((vals.double().log10() - edges[0]) / (edges[1] - edges[0])).floor().long()
        ref = torch.bincount(b.clamp(0, len(edges) - 2), minlength=len(edges) - 1)
        assert stats.hist[f].tolist() == ref.tolist()
        # every kept context lines up with the tokens and the activations around it
        for kept in (stats.top, stats.sample):
            for slot in range(kept.n):
                p = int(kept.position[f, slot])
                if p < 0:
                    continue
                toks, a = window_ref(ids, acts, p, f, cfg.window_before, cfg.window_after)
                assert kept.tokens[f, slot].tolist() == toks
                assert kept.acts[f, slot].tolist() == a
                assert kept.acts[f, slot, cfg.window_before] == kept.value[f, slot] > 0
    assert stats.tokens == int(mask.sum())


def test_quantile_bins_cut_the_sorted_sample():
    d_sae, cfg = 3, small_cfg(quantile_bins=3, per_bin=2)
    ids, mask, acts = constructed(12, d_sae, p_fire=0.3)
    stats = FeatureStats(d_sae, VOCAB, T, cfg, explain_tokens=10_000)
    feed(stats, ids, mask, acts, [12], sparse=False)
    order, group = stats.quantile_groups()
    for f in range(d_sae):
        vals = stats.sample.value[f][order[f]].tolist()
        assert vals == sorted(vals) and group[f].tolist() == [0, 0, 1, 1, 2, 2]
    # fewer firings than the sample size: groups of sizes differing by at most one
    stats.sample._clear(torch.arange(6)[None, :].expand(d_sae, 6) >= 4)
    order, group = stats.quantile_groups()
    assert group[0].tolist() == [0, 0, 1, 2, -1, -1] and order[0, 4:].tolist() == [-1, -1]


def test_memory_is_bounded_as_tokens_grow():
    d_sae, cfg = 8, small_cfg()
    ids, mask, acts = constructed(60, d_sae, seed=1)
    stats = FeatureStats(d_sae, VOCAB, T, cfg, explain_tokens=100)
    sizes = []
    for start in range(0, 60, 4):
        feed(
            stats,
            ids[start : start + 4],
            mask[start : start + 4],
            acts[start : start + 4],
            [4],
            sparse=True,
        )
        sizes.append(stats.nbytes())
    # the explanation part (100 tokens, about 5 batches) is the only state that ever grew
    assert len(set(sizes[6:])) == 1 and stats.tokens > 10 * 100
    assert stats.scorer._pairs == [] and stats.scorer.heldout_tokens == stats.tokens - 100


# --------------------------------------------------------------------------- the score


def zipf_tokens(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = 1 / torch.arange(1, vocab + 1).double()
    return torch.multinomial(w, n, replacement=True, generator=g)


def test_planted_token_detector_scores_one_and_random_feature_near_zero():
    n, vocab = 40_000, 200
    tokens = zipf_tokens(n, vocab, 0)
    g = torch.Generator().manual_seed(1)
    planted = (tokens == 7) | (tokens == 31) | (tokens == 120)
    noisy = planted & (torch.rand(n, generator=g) > 0.05)  # misses 5% of its tokens
    random_f = torch.rand(n, generator=g) < 0.05
    fires = torch.stack([planted, noisy, random_f], 1)
    scorer = TokenSetScorer(3, vocab, explain_tokens=n // 2)
    for chunk in range(0, n, 5000):
        ev_tok, ev_f = fires[chunk : chunk + 5000].nonzero(as_tuple=True)
        scorer.update(tokens[chunk : chunk + 5000], ev_tok, ev_f)
    res = scorer.result()
    assert sorted(res.sets[0][res.sets[0] >= 0].tolist()) == [7, 31, 120]
    assert res.f1[0] == 1.0 and res.precision[0] == 1.0 and res.recall[0] == 1.0
    assert res.f1[1] > 0.95
    assert res.f1[2] < 0.15
    assert res.explain_tokens == res.heldout_tokens == n // 2
    summary = f1_summary(res.f1, 0.7)
    assert summary["token_level"] == 2 and summary["scored"] == 3


def test_greedy_explanation_stops_when_f1_stops_rising():
    # feature 0 fires on all of token 1 and on 1 of 10 occurrences of token 2: adding token 2
    # would lower F1, so the explanation is {1}; feature 1 never fires: no explanation
    tok = torch.tensor([1] * 10 + [2] * 10)
    pairs = torch.tensor([0 * 5 + 1] * 10 + [0 * 5 + 2])
    sets, f1 = fit_token_sets(pairs, torch.bincount(tok, minlength=5), 2, 5, 8)
    assert sets[0].tolist() == [1, -1, -1, -1, -1] and f1[0] == pytest.approx(20 / 21)
    assert sets[1].tolist() == [-1] * 5 and math.isnan(f1[1])


def test_llm_explainer_posts_to_an_openai_compatible_endpoint():
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen["path"] = self.path
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = json.dumps({"choices": [{"message": {"content": " the word cat "}}]})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    cfg = ExplainerConfig(endpoint=f"http://127.0.0.1:{server.server_port}/v1", model="m")
    text = OpenAIExplainer(cfg).explain([[("a", 0.0), (" cat", 2.5)]])
    server.server_close()
    assert text == "the word cat" and seen["path"] == "/v1/chat/completions"
    assert seen["body"]["model"] == "m"
    assert "<< cat>>[2.5]" in seen["body"]["messages"][0]["content"]


# ----------------------------------------------------------------------- logit lens


def test_logit_lens_applies_the_norm_gain_and_unembedding():
    g = torch.Generator().manual_seed(0)
    W_dec, gain, W_U = (
        torch.randn(7, 16, generator=g),
        torch.rand(16, generator=g) + 0.5,
        torch.randn(30, 16, generator=g),
    )
    lens = logit_lens(W_dec, gain, W_U, k=3, chunk=2)
    ref = (W_dec * gain) @ W_U.T
    assert torch.equal(lens.top_ids, ref.topk(3, dim=1).indices)
    assert torch.equal(lens.bottom_ids, ref.topk(3, dim=1, largest=False).indices)
    torch.testing.assert_close(lens.top_values, ref.topk(3, dim=1).values)


# ------------------------------------------------------------- through the tiny Qwen3

HPS = ["layers.1.resid", "layers.2.mlp"]


def tiny_topk(seed: int):
    from sae_dist.sae import build_sae

    torch.manual_seed(seed)
    return build_sae(sae_config("topk", d_sae=96, k=6), 64).eval()


def test_contexts_line_up_with_the_model_tokens(tiny_model):
    from sae_dist.data import TokenBatch
    from sae_dist.features.collect import collect
    from sae_dist.hookpoints import Hookpoint, capture

    hp = Hookpoint(1, "resid")
    sae = tiny_topk(0)
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        mask = torch.rand(2, 16, generator=g) > 0.25
        mask[:, 0] = False
        ids = torch.randint(0, 3000, (2, 16), generator=g)
        batches.append(TokenBatch(ids, mask, one_document_per_row(ids)))
    cfg = FeaturesConfig(top_n=3, quantile_bins=2, per_bin=2, window_before=4, window_after=2)
    stats = {hp: FeatureStats(96, 49152, 16, cfg, explain_tokens=20)}
    collect(tiny_model, {hp: sae}, stats, iter(batches), 60, torch.device("cpu"), None)
    ids = torch.cat([b.input_ids for b in batches])
    mask = torch.cat([b.train_mask for b in batches])
    with torch.no_grad():
        x = capture(tiny_model, [hp], ids)[hp]
        dense = sae.encode(x.reshape(-1, 64)).dense().view(6, 16, 96) * mask[..., None]
    st = stats[hp]
    checked = 0
    for kept in (st.top, st.sample):
        for f, slot in (kept.position >= 0).nonzero().tolist():
            row, col = divmod(int(kept.position[f, slot]), 16)
            for k, c in enumerate(range(col - 4, col + 3)):
                inside = 0 <= c < 16
                assert kept.tokens[f, slot, k] == (ids[row, c] if inside else -1)
                want = float(dense[row, c, f]) if inside else 0.0
                assert float(kept.acts[f, slot, k]) == pytest.approx(want, abs=1e-5)
            checked += 1
    assert checked > 100
    assert st.fires.tolist() == (dense > 0).sum((0, 1)).tolist()


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    from sae_dist.checkpoint import save_sae, write_suite_index

    suite = tmp_path_factory.mktemp("suite")
    for i, name in enumerate(HPS):
        save_sae(tiny_topk(i), suite / name, {"hookpoint": name, "model_name": "tiny-qwen3"})
    write_suite_index(
        suite,
        [{"hookpoint": n, "path": n, "fvu": 0.5 + i, "l0": 6.0} for i, n in enumerate(HPS)],
        {"model": "tiny-qwen3"},
    )
    return suite


def compose_features(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.cli import CONF_DIR
    from sae_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name="features", overrides=overrides))


def read_js(path: Path) -> tuple[str, list]:
    """(callback name, arguments) of a report data file."""
    text = path.read_text(encoding="utf-8")
    name, _, rest = text.partition("(")
    assert name.startswith("SAEReport.") and rest.rstrip().endswith(");")
    return name[len("SAEReport.") :], json.loads("[" + rest.rstrip()[:-2] + "]")


@pytest.fixture(scope="module")
def tiny_report(tiny_suite, tmp_path_factory):
    steer = tmp_path_factory.mktemp("steer")
    (steer / "intervention.json").write_text(
        json.dumps(
            [
                {
                    "sae": str(tiny_suite / "layers.2.mlp"),
                    "hookpoint": "layers.2.mlp",
                    "features": [3, 17],
                    "alpha": 8.0,
                    "mode": "add",
                    "positions": "all",
                },
                {"hookpoint": "layers.9.attn", "features": "bad"},
            ]
        )
    )
    (steer / "results.json").write_text(json.dumps({"refusal_rate": {"steered": 0.8, "base": 0.1}}))
    (steer / "examples.md").write_text("# Example generations\n")
    (steer / "table.md").write_text("| row | refusal |\n|---|---|\n| steered | 0.8 |\n")
    out = tmp_path_factory.mktemp("report")
    cfg = compose_features(
        [
            f"suite={tiny_suite}",
            f"out_dir={out}",
            "features.tokens=300",
            "features.batch_seqs=2",
            "data.context_size=40",
            "features.features_per_file=40",
            f"features.steering={steer}",
        ]
    )
    return out, run_features_checked(cfg)


def run_features_checked(cfg):
    from sae_dist.features.command import run_features

    assert cfg.model is None
    return run_features(cfg)


def test_cli_writes_a_lazily_loaded_report(tiny_report):
    out, summaries = tiny_report
    assert list(summaries) == HPS
    for s in summaries.values():
        assert s["d_sae"] == 96 and s["tokens"] >= 300 and s["live"] > 0
        assert s["explain_tokens"] == 150 and s["heldout_tokens"] == s["tokens"] - 150
    for name in (
        "index.html",
        "assets/app.js",
        "assets/app.css",
        "data/suite.js",
        "data/vocab.js",
        "features.json",
    ):
        assert (out / name).is_file(), name
    kind, (suite,) = read_js(out / "data/suite.js")
    assert kind == "suite" and [h["name"] for h in suite["hookpoints"]] == HPS
    assert suite["hookpoints"][1]["metrics"] == {"fvu": 1.5, "l0": 6.0}
    _, (vocab,) = read_js(out / "data/vocab.js")
    known = set(vocab["ids"])
    for hp in HPS:
        files = sorted((out / "data" / hp).glob("[0-9]*.js"))
        assert [f.name for f in files] == ["0.js", "1.js", "2.js"]  # 96 features, 40 per file
        kind, (name, b, recs) = read_js(files[1])
        assert kind == "batch" and name == hp and b == 1
        assert [r["i"] for r in recs] == list(range(40, 80))
        _, (_, lst) = read_js(out / "data" / hp / "list.js")
        assert len(lst["freq"]) == 96
        for r in recs:
            for value, toks, acts in r["top"]:
                raw = base64.b64decode(toks)
                ids = [int.from_bytes(raw[i : i + 2], "little") for i in range(0, 42, 2)]
                assert {i for i in ids if i != 0xFFFF} <= known
                pairs = base64.b64decode(acts)  # (window offset, level) where active
                assert pairs[0::2].count(16) == 1 and all(q >= 1 for q in pairs[1::2]) and value > 0
    doc = json.loads((out / "features.json").read_text())
    assert doc["report_bytes"]["total"] > 0 and doc["peak_rss_bytes"] > 0


def test_steering_marks_the_intervened_features(tiny_report):
    out, _ = tiny_report
    _, (suite,) = read_js(out / "data/suite.js")
    st = suite["steering"]
    assert len(st["interventions"]) == 1 and st["interventions"][0]["alpha"] == 8.0
    assert st["results"]["results.json"]["refusal_rate"]["steered"] == 0.8
    assert list(st["tables"]) == ["table.md", "examples.md"]  # the result table comes first
    assert "| steered | 0.8 |" in st["tables"]["table.md"]
    _, (_, lst) = read_js(out / "data" / "layers.2.mlp" / "list.js")
    assert lst["steer"] == {"3": [0], "17": [0]}
    _, (_, other) = read_js(out / "data" / "layers.1.resid" / "list.js")
    assert other["steer"] == {}


def test_bad_values_fail_at_start_up(tiny_suite, tmp_path):
    from sae_dist.features.command import run_features

    with pytest.raises(ConfigError, match="features.top_n=0"):
        run_features(compose_features([f"suite={tiny_suite}", "features.top_n=0"]))
    with pytest.raises(ConfigError, match="features.explain_fraction=1.5"):
        run_features(compose_features([f"suite={tiny_suite}", "features.explain_fraction=1.5"]))
    with pytest.raises(ConfigError, match="suite="):
        run_features(compose_features([f"suite={tmp_path / 'nope'}"]))


# ------------------------------------------------------------------- headless Chromium


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="chromium is not on PATH (Debian: apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(tiny_report, tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "feature_report_browser.py"
    spec = importlib.util.spec_from_file_location("feature_report_browser", script)
    browser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(browser)
    out, _ = tiny_report
    res = browser.check_report(out, tmp_path / "shot.png")
    assert res["console_errors"] == [] and res["page_errors"] == ""
    hp, feature = res["hookpoint"], int(res["feature"])
    assert res["hash"] == f"#/f/{hp}/{feature}"
    # the clicked feature is the densest one of the first hookpoint's list
    _, (_, lst) = read_js(out / "data" / hp / "list.js")
    assert lst["freq"][feature] == max(lst["freq"])
    _, (_, _, recs) = read_js(out / "data" / hp / f"{feature // 40}.js")
    rec = recs[feature % 40]
    assert res["contexts"] == len(rec["top"]) > 0
    assert res["quantile_contexts"] == len(rec["q"]) > 0
    assert res["logit_rows"] == 10 and res["histogram_bars"] == len(rec["h"]) - 1
    # the outlined token of the first context is the token the feature fired on
    _, (vocab,) = read_js(out / "data/vocab.js")
    centre = int.from_bytes(base64.b64decode(rec["top"][0][1])[32:34], "little")
    text = vocab["text"][vocab["ids"].index(centre)]
    assert res["centre"] == text.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
