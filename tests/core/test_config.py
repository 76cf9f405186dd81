"""Bad configs stop the run at start-up, before any model is loaded, with a message naming the
key, the value and what is allowed; good ones compose from the YAML groups."""

import pytest
import torch
from omegaconf.errors import ValidationError

from sae_dist.config import ConfigError, l0_overrides, validate
from sae_dist.models import load_model, resolve_dtype, resolve_mixed_precision
from sae_dist.train import loop as train_module
from tests.conftest import compose_train_config


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr(train_module, "load_model", fail)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sites.layers=[6,30]", r"sites.layers=30 is not allowed; allowed: 0..29"),
        ("sites.sites=[resid,mlp_out]", r"sites.sites='mlp_out' .*allowed: resid, mlp, attn"),
        ("+sites.hookpoints=[layers.2.attention]", r"'layers.2.attention'.*layers\.\{0\.\.29\}"),
        ("sae.k=10000", r"sae.k=10000 is not allowed; allowed: 1..4608 \(d_sae\)"),
        ("sae.architecture=gated", r"sae.architecture='gated'.*allowed: .*topk"),
        ("train.tokens=0", r"train.tokens=0 .*> 0"),
        ("model.dtype=int8", r"model.dtype='int8'.*float32, bfloat16, float16, auto"),
        ("train.checkpoint_every=-1", r"train.checkpoint_every=-1 .*>= 0"),
        ("train.log_every=0", r"train.log_every=0 .*> 0"),
        ("train.tokens=100", r"train.tokens=100 .*>= train.batch_size"),
        ("trainer.mixed_precision=bf15", r"trainer.mixed_precision='bf15'.*no, bf16, fp16, auto"),
        ("train.adam_betas=[0.9,1.0]", r"train.adam_betas=\[0.9, 1.0\] .*two values in \[0, 1\)"),
        ("train.sequence_pool=8", r"train.sequence_pool=8 .*>= train.forward_batch_seqs \(16\)"),
        ("sae.lr_mult=0", r"sae.lr_mult=0(\.0)? .*> 0"),
    ],
)
def test_bad_config_fails_before_model_load(no_model_load, override, message):
    with pytest.raises(ConfigError, match=message):  # at composition or at start-up
        train_module.train(compose_train_config(["experiment=demo", "logger=none", override]))


def test_type_errors_name_the_key():
    with pytest.raises(Exception, match=r"train.tokens") as info:
        compose_train_config(["train.tokens=many"])
    assert isinstance(info.value, ValidationError) or "many" in str(info.value)


def test_demo_composes_with_user_overrides():
    cfg = compose_train_config(
        [
            "experiment=demo",
            "sae.expansion=8",
            "sae.k=16",
            "train.tokens=1234",
            "out_dir=/tmp/x",
            "model=qwen3-8b",
            "sites=resid_0_8",
        ]
    )
    validate(cfg)
    assert (cfg.sae.expansion, cfg.sae.k, cfg.train.tokens) == (8, 16, 1234)
    assert cfg.model.path == "Qwen/Qwen3-8B" and cfg.model.d_model == 4096
    assert cfg.sites.layers == list(range(9)) and cfg.sites.sites == ["resid"]
    assert cfg.out_dir == "/tmp/x"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["sae.target_l0=16"], 0.1),
        ([], 1.0),
        (["sae.target_l0=16", "sae.threshold_lr_mult=2"], 2.0),
    ],
)
def test_jumprelu_threshold_rate_follows_target_l0(overrides, expected):
    """threshold_lr_mult null: 0.1 with target_l0 (the controller sets the level), 1 without."""
    cfg = compose_train_config(["sae=jumprelu", *overrides])
    assert cfg.sae.threshold_lr_mult == expected and cfg.sae.l0_coef == 0.01


@pytest.mark.parametrize(
    "arch, target",
    [
        ("topk", ("k", 24)),
        ("batchtopk", ("k", 24)),
        ("jumprelu", ("target_l0", 24.0)),
        ("relu", None),
    ],
)
def test_l0_overrides_aim_each_architecture_at_the_l0(arch, target):
    """`l0_overrides` gives the key that sets each architecture's L0 (none for ReLU), and the
    result composes (a key of another architecture would be refused)."""
    cfg = compose_train_config([f"sae={arch}", *l0_overrides(arch, 24)])
    if target is None:
        assert l0_overrides(arch, 24) == []
    else:
        assert getattr(cfg.sae, target[0]) == target[1]
    with pytest.raises(ConfigError, match="sae.architecture"):
        l0_overrides("gated", 24)


@pytest.mark.parametrize(
    "model, n_layers, d_model",
    [
        ("qwen3-1.7b", 28, 2048),
        ("qwen3-4b", 36, 2560),
        ("qwen3-8b", 36, 4096),
        ("smollm2-135m-instruct", 30, 576),
        ("tiny-qwen3", 4, 64),
    ],
)
def test_model_groups_carry_real_shapes(model, n_layers, d_model):
    cfg = compose_train_config([f"model={model}", "sites=all"])
    validate(cfg)
    assert (cfg.model.n_layers, cfg.model.d_model) == (n_layers, d_model)


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [(False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)],
)
def test_auto_dtype_follows_native_cpu_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("auto", "cpu") is expected
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if avx512_bf16 or amx else "no")
    assert resolve_mixed_precision("no", "cpu") == "no"


@pytest.mark.parametrize("native, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_dtype_loads_a_model(monkeypatch, native, expected):
    """Both outcomes of `auto` on every machine (the CPU's bf16 support is simulated)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = compose_train_config(["model=tiny-qwen3", "model.dtype=auto"]).model
    model, _ = load_model(cfg)
    assert {p.dtype for p in model.parameters()} == {expected}
