"""Hookpoints on the tiny Qwen3: captured activations equal the module outputs they name,
splices change (or keep) the logits, early exit skips later layers, bad names fail clearly."""

import pytest
import torch

from sae_dist.config import ConfigError, SitesConfig
from sae_dist.hookpoints import Hookpoint, capture, grid_hookpoints, resolve, splice

N_LAYERS = 4


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def manual_forward(model, ids):
    """Re-run the Qwen3 decoder by hand, returning (resid, mlp, attn) outputs per layer."""
    m = model.model
    h = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos_sin = m.rotary_emb(h, pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    out = []
    for layer in m.layers:
        attn, _ = layer.self_attn(
            layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask
        )
        h = h + attn
        mlp = layer.mlp(layer.post_attention_layernorm(h))
        h = h + mlp
        out.append({"resid": h, "mlp": mlp, "attn": attn})
    return out


def test_captured_activation_equals_manual_forward(tiny_model, ids):
    hps = [Hookpoint(i, s) for i in range(N_LAYERS) for s in ("resid", "mlp", "attn")]
    acts = capture(tiny_model, hps, ids, stop_early=False)
    with torch.no_grad():
        ref = manual_forward(tiny_model, ids)
    for hp in hps:
        torch.testing.assert_close(acts[hp], ref[hp.layer][hp.site], atol=1e-5, rtol=1e-5)
    # resid of the last layer is NOT the (final-normed) last hidden state of HF
    with torch.no_grad():
        hidden = tiny_model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[Hookpoint(1, "resid")], hidden[2])
    assert not torch.allclose(acts[Hookpoint(N_LAYERS - 1, "resid")], hidden[-1])


def test_sites_resolve_to_named_modules(tiny_model):
    layer = tiny_model.model.layers[2]
    assert resolve(tiny_model, Hookpoint(2, "resid")) is layer
    assert resolve(tiny_model, Hookpoint(2, "mlp")) is layer.mlp
    assert resolve(tiny_model, Hookpoint(2, "attn")) is layer.self_attn


@pytest.mark.parametrize("site", ["resid", "mlp", "attn"])
def test_identity_splice_keeps_logits_and_zero_splice_changes_them(tiny_model, ids, site):
    hp = Hookpoint(1, site)
    with torch.no_grad():
        clean = tiny_model(ids).logits
        with splice(tiny_model, {hp: lambda a: a.clone()}):
            same = tiny_model(ids).logits
        with splice(tiny_model, {hp: torch.zeros_like}):
            zeroed = tiny_model(ids).logits
    torch.testing.assert_close(same, clean, atol=0, rtol=0)
    assert (zeroed - clean).abs().max() > 1e-3


def test_early_exit_skips_later_layers(tiny_model, ids):
    ran = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
        for i, layer in enumerate(tiny_model.model.layers)
    ]
    head_calls = []
    handles.append(tiny_model.lm_head.register_forward_pre_hook(lambda m, a: head_calls.append(1)))
    try:
        acts = capture(tiny_model, [Hookpoint(1, "mlp"), Hookpoint(0, "resid")], ids)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]
    assert head_calls == []
    assert set(acts) == {Hookpoint(1, "mlp"), Hookpoint(0, "resid")}


def test_grid_and_errors():
    hps = grid_hookpoints(SitesConfig(layers=[2, 0], sites=["attn", "resid"]), N_LAYERS)
    assert [h.name for h in hps] == [
        "layers.0.resid",
        "layers.0.attn",
        "layers.2.resid",
        "layers.2.attn",
    ]
    assert len(grid_hookpoints(SitesConfig(layers=None), N_LAYERS)) == 3 * N_LAYERS
    with pytest.raises(ConfigError, match=r"sites.layers=7 .*0\.\.3"):
        grid_hookpoints(SitesConfig(layers=[7]), N_LAYERS)
    with pytest.raises(ConfigError, match=r"sites.sites='mlp_out' .*resid, mlp, attn"):
        grid_hookpoints(SitesConfig(sites=["mlp_out"]), N_LAYERS)
    with pytest.raises(ConfigError, match=r"layers\.\{0\.\.3\}\.\{resid,mlp,attn\}"):
        grid_hookpoints(SitesConfig(hookpoints=["layers.4.resid"]), N_LAYERS)
    with pytest.raises(ConfigError, match="each hookpoint at most once"):
        grid_hookpoints(SitesConfig(hookpoints=["layers.1.mlp", "layers.1.mlp"]), N_LAYERS)
    assert Hookpoint(3, "attn").saelens_hook_name == "blocks.3.hook_attn_out"
