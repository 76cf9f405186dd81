"""Suite evaluation on the tiny Qwen3: exact limiting cases (perfect reconstruction, zeros, the
mean predictor), every metric against a plain independent computation (full HF forward passes
with a splice, dense float64 SAE maths), excluded tokens, and the CLI outputs."""

import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from sae_dist.checkpoint import save_sae, write_suite_index
from sae_dist.config import ConfigError, sae_config
from sae_dist.data import TokenBatch, TokenStream, special_token_ids
from sae_dist.evaluate import model_level as metrics
from sae_dist.evaluate.command import run_evaluation
from sae_dist.evaluate.evaluator import evaluate_saes
from sae_dist.evaluate.model_level import (
    clean_pass,
    cluster_se,
    masked_edit,
    paired_delta,
    replay_from,
)
from sae_dist.evaluate.outputs import EVAL_METRICS
from sae_dist.hookpoints import Hookpoint, capture, splice
from sae_dist.sae import build_sae
from tests.conftest import SINK_POSITION, random_token_batches, scaled_tiny_model, sink_tiny_model

CPU = torch.device("cpu")
HPS = [Hookpoint(0, "attn"), Hookpoint(1, "resid"), Hookpoint(2, "mlp"), Hookpoint(3, "resid")]


@pytest.fixture(scope="module")
def model(tiny_cfg):
    """The tiny Qwen3 scaled so that ablations move the loss visibly."""
    return scaled_tiny_model(tiny_cfg, 4.0)


@pytest.fixture(scope="module")
def batches():
    """Two batches of random tokens with a random train mask (BOS column always masked)."""
    return random_token_batches(2, 3, 20, drop=0.3, seed=0)


def topk_sae(seed: int, d_in: int = 64):
    torch.manual_seed(seed)
    return build_sae(sae_config(architecture="topk", expansion=4, k=8), d_in).eval()


def identity_topk_sae(d_in: int = 64):
    """A real TopK SAE that reconstructs exactly: latents relu(x) and relu(-x), k = d_in."""
    sae = build_sae(sae_config(architecture="topk", d_sae=2 * d_in, k=d_in), d_in).eval()
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ----------------------------------------------------------------------- limiting cases


def test_perfect_reconstruction_recovers_everything(model, batches):
    saes = {
        Hookpoint(1, "resid"): identity_topk_sae(),
        Hookpoint(1, "mlp"): lambda x: x,
        Hookpoint(2, "attn"): lambda x: x.clone(),
    }
    res = evaluate_saes(model, saes, batches, CPU, outlier_factor=None)
    for name, r in res.items():
        assert r["fvu"] == pytest.approx(0, abs=1e-12) and r["cosine"] == pytest.approx(1)
        assert r["mse"] == pytest.approx(0, abs=1e-12)
        assert r["delta_loss"] == pytest.approx(0, abs=1e-6), name
        assert r["kl"] == pytest.approx(0, abs=1e-7), name
        assert r["loss_recovered"] == pytest.approx(1, abs=1e-5), name
        assert abs(r["ce_zero"] - r["ce_clean"]) > 0.01  # the denominator is not degenerate
    assert res["layers.1.mlp"]["l0"] is None  # a plain function has no latents


def test_zero_splice_recovers_nothing(model, batches):
    saes = {hp: (lambda x: torch.zeros_like(x)) for hp in HPS}
    for r in evaluate_saes(model, saes, batches, CPU, outlier_factor=None).values():
        assert r["ce_spliced"] == pytest.approx(r["ce_zero"], abs=1e-6)
        assert r["loss_recovered"] == pytest.approx(0, abs=1e-4)
        assert r["cosine"] == 0 and r["fvu"] > 1


def test_constant_mean_predictor_has_fvu_one(model, batches):
    hp = Hookpoint(2, "resid")
    xs = torch.cat([capture(model, [hp], b.input_ids)[hp][b.train_mask] for b in batches])
    mean = xs.double().mean(0).float()
    res = evaluate_saes(
        model,
        {hp: lambda x: mean.expand_as(x)},
        batches,
        CPU,
        outlier_factor=None,
        model_level=False,
    )[hp.name]
    assert res["fvu"] == pytest.approx(1, abs=1e-6)
    assert res["explained_variance"] == pytest.approx(0, abs=1e-6)
    assert res["tokens"] == len(xs)


# ------------------------------------------------------------- independent computation


def reference(model, hp, sae, batches, keep=None):
    """Every metric of DESIGN.md section 8, the plain way: captures with full forward passes,
    a dense float64 TopK SAE, full HF forwards with the splice for the logits. `keep`: the
    positions [B, T] per batch that are reconstructed and spliced (default: the train mask);
    CE positions always come from the train mask."""
    keep = keep or [b.train_mask for b in batches]
    xs = torch.cat(
        [capture(model, [hp], b.input_ids, stop_early=False)[hp][k] for b, k in zip(batches, keep)]
    ).double()
    W_enc, b_enc, W_dec, b_dec = (
        p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    pre = (xs - b_dec) @ W_enc + b_enc
    top = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = z @ W_dec + b_dec
    freq = (z > 0).double().mean(0)
    out = {
        "fvu": float(((xs - x_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()),
        "mse": float(((xs - x_hat) ** 2).sum(1).mean() / xs.shape[1]),
        "cosine": float(F.cosine_similarity(xs, x_hat, dim=1).mean()),
        "l0": float((z > 0).sum(1).double().mean()),
        "dead_frac": float((freq == 0).double().mean()),
        "dense_frac": float((freq > 0.1).double().mean()),
        "dense_l0": float(((z > 0) & (freq > 0.1)).sum(1).double().mean()),
        "tokens": len(xs),
    }
    out["explained_variance"] = 1 - out["fvu"]
    mean = xs.mean(0).float()
    ce = {k: [] for k in ("clean", "spliced", "zero", "mean")}
    kls, seq_delta, seq_positions, start = [], [], [], 0
    for b, k in zip(batches, keep):
        n = int(k.sum())
        rows = x_hat[start : start + n].float()
        start += n
        logits = {"clean": model(b.input_ids).logits}
        for kind, values in (("spliced", rows), ("zero", torch.zeros(64)), ("mean", mean)):

            def fn(act, values=values, k=k, n=n):
                out = act.clone()
                out[k] = values if values.dim() == 2 else values.expand(n, -1)
                return out

            with splice(model, {hp: fn}):
                logits[kind] = model(b.input_ids).logits
        sel = b.train_mask[:, :-1]
        targets = b.input_ids[:, 1:][sel]
        for kind, lg in logits.items():
            ce[kind].append(F.cross_entropy(lg[:, :-1][sel].double(), targets, reduction="none"))
        lp_clean = logits["clean"][:, :-1][sel].double().log_softmax(-1)
        lp_spliced = logits["spliced"][:, :-1][sel].double().log_softmax(-1)
        kls.append((lp_clean.exp() * (lp_clean - lp_spliced)).sum(-1))
        d, seq = ce["spliced"][-1] - ce["clean"][-1], sel.nonzero()[:, 0]
        for row in seq.unique():  # per sequence: sum of CE changes, CE positions
            seq_delta.append(float(d[seq == row].sum()))
            seq_positions.append(int((seq == row).sum()))
    m = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
    s, n_g = torch.tensor(seq_delta, dtype=torch.float64), torch.tensor(seq_positions)
    g, delta = len(s), m["spliced"] - m["clean"]
    se = math.sqrt(g / (g - 1) * float((s - delta * n_g).pow(2).sum())) / float(n_g.sum())
    out.update(
        ce_clean=m["clean"],
        ce_spliced=m["spliced"],
        ce_zero=m["zero"],
        ce_mean=m["mean"],
        delta_loss=delta,
        delta_loss_se=se,
        loss_recovered=(m["zero"] - m["spliced"]) / (m["zero"] - m["clean"]),
        kl=float(torch.cat(kls).mean()),
        ce_tokens=len(torch.cat(ce["clean"])),
    )
    return out


@pytest.mark.parametrize("max_variants,slice_rows", [(1, None), (8, 5)])
def test_every_metric_matches_an_independent_computation(
    model, batches, max_variants, slice_rows, monkeypatch
):
    """slice_rows: CE/KL work after the LM head on slices of 5 rows inside chunks of 16 (CPU
    cache slicing; 16 is not a multiple of 5)."""
    if slice_rows:
        monkeypatch.setattr(metrics, "CPU_SLICE_ELEMS", slice_rows * model.config.vocab_size)
    saes = {hp: topk_sae(i) for i, hp in enumerate(HPS)}
    res = evaluate_saes(
        model,
        saes,
        batches,
        CPU,
        outlier_factor=None,
        ce_mean=True,
        max_variants=max_variants,
        logit_chunk=16,
    )
    for hp, sae in saes.items():
        ref = reference(model, hp, sae, batches)
        got = res[hp.name]
        assert got["tokens"] == ref["tokens"] and got["ce_tokens"] == ref["ce_tokens"]
        assert 0 < ref["dense_l0"] < ref["l0"], (hp, ref["dense_l0"])  # not 0 == 0 below
        for key in ("l0", "dead_frac", "dense_frac", "dense_l0"):
            assert got[key] == pytest.approx(ref[key], abs=1e-12), (hp, key)
        for key in ("fvu", "explained_variance", "mse", "cosine"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), (hp, key)
        for key in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean", "delta_loss"):
            assert got[key] == pytest.approx(ref[key], abs=2e-5), (hp, key)
        assert got["delta_loss_se"] == pytest.approx(ref["delta_loss_se"], rel=1e-4), hp
        assert got["kl"] == pytest.approx(ref["kl"], rel=5e-5, abs=1e-6), hp
        assert got["loss_recovered"] == pytest.approx(ref["loss_recovered"], abs=1e-4), hp
        assert abs(got["ce_zero"] - got["ce_clean"]) > 0.01 and got["kl"] > 1e-3
        hist = got["latent_freq_hist"]
        assert sum(hist["counts"]) + hist["dead"] == sae.d_sae
        assert hist["dead"] == round(ref["dead_frac"] * sae.d_sae)


def test_cluster_se_of_known_sums():
    """Sums 1, 2, 3, 6 over 1, 1, 1, 3 positions: mean 2, residuals -1, 0, 1, 0, so
    se = sqrt(4/3 * 2) / 6; one cluster has no standard error."""
    assert cluster_se([1, 2, 3, 6], [1, 1, 1, 3]) == pytest.approx(math.sqrt(8 / 3) / 6)
    assert math.isnan(cluster_se([1.0], [4]))


def test_paired_delta_of_two_saes_on_the_same_batches(model, batches):
    """The paired difference is the difference of the delta losses; an SAE against itself
    differs by 0 +- 0; records of other sequences are refused."""
    hp = HPS[2]
    a, b = (
        evaluate_saes(model, {hp: topk_sae(seed)}, batches, CPU, outlier_factor=None)[hp.name]
        for seed in (0, 1)
    )
    diff, se = paired_delta(a["delta_loss_by_sequence"], b["delta_loss_by_sequence"])
    assert diff == pytest.approx(a["delta_loss"] - b["delta_loss"], abs=1e-9)
    assert 0 < se < a["delta_loss_se"] + b["delta_loss_se"]
    assert paired_delta(a["delta_loss_by_sequence"], a["delta_loss_by_sequence"]) == (0, 0)
    shorter = {k: v[1:] for k, v in b["delta_loss_by_sequence"].items()}
    with pytest.raises(ValueError, match="same sequences"):
        paired_delta(a["delta_loss_by_sequence"], shorter)


def test_outlier_positions_are_left_out_of_the_sums_and_unspliced(tiny_cfg, batches):
    """The token policy at evaluation: the sink position (an outlier from layer 1 on) is left
    out of every SAE's reconstruction sums and keeps its clean activation in every splice, also
    at layer 0 where it is not an outlier; `excluded` counts it; with all_tokens the `_all`
    figures are those of the whole train mask."""
    model = sink_tiny_model(tiny_cfg)
    batches = [TokenBatch(b.input_ids, b.train_mask.clone(), b.doc_ids) for b in batches]
    for b in batches:
        b.train_mask[:, SINK_POSITION] = True
    keep = [b.train_mask & (torch.arange(20) != SINK_POSITION) for b in batches]
    saes = {hp: topk_sae(i) for i, hp in enumerate(HPS[:2])}
    res = evaluate_saes(
        model,
        saes,
        batches,
        CPU,
        ce_mean=True,
        logit_chunk=16,
        outlier_factor=10.0,
        all_tokens=True,
    )
    for hp, sae in saes.items():
        got = res[hp.name]
        assert got["excluded"] == 6
        kept = reference(model, hp, sae, batches, keep)
        for suffix, ref in (("", kept), ("_all", reference(model, hp, sae, batches))):
            assert got[f"tokens{suffix}"] == ref["tokens"]
            assert got[f"ce_tokens{suffix}"] == ref["ce_tokens"]
            for key in ("fvu", "mse", "cosine"):
                assert got[f"{key}{suffix}"] == pytest.approx(ref[key], rel=1e-5), (hp, key)
            for key in ("ce_clean", "ce_spliced", "ce_zero", "delta_loss"):
                assert got[f"{key}{suffix}"] == pytest.approx(ref[key], abs=2e-5), (hp, key)
            assert got[f"kl{suffix}"] == pytest.approx(ref["kl"], rel=5e-5, abs=1e-6), hp
        assert got["ce_mean"] == pytest.approx(kept["ce_mean"], abs=2e-5)
        assert "ce_mean_all" not in got
    # where the sink is an outlier the two token sets give visibly different figures
    one = res["layers.1.resid"]
    assert one["fvu_all"] != pytest.approx(one["fvu"], rel=0.02)
    assert one["delta_loss_all"] != pytest.approx(one["delta_loss"], rel=0.02)


def test_replay_from_the_spliced_layer_equals_a_full_spliced_forward(model, batches):
    """The cached, batched scheme: replays from layer L (several variants in one batch) give the
    final hidden state of a plain full forward with the same splice."""
    b = batches[0]
    clean = clean_pass(model, b.input_ids, HPS, [0, 1, 2, 3])
    torch.testing.assert_close(clean.final, model.model(b.input_ids).last_hidden_state)
    gen = torch.Generator().manual_seed(1)
    for hp in HPS:
        values = [torch.randn(int(b.train_mask.sum()), 64, generator=gen), torch.zeros(64)]
        finals = replay_from(
            model, clean, hp.layer, [{hp: masked_edit(b.train_mask, v)} for v in values]
        )
        for v, got in zip(values, finals):

            def fn(act, v=v):
                out = act.clone()
                out[b.train_mask] = v
                return out

            with splice(model, {hp: fn}):
                want = model.model(b.input_ids).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- excluded tokens


def test_excluded_tokens_enter_no_metric(model, tiny_cfg, smollm2_tokenizer):
    """Real chat data: BOS and chat control tokens never reach the SAE, are never spliced, and
    no CE position is masked; the SAE sees exactly the masked activations."""
    data = dataclasses.replace(tiny_cfg.data, context_size=48)
    batches = list(TokenStream(data, smollm2_tokenizer, "eval").batches_until(200, 3))
    ids = torch.cat([b.input_ids for b in batches])
    mask = torch.cat([b.train_mask for b in batches])
    specials = torch.isin(ids, torch.tensor(sorted(special_token_ids(smollm2_tokenizer))))
    assert specials.any() and not (mask & specials).any() and not mask[:, 0].any()
    hp = Hookpoint(1, "mlp")
    seen = []

    def recording_identity(x):
        seen.append(x.clone())
        return x

    res = evaluate_saes(model, {hp: recording_identity}, batches, CPU, outlier_factor=None)[hp.name]
    want = torch.cat([capture(model, [hp], b.input_ids)[hp][b.train_mask] for b in batches])
    torch.testing.assert_close(torch.cat(seen), want, atol=0, rtol=0)
    assert res["tokens"] == int(mask.sum()) and res["ce_tokens"] == int(mask[:, :-1].sum())
    # masking a position's token removes it from every count and changes nothing else there
    gen = torch.Generator().manual_seed(0)
    few = [
        TokenBatch(
            b.input_ids,
            b.train_mask & (torch.rand(b.train_mask.shape, generator=gen) < 0.3),
            b.doc_ids,
        )
        for b in batches
    ]
    res_few = evaluate_saes(model, {hp: lambda x: x}, few, CPU, outlier_factor=None)[hp.name]
    n_few = int(sum(b.train_mask.sum() for b in few))
    assert res_few["tokens"] == n_few and res_few["kl"] == pytest.approx(0, abs=1e-7)


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    suite = tmp_path_factory.mktemp("suite")
    hps = [Hookpoint(1, "resid"), Hookpoint(1, "mlp"), Hookpoint(1, "attn"), Hookpoint(3, "resid")]
    entries = []
    for i, hp in enumerate(hps):
        save_sae(
            topk_sae(i),
            suite / hp.name,
            {"hookpoint": hp.name, "model_name": "tiny-qwen3", "hook_name": hp.saelens_hook_name},
        )
        entries.append({"hookpoint": hp.name, "path": hp.name})
    write_suite_index(suite, entries, {"model": "tiny-qwen3", "architecture": "topk"})
    return suite


def compose_eval(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.config import register_configs
    from tests.conftest import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="eval", overrides=overrides))


def test_cli_writes_jsons_tables_and_plots(tiny_suite, tmp_path):
    out = tmp_path / "eval"
    cfg = compose_eval(
        [
            f"suite={tiny_suite}",
            f"out_dir={out}",
            "eval.tokens=120",
            "eval.batch_seqs=2",
            "data.context_size=40",
            "logger=none",
            "eval.all_tokens=true",
            "eval.slices=2",
            "data.reserved_frac=0.05",
            "data.max_doc_tokens=16",  # ~10 documents in 120 tokens
        ]
    )
    assert cfg.model is None
    results = run_evaluation(cfg)
    assert cfg.model.name == "tiny-qwen3"  # taken from suite.json
    names = ["layers.1.resid", "layers.1.mlp", "layers.1.attn", "layers.3.resid"]
    assert list(results) == names
    for name in names:
        doc = json.loads((out / "saes" / f"{name}.json").read_text())
        assert {"hookpoint", *EVAL_METRICS} <= set(doc)
        assert doc["hookpoint"] == name and doc["fvu"] == pytest.approx(results[name]["fvu"])
        assert doc["model"]["name"] == "tiny-qwen3" and doc["data"]["context_size"] == 40
        assert doc["split"] == "eval" and doc["tokens"] >= 120
        assert doc["token_policy"] == "positions=all, outliers > 10x median norm left out"
        assert doc["excluded"] == 0 and doc["tokens_all"] == doc["tokens"]  # no outliers here
        assert doc["fvu_all"] == pytest.approx(doc["fvu"]) and doc["sae"]["d_sae"] == 256
        assert doc["loss_recovered"] == pytest.approx(results[name]["loss_recovered"])
    with open(out / "suite_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["hookpoint"] for r in rows] == names
    assert float(rows[3]["delta_loss"]) == pytest.approx(results["layers.3.resid"]["delta_loss"])
    md = (out / "suite_table.md").read_text()
    assert "| loss_recovered | resid | mlp | attn |" in md and "| layer 3 |" in md
    assert "token policy: positions=all, outliers > 10x median norm left out" in md
    assert {"excluded", "fvu_all", "delta_loss_all"} <= set(rows[0])
    for png in ("metrics_by_layer.png", "l0_tradeoff.png", "latent_frequency.png"):
        assert (out / png).stat().st_size > 10_000
    # the spread: intervals over documents around each figure, two regions of the corpus
    for name in names:
        doc = json.loads((out / "saes" / f"{name}.json").read_text())
        for m in ("fvu", "l0", "delta_loss"):
            low, high = doc[f"{m}_ci"]
            assert low <= doc[m] <= high and (low < high or m == "l0"), (name, m)  # TopK: l0 = k
        regions = doc["slices"]
        assert len(regions) == 2 and sum(r["docs"] for r in regions) == doc["docs"] >= 2
        assert sum(r["tokens"] for r in regions) == doc["tokens"]
        assert regions[0]["last_doc"] < regions[1]["first_doc"]
        assert float(rows[names.index(name)]["fvu_ci_low"]) == doc["fvu_ci"][0]
    assert "### layers.3.resid: by region of the corpus" in md and "| fvu_ci |" in md
    # the reserved region (the file's last 5%), evaluated beside the held-out split
    reserved = json.loads((out / "reserved" / "saes" / "layers.1.resid.json").read_text())
    assert reserved["split"] == "reserved" and reserved["tokens"] >= 120
    assert "reserved split of `sharegpt`" in (out / "reserved" / "suite_table.md").read_text()


def test_cli_single_sae_folder_and_errors(tiny_suite, tmp_path):
    cfg = compose_eval(
        [
            f"suite={tiny_suite / 'layers.3.resid'}",
            f"out_dir={tmp_path}",
            "eval.tokens=40",
            "eval.batch_seqs=2",
            "data.context_size=40",
            "logger=none",
            "model=tiny-qwen3",
            "eval.model_level=false",
        ]
    )
    res = run_evaluation(cfg)
    assert list(res) == ["layers.3.resid"] and "ce_clean" not in res["layers.3.resid"]
    with pytest.raises(ConfigError, match="eval.tokens=0"):
        run_evaluation(compose_eval([f"suite={tiny_suite}", "eval.tokens=0", "logger=none"]))
    with pytest.raises(ConfigError, match="suite="):
        run_evaluation(compose_eval([f"suite={tmp_path / 'nope'}", "logger=none"]))
