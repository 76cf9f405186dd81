"""Steering on the tiny Qwen3: exact no-ops (alpha 0, clamp to the current value), clean removal,
positions with and without the KV cache and with left padding, contrast scoring (planted feature,
AUROC against brute force), clear errors before any generation, intervention.json round trip,
the steering command."""

import json
from pathlib import Path

import pytest
import torch

from sae_dist.checkpoint import save_sae, write_suite_index
from sae_dist.cli import CONF_DIR as _CONF_DIR
from sae_dist.config import ConfigError, sae_config
from sae_dist.hookpoints import Hookpoint, hooks
from sae_dist.sae import build_sae
from sae_dist.steer.contrast import auroc, diff_in_means, prompt_tokens, score_features
from sae_dist.steer.generate import generate
from sae_dist.steer.interventions import add_direction, add_features, clamp_features, steer
from sae_dist.steer.spec import InterventionSpec, load_interventions, save_interventions
from tests.conftest import scaled_tiny_model

CONF_DIR = str(_CONF_DIR)
HPS = [Hookpoint(1, "resid"), Hookpoint(2, "mlp"), Hookpoint(1, "attn")]
PROMPTS = [
    "Tell me a story about a cat.",
    "How do I make a bomb at home quickly?",
    "Hi",
    "Write a poem about the sea and the wind in winter, in four lines.",
]


@pytest.fixture(scope="module")
def model(tiny_cfg):
    """The tiny Qwen3 scaled so that greedy generations vary."""
    return scaled_tiny_model(tiny_cfg, 8.0)


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build_sae(sae_config("topk", expansion=4, k=8), 64).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 3000, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# ------------------------------------------------------------------------ exact no-ops


@pytest.mark.parametrize("hp", HPS, ids=str)
def test_alpha_zero_leaves_logits_bit_identical(model, sae, ids, hp):
    clean = logits(model, ids)
    with steer(model, [add_features(hp, sae, [3, 5], 0.0)]):
        same = logits(model, ids)
    with steer(model, [add_features(hp, sae, [3, 5], 8.0)]):
        moved = logits(model, ids)
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    assert (moved - clean).abs().max() > 1e-2


def constant_feature_sae(value: float = 50.0):
    """A TopK SAE whose feature 7 is always active with activation `value` (zero encoder
    column, large bias), so a clamp to `value` is a clamp to the current value everywhere."""
    torch.manual_seed(1)
    s = build_sae(sae_config("topk", expansion=4, k=8), 64).eval()
    with torch.no_grad():
        s.W_enc[:, 7] = 0
        s.b_enc[7] = value
    return s


@pytest.mark.parametrize("hp", HPS, ids=str)
def test_clamp_to_current_value_is_a_no_op(model, ids, hp):
    s = constant_feature_sae(50.0)
    clean = logits(model, ids)
    with steer(model, [clamp_features(hp, s, [7], 50.0)]):
        same = logits(model, ids)
    with steer(model, [clamp_features(hp, s, [7], 0.0)]):
        ablated = logits(model, ids)
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    assert (ablated - clean).abs().max() > 1e-2


def test_clamp_keeps_the_error_term(sae):
    """x' - x = decode(z with f set to c) - decode(z): only the clamped feature changes."""
    x = torch.randn(20, 64) * 3
    iv = clamp_features(Hookpoint(1, "resid"), sae, [3, 11], [4.0, 0.0])
    z = sae.encode(x).dense()
    z2 = z.clone()
    z2[:, 3], z2[:, 11] = 4.0, 0.0
    expected = (z2 @ sae.W_dec + sae.b_dec) - (z @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(iv.delta(x), expected, atol=1e-5, rtol=1e-5)
    # where feature 3 is inactive and 11 too, a clamp of 3 to c is an addition of c * d_3
    off = (z[:, 3] == 0) & (z[:, 11] == 0)
    assert off.any()
    torch.testing.assert_close(
        iv.delta(x)[off], (4.0 * sae.W_dec[3]).expand(int(off.sum()), -1), atol=1e-5, rtol=1e-5
    )


def test_alpha_is_in_activation_units_whatever_the_saved_row_norm(sae):
    """Rows saved at norm 5 (an SAE folded for raw activations) steer like unit rows: add adds
    alpha * d_f, and a clamp to c sets the feature's contribution to c * d_f."""
    big = constant_feature_sae(50.0)
    with torch.no_grad():
        big.W_dec.mul_(5.0)
    unit = big.W_dec[7] / big.W_dec[7].norm()
    hp = Hookpoint(1, "resid")
    torch.testing.assert_close(add_features(hp, big, [7], 3.0).vector, 3.0 * unit)
    x = torch.randn(4, 64)
    # feature 7 is 50 everywhere, its contribution 50 * 5 * d_7; a clamp to 20 removes 230 d_7
    torch.testing.assert_close(
        clamp_features(hp, big, [7], 20.0).delta(x),
        (-230.0 * unit).expand(4, -1),
        atol=1e-3,
        rtol=1e-5,
    )


def test_removal_restores_bit_identical_outputs(model, sae, ids):
    before = logits(model, ids)
    ivs = [
        add_features(Hookpoint(1, "resid"), sae, [1], 6.0),
        clamp_features(Hookpoint(2, "attn"), sae, [2, 9], 3.0),
    ]
    with steer(model, ivs):
        during = logits(model, ids)
    after = logits(model, ids)
    assert (during - before).abs().max() > 1e-2
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []


def test_several_saes_and_hookpoints_compose(model, sae, ids):
    """Two additions at different hookpoints equal the same edits spliced by hand."""
    a, b = Hookpoint(0, "mlp"), Hookpoint(2, "resid")
    va, vb = 2.0 * sae.W_dec[4], -3.0 * constant_feature_sae().W_dec[5]
    with steer(model, [add_direction(a, va), add_direction(b, vb)]):
        steered = logits(model, ids)
    with torch.no_grad(), hooks(model, {a: lambda x: x + va, b: lambda x: x + vb}):
        manual = model(ids).logits
    torch.testing.assert_close(steered, manual, atol=0, rtol=0)


# ------------------------------------------------------------------------------ positions


def test_positions_select_prompt_generated_and_skip_padding(model, sae):
    hp, v = Hookpoint(1, "resid"), sae.W_dec[0] * 5
    ids = torch.randint(0, 3000, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded by two tokens
    seen = {}

    def run(positions):
        def grab(x):
            seen[positions] = x.clone()

        with (
            torch.no_grad(),
            steer(model, [add_direction(hp, v, 1.0, positions)], prompt_len=4),
            hooks(model, {hp: grab}),
        ):  # registered after the steering hook: sees its output
            model(ids, attention_mask=mask)

    for p in ("none", "all", "prompt", "generated"):
        if p == "none":
            with torch.no_grad(), hooks(model, {hp: lambda x, p=p: seen.__setitem__(p, x.clone())}):
                model(ids, attention_mask=mask)
        else:
            run(p)
    added = {p: (seen[p] - seen["none"]) for p in ("all", "prompt", "generated")}
    expect_all = mask.bool().clone()
    expect_prompt = expect_all.clone()
    expect_prompt[:, 4:] = False
    for p, where in (
        ("all", expect_all),
        ("prompt", expect_prompt),
        ("generated", expect_all & ~expect_prompt),
    ):
        edited = added[p].abs().amax(-1) > 0
        assert torch.equal(edited, where), p
        torch.testing.assert_close(
            added[p][where], v.expand(int(where.sum()), -1), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("positions", ["generated", "prompt", "all"])
def test_generation_with_kv_cache_equals_generation_without(model, tokenizer_fx, sae, positions):
    iv = add_features(Hookpoint(1, "resid"), sae, [3, 7], 30.0, positions)
    cached = generate(model, tokenizer_fx, PROMPTS, [iv], max_new_tokens=10, batch_size=4)
    uncached = generate(
        model, tokenizer_fx, PROMPTS, [iv], max_new_tokens=10, batch_size=4, use_cache=False
    )
    plain = generate(model, tokenizer_fx, PROMPTS, [], max_new_tokens=10, batch_size=4)
    assert [g.tokens for g in cached] == [g.tokens for g in uncached]
    assert [g.tokens for g in cached] != [g.tokens for g in plain]  # the steering acted
    assert all(len(set(g.tokens)) > 1 for g in plain)  # and the model is not degenerate


def test_batched_left_padded_generation_equals_one_by_one(model, tokenizer_fx, sae):
    iv = add_features(Hookpoint(2, "mlp"), sae, [2], 20.0, "generated")
    batched = generate(model, tokenizer_fx, PROMPTS, [iv], max_new_tokens=8, batch_size=4)
    single = generate(model, tokenizer_fx, PROMPTS, [iv], max_new_tokens=8, batch_size=1)
    assert [g.tokens for g in batched] == [g.tokens for g in single]


@pytest.fixture(scope="module")
def tokenizer_fx(smollm2_tokenizer):
    return smollm2_tokenizer


# ------------------------------------------------------------------------------- contrast


def test_auroc_matches_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4, (13, 6), generator=gen).float()
    neg = torch.randint(0, 3, (9, 6), generator=gen).float()
    got = auroc(pos, neg, chunk=4)
    diff = pos[:, None, :] - neg[None, :, :]
    expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean((0, 1))
    torch.testing.assert_close(got, expected)
    assert auroc(torch.ones(3, 1), torch.zeros(4, 1)).item() == 1.0


def test_planted_feature_ranks_first(model, tokenizer_fx):
    """Harmful-like vs harmless-like prompt sets through the real model; a feature planted along
    their difference in means ranks first by AUROC and by mean difference."""
    hp = Hookpoint(2, "resid")
    a = [f"Please explain how to build a dangerous weapon number {i}" for i in range(12)]
    b = [f"Please write a short happy song about flowers number {i}" for i in range(12)]
    ta = prompt_tokens(model, tokenizer_fx, a, [hp])
    tb = prompt_tokens(model, tokenizer_fx, b, [hp])
    xa, xb = ta.acts[hp], tb.acts[hp]
    assert xa.shape == (12 * 6, 64)  # 6 end-of-instruction tokens per prompt (ChatML)
    u = diff_in_means(xa, xb)
    u = u / u.norm()
    mid = float(((xa @ u).mean() + (xb @ u).mean()) / 2)
    torch.manual_seed(3)
    s = build_sae(sae_config("topk", expansion=4, k=8), 64).eval()
    planted = 123
    with torch.no_grad():
        s.b_dec.zero_()
        s.W_enc[:, planted] = 1e3 * u  # huge pre-activation on one side: always in the top k
        s.b_enc[planted] = -1e3 * mid
        s.W_dec[planted] = u
    scores = score_features(s, xa, xb)
    assert int(scores.ranking("auroc")[0]) == planted
    assert int(scores.ranking("mean_diff")[0]) == planted
    assert scores.auroc[planted] > 0.8 and scores.freq_pos[planted] > scores.freq_neg[planted]


# --------------------------------------------------------------------------------- errors


def write_suite(tmp_path, widths: dict[str, int], model_name: str = "tiny-qwen3") -> Path:
    suite = tmp_path / "suite"
    entries = []
    for name, d_in in widths.items():
        torch.manual_seed(len(entries))
        s = build_sae(sae_config("topk", expansion=4, k=8), d_in)
        layer, site = name.split(".")[1:]
        save_sae(
            s,
            suite / name,
            {"model_name": model_name, "hookpoint": name, "layer": int(layer), "site": site},
        )
        entries.append({"hookpoint": name, "path": name})
    write_suite_index(suite, entries, {"model": model_name})
    return suite


def test_bad_feature_hookpoint_or_width_stop_before_generation(
    model, tokenizer_fx, sae, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ConfigError, match=r"features=\[256\].*0\.\.255"):
        generate(
            model, tokenizer_fx, PROMPTS, [add_features(Hookpoint(1, "resid"), sae, [256], 1.0)]
        )
    wide = build_sae(sae_config("topk", expansion=2, k=4), 96)
    with pytest.raises(ConfigError, match="width 64"):
        generate(
            model, tokenizer_fx, PROMPTS, [clamp_features(Hookpoint(1, "resid"), wide, [0], 1.0)]
        )
    with pytest.raises(ConfigError, match=r"hookpoint='layers.9.resid'"):
        generate(
            model, tokenizer_fx, PROMPTS, [add_direction(Hookpoint(9, "resid"), torch.ones(64))]
        )
    with pytest.raises(ConfigError, match="positions='middle'"):
        add_features(Hookpoint(1, "resid"), sae, [1], 1.0, "middle")
    assert calls == []
    suite = write_suite(tmp_path, {"layers.1.resid": 64, "layers.2.mlp": 96})
    spec = InterventionSpec(str(suite / "layers.1.resid"), "layers.1.resid", [999], 2.0)
    with pytest.raises(ConfigError, match="features=\\[999\\]"):
        spec.build(4)


# -------------------------------------------------------------------- intervention.json


def test_intervention_file_round_trip_and_cli(model, tmp_path, capsys):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.config import register_configs
    from sae_dist.steer.command import run

    suite = write_suite(tmp_path, {"layers.1.resid": 64})
    path = tmp_path / "intervention.json"
    spec = InterventionSpec(
        str(suite / "layers.1.resid"), "layers.1.resid", [5, 9], 7.5, "add", "generated"
    )
    save_interventions([spec], path)
    raw = json.loads(path.read_text())
    assert raw == [
        {
            "sae": str(suite / "layers.1.resid"),
            "hookpoint": "layers.1.resid",
            "features": [5, 9],
            "alpha": 7.5,
            "mode": "add",
            "positions": "generated",
            "direction": None,
            "gate": None,
        }
    ]
    iv = load_interventions(path)[0].build(4)
    from sae_dist.checkpoint import load_sae

    s, _ = load_sae(suite / "layers.1.resid")
    unit = s.W_dec / s.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(iv.vector, 7.5 * (unit[5] + unit[9]))
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        dcfg = compose(
            config_name="steer",
            overrides=[
                f"intervention={path}",
                "prompt=Tell me about cats.",
                "max_new_tokens=6",
                "logger=none",
                f"out_dir={tmp_path / 'out'}",
            ],
        )
    out = run(OmegaConf.to_object(dcfg))
    printed = capsys.readouterr().out
    assert "--- unsteered ---" in printed and "--- steered (add [5, 9] at layers.1.resid" in printed
    assert set(out) == {"unsteered", "steered"}


# --------------------------------------------------------------------- refusal metrics


# --------------------------------------------------------------------- the case study
