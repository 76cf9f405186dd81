"""Gated interventions on the tiny Qwen3: the positions a gate reads, its scores against a hand
computation, gated generation = unsteered or always-on per prompt (with and without the KV
cache, batched and one by one, inverted), clear errors, and an intervention.json with a gate
re-applied by a few lines of plain PyTorch hooks, token for token."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_dist.checkpoint import save_sae
from sae_dist.config import ConfigError, sae_config
from sae_dist.hookpoints import Hookpoint, hooks
from sae_dist.sae import build_sae
from sae_dist.steer.gate import (
    GateSpec,
    direction_gate,
    features_gate,
    gated,
    prompt_positions,
)
from sae_dist.steer.generate import generate, left_pad, render_prompts
from sae_dist.steer.interventions import add_direction, add_features, steer
from sae_dist.steer.spec import InterventionSpec, load_interventions, save_interventions
from tests.conftest import scaled_tiny_model

HP = Hookpoint(1, "resid")
PROMPTS = [
    "Tell me a story about a cat.",
    "How do I make a bomb at home quickly?",
    "Hi there",
    "Write a poem about the sea and the wind in winter, in four lines.",
    "What is the capital of France?",
    "Explain how to pick a lock, step by step.",
]


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return scaled_tiny_model(tiny_cfg, 8.0)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build_sae(sae_config("topk", expansion=4, k=8), 64).eval()


def median_threshold(model, tok, gate_fn):
    """The gate built with threshold 0, its reduced scores on PROMPTS, and their median."""
    g = gate_fn(0.0)
    scores = [r.gate_scores[0] for r in generate(model, tok, PROMPTS, [], 1, gates=[g])]
    return sorted(scores)[len(scores) // 2 - 1] + 1e-4, scores


# ----------------------------------------------------------------------------- reading


def test_gate_reads_the_prompt_less_its_first_token_and_padding():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = prompt_positions(valid, 0, 5, 2, 6, torch.device("cpu"))
    assert keep.tolist() == [
        [False, False, False, True, True, False],
        [False, True, True, True, True, False],
    ]
    assert not prompt_positions(None, 6, 5, 2, 1, torch.device("cpu")).any()  # a later pass


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_gate_scores_equal_a_hand_computation(model, tok, sae, reduce):
    """Left-padded prompts: the SAE gate's score is the reduce over positions 1.. of each
    prompt of sum_f w_f z_f (TopK encoder output), the direction gate's of <x, u>."""
    feats, w = [237, 7, 58], [0.5, 2.0, -1.0]
    u = torch.randn(64, generator=torch.Generator().manual_seed(2))
    g_sae = features_gate(HP, sae, feats, w, 0.0, reduce)
    g_dir = direction_gate(HP, u, 0.0, reduce)
    rendered = render_prompts(tok, PROMPTS[:3])
    ids, mask = left_pad(rendered, 0)
    seen = {}
    with (
        torch.no_grad(),
        steer(model, [], prompt_len=ids.shape[1], gates=[g_sae, g_dir]) as s,
        hooks(model, {HP: lambda x: seen.__setitem__("x", x.clone())}),
    ):
        model(input_ids=ids, attention_mask=mask)
    got_sae, got_dir = [r.scores for r in s.readings()]
    assert got_sae.abs().min() > 0
    for row, r in enumerate(rendered):
        x = seen["x"][row, ids.shape[1] - len(r) + 1 :]  # the prompt less its first token
        z = sae.encode(x).dense()[:, feats]
        per_pos = z @ torch.tensor(w)
        expect = per_pos.max() if reduce == "max" else per_pos.mean()
        torch.testing.assert_close(got_sae[row], expect, rtol=1e-5, atol=1e-5)
        proj = x @ u
        torch.testing.assert_close(
            got_dir[row], proj.max() if reduce == "max" else proj.mean(), rtol=1e-5, atol=1e-4
        )


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize(
    "use_cache,batch_size,positions",
    [
        (True, 6, "generated"),
        (False, 6, "generated"),
        (True, 1, "generated"),
        (True, 6, "all"),
        (False, 6, "all"),
        (True, 1, "prompt"),
    ],
)
def test_gated_generation_is_unsteered_or_always_on_per_prompt(
    model, tok, sae, use_cache, batch_size, positions
):
    thr, scores = median_threshold(model, tok, lambda t: features_gate(HP, sae, [237, 7], 1.0, t))
    gate = features_gate(HP, sae, [237, 7], 1.0, thr)
    inverted = features_gate(HP, sae, [237, 7], 1.0, thr, invert=True)
    always = add_features(Hookpoint(2, "resid"), sae, [5, 9], 30.0, positions)
    kw = {"max_new_tokens": 8, "batch_size": batch_size, "use_cache": use_cache}
    plain = generate(model, tok, PROMPTS, [], **kw)
    on = generate(model, tok, PROMPTS, [always], **kw)
    gen = generate(model, tok, PROMPTS, [gated(always, gate)], **kw)
    inv = generate(model, tok, PROMPTS, [gated(always, inverted)], **kw)
    opened = [s >= thr for s in scores]
    assert 0 < sum(opened) < len(PROMPTS)
    assert sum(a.tokens != b.tokens for a, b in zip(plain, on)) >= 4  # the edit acts
    for i in range(len(PROMPTS)):
        assert gen[i].gate_open == [opened[i]] and inv[i].gate_open == [not opened[i]]
        assert gen[i].gate_scores[0] == pytest.approx(scores[i], rel=1e-5, abs=1e-5)
        assert gen[i].tokens == (on if opened[i] else plain)[i].tokens
        assert inv[i].tokens == (plain if opened[i] else on)[i].tokens


def test_gated_edit_needs_the_gate_read_first_in_a_single_pass(model, tok, sae):
    """A gate later in the network than its edit of generated positions cannot decide within
    one full pass; after a prompt-only pass it can. A gated edit of prompt positions must not
    come before its gate."""
    gate = features_gate(Hookpoint(3, "resid"), sae, [3], 1.0, -1e9)  # always open
    iv = gated(add_direction(Hookpoint(1, "mlp"), torch.ones(64), 5.0, "generated"), gate)
    ids = torch.randint(0, 3000, (2, 9), generator=torch.Generator().manual_seed(0))
    with (
        torch.no_grad(),
        steer(model, [iv], prompt_len=6),
        pytest.raises(RuntimeError, match="has not read the prompt"),
    ):
        model(ids)
    with torch.no_grad(), steer(model, [iv], prompt_len=6) as s:
        model(ids[:, :6])
        model(ids)
        assert s.readings()[0].open.tolist() == [True, True]
        with pytest.raises(RuntimeError, match="reset_gates"):
            model(ids[:1])
    early = gated(add_direction(Hookpoint(1, "mlp"), torch.ones(64), 5.0, "all"), gate)
    with pytest.raises(ConfigError, match="gate.hookpoint='layers.3.resid'.*no later"):
        generate(model, tok, PROMPTS[:1], [early], max_new_tokens=1)
    with pytest.raises(ConfigError, match="gate.reduce='median'"):
        features_gate(HP, sae, [3], 1.0, 0.0, "median")
    with pytest.raises(ConfigError, match="gate.weights"):
        features_gate(HP, sae, [3, 4], [1.0, 2.0, 3.0], 0.0)


# -------------------------------------------------------------------- intervention.json


def plain_generate(model, tok, prompt: str, file, n_new: int) -> list[int]:
    """intervention.json applied with plain PyTorch hooks, no sae_dist code: greedy decoding of
    one prompt with full recomputation; each gate reads the prompt pass at positions 1..P-1."""
    entries = json.loads(file.read_text())
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    n_prompt, state = len(ids), {}

    def module(name):
        _, layer, site = name.split(".")
        block = model.model.layers[int(layer)]
        return {"resid": block, "mlp": block.mlp, "attn": block.self_attn}[site]

    def weights(folder):
        cfg = json.loads((Path(folder) / "cfg.json").read_text())
        return load_file(f"{folder}/sae_weights.safetensors"), cfg["k"]

    def read(k, g):  # the prompt pass: the gate reads positions 1..P-1
        def fn(mod, args, out):
            if k in state:
                return
            h = (out[0] if isinstance(out, tuple) else out)[0, 1:n_prompt]
            if g["direction"] is not None:
                s = h @ torch.tensor(g["direction"])
            else:
                t, topk = weights(g["sae"])
                pre = (h - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
                top = pre.topk(topk, dim=-1)
                z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
                s = z[:, g["features"]] @ torch.tensor(g["weights"])
            s = s.max() if g["reduce"] == "max" else s.mean()
            state[k] = bool(s >= g["threshold"]) != g["invert"]

        return fn

    def edit(k, e):  # the edit's positions, where the gate opened
        def fn(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            where = {
                "all": slice(None),
                "prompt": slice(0, n_prompt),
                "generated": slice(n_prompt, None),
            }[e["positions"]]
            if not state[k] or x[:, where].shape[1] == 0:
                return None
            if e["direction"] is not None:
                v = torch.tensor(e["direction"])
                v = e["alpha"] * v / v.norm()
            else:
                rows = weights(e["sae"])[0]["W_dec"][e["features"]]
                v = e["alpha"] * (rows / rows.norm(dim=1, keepdim=True)).sum(0)
            x = x.clone()
            x[:, where] += v
            return (x, *out[1:]) if isinstance(out, tuple) else x

        return fn

    handles = [
        module(e["gate"]["hookpoint"]).register_forward_hook(read(k, e["gate"]))
        for k, e in enumerate(entries)
    ]
    handles += [
        module(e["hookpoint"]).register_forward_hook(edit(k, e)) for k, e in enumerate(entries)
    ]
    try:
        with torch.no_grad():
            for _ in range(n_new):
                ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
    finally:
        for h in handles:
            h.remove()
    return ids[n_prompt:]


def test_gated_intervention_file_reapplied_with_plain_hooks(model, tok, sae, tmp_path):
    """A features gate on one edit and a direction gate on another, written to
    intervention.json; the API and a plain re-implementation give the same tokens, and the
    gates open on some prompts and not on others."""
    save_sae(sae, tmp_path / "sae", {"model_name": "tiny-qwen3", "hookpoint": HP.name})
    thr_f, s_f = median_threshold(
        model, tok, lambda t: features_gate(HP, sae, [237, 58], [1.0, 0.5], t)
    )
    u = torch.randn(64, generator=torch.Generator().manual_seed(4))
    thr_d, _ = median_threshold(
        model, tok, lambda t: direction_gate(Hookpoint(0, "mlp"), u, t, "mean")
    )
    w = torch.randn(64, generator=torch.Generator().manual_seed(5))
    specs = [
        InterventionSpec(
            str(tmp_path / "sae"),
            "layers.2.resid",
            [5, 9],
            30.0,
            "add",
            "generated",
            gate=GateSpec(
                HP.name, thr_f, "max", False, str(tmp_path / "sae"), [237, 58], [1.0, 0.5]
            ),
        ),
        InterventionSpec(
            None,
            "layers.1.mlp",
            [],
            20.0,
            "add",
            "generated",
            direction=w.tolist(),
            gate=GateSpec("layers.0.mlp", thr_d, "mean", True, None, [], [], u.tolist()),
        ),
    ]
    path = tmp_path / "intervention.json"
    save_interventions(specs, path)
    raw = json.loads(path.read_text())
    assert raw[0]["gate"]["features"] == [237, 58] and raw[1]["gate"]["direction"] == u.tolist()
    ivs = [s.build(4) for s in load_interventions(path)]
    api = generate(model, tok, PROMPTS, ivs, max_new_tokens=6, batch_size=6)
    plain = generate(model, tok, PROMPTS, [], max_new_tokens=6, batch_size=6)
    assert 0 < sum(g.gate_open[0] for g in api) == sum(s >= thr_f for s in s_f) < len(PROMPTS)
    assert 0 < sum(g.gate_open[1] for g in api) < len(PROMPTS)
    assert any(a.tokens != b.tokens for a, b in zip(api, plain))
    for g in api:
        assert plain_generate(model, tok, g.prompt, path, 6)[: len(g.tokens)] == g.tokens


def test_gate_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of sae"):
        GateSpec("layers.1.resid", 0.0).build(4)
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            [
                {
                    "sae": None,
                    "hookpoint": "layers.1.resid",
                    "features": [],
                    "alpha": 1.0,
                    "direction": [0.0] * 64,
                    "gate": {"hookpoint": "layers.1.resid", "threshold": 0, "colour": "red"},
                }
            ]
        )
    )
    with pytest.raises(ConfigError, match="bad.json"):
        load_interventions(path)
