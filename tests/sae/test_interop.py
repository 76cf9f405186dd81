"""Interoperability: every architecture exports in the SAELens v6 layout and reloads
identically; SAELens-format SAEs written by other tools (b_dec not applied to the input, half
precision) and EleutherAI sparsify SAEs import with their reference outputs; the real `sae-lens`
package loads our exports (in this interpreter, or in the one of $SAE_LENS_PYTHON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_dist.checkpoint import load_sae, save_sae
from sae_dist.config import sae_config
from sae_dist.sae import (
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    TopKSAE,
    build_sae,
    load_sparsify,
    sae_from_saelens,
    sae_from_sparsify,
)

ARCHS = ["topk", "batchtopk", "jumprelu", "relu"]
LOADED_AS = {"topk": TopKSAE, "batchtopk": JumpReLUSAE, "jumprelu": JumpReLUSAE, "relu": ReLUSAE}
SAELENS_NAME = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}
METADATA = {
    "model_name": "m",
    "hook_name": "blocks.1.hook_resid_post",
    "hookpoint": "layers.1.resid",
    "context_size": 8,
    "dataset_path": "d",
    "prepend_bos": True,
    "exclude_special_tokens": True,
}


def trained_like(arch: str, d_in: int = 16, d_sae: int = 64, k: int = 4) -> torch.nn.Module:
    """An SAE of `arch` with perturbed weights, varied thresholds, in eval mode."""
    torch.manual_seed(0)
    sae = build_sae(sae_config(arch, d_sae=d_sae, **({"k": k} if "topk" in arch else {})), d_in)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.3)
    return sae.eval()


def reference_saelens(
    tensors: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens v6 inference (its documented semantics) -> (latents [B, d_sae], x_hat [B, d_in]):
    pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc; standard: relu(pre);
    topk: relu of the top k, zeros elsewhere; jumprelu: relu(pre) * (pre > threshold);
    x_hat = z @ W_dec + b_dec. Computed in float64."""
    t = {name: v.double() for name, v in tensors.items()}
    x = x.double()
    sae_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        z = pre.relu()
    elif cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    else:
        z = pre.relu() * (pre > t["threshold"])
    return z, z @ t["W_dec"] + t["b_dec"]


def encode_decode(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        latents = sae.encode(x)
        return latents.dense(), sae.decode(latents)


# --- export and reload ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_export_reloads_identically(arch, tmp_path):
    sae = trained_like(arch)
    save_sae(sae, tmp_path / arch, METADATA)
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / arch / "sae_weights.safetensors"))
    assert cfg["architecture"] == SAELENS_NAME[arch]
    assert ("k" in cfg) == (arch == "topk")
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if SAELENS_NAME[arch] == "jumprelu" else set()
    )
    assert all(t.dtype == torch.float32 for t in tensors.values())

    loaded, _ = load_sae(tmp_path / arch)
    assert type(loaded) is LOADED_AS[arch]
    for name, t in loaded.saelens_tensors().items():
        assert torch.equal(t, tensors[name]), name  # a second export is bit-identical
    x = torch.randn(200, 16)
    z, x_hat = encode_decode(loaded, x)
    reference = sae.to_jumprelu() if arch == "batchtopk" else sae
    z_ref, x_hat_ref = encode_decode(reference, x)
    assert torch.equal(z, z_ref) and torch.equal(x_hat, x_hat_ref)
    if arch == "batchtopk":  # the training class in eval mode is that JumpReLU
        z_btk, x_hat_btk = encode_decode(sae, x)
        assert torch.equal(z_btk, z)
        torch.testing.assert_close(x_hat_btk, x_hat, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_follows_saelens_semantics(arch):
    """Our encode/decode of every export equals SAELens's documented computation."""
    sae = trained_like(arch)
    tensors, cfg = sae.saelens_tensors(), sae.saelens_cfg()
    x = torch.randn(300, 16)
    z_ref, x_hat_ref = reference_saelens(tensors, cfg, x)
    z, x_hat = encode_decode(sae, x)
    assert ((z > 0) == (z_ref > 0)).all()
    assert 0 < (z > 0).sum(1).float().mean() < 64
    torch.testing.assert_close(z.double(), z_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=0, atol=1e-5)


def test_jumprelu_threshold_round_trips_bit_exactly():
    """log_threshold is float64, so threshold -> log -> exp gives the same float32 values."""
    sae = JumpReLUSAE(sae_config(architecture="jumprelu", d_sae=4096), 8)
    threshold = torch.rand(4096) * 10 ** torch.empty(4096).uniform_(-4, 2)
    tensors = sae.saelens_tensors() | {"threshold": threshold}
    sae.load_saelens_tensors(tensors)
    assert sae.log_threshold.dtype == torch.float64
    assert torch.equal(sae.saelens_tensors()["threshold"], threshold)


# --- foreign SAELens files -----------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_saelens_written_by_other_tools(architecture, dtype, tmp_path):
    """Gemma Scope style: apply_b_dec_to_input false, normalize_activations null, other dtypes,
    extra cfg keys; read through checkpoint.load_sae like our own folders."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_sae = 24, 96
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
        "b_enc": 0.1 * torch.randn(d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, d_in, generator=gen) / d_in**0.5,
        "b_dec": torch.randn(d_in, generator=gen),
    }
    cfg = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(dtype),
        "apply_b_dec_to_input": False,
        "normalize_activations": None,
        "reshape_activations": "none",
        "device": "cpu",
        "metadata": {"hook_name": "h"},
    }
    if architecture == "topk":
        cfg["k"] = 7
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae, generator=gen) * 0.8
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))

    sae, _ = load_sae(tmp_path)
    x = torch.randn(300, d_in, generator=gen) * 2
    z_ref, x_hat_ref = reference_saelens(tensors, cfg, x)
    z, x_hat = encode_decode(sae, x)
    assert ((z > 0) == (z_ref > 0)).float().mean() > 0.9999  # only exact ties may differ
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=0, atol=1e-4)
    assert 0 < (z_ref > 0).sum(1).float().mean() < d_sae


def test_saelens_dispatch_and_errors():
    sae = trained_like("relu")
    assert type(sae_from_saelens(sae.saelens_tensors(), sae.saelens_cfg())) is ReLUSAE
    bad = sae.saelens_cfg() | {"reshape_activations": "hook_z"}
    with pytest.raises(ValueError, match="reshape_activations"):
        sae_from_saelens(sae.saelens_tensors(), bad)
    with pytest.raises(ValueError, match="do not match"):
        sae_from_saelens(sae.saelens_tensors() | {"extra": torch.zeros(1)}, sae.saelens_cfg())


# --- sparsify ------------------------------------------------------------------------------


def sparsify_files(
    folder, gen: torch.Generator, d_in: int = 20, n_latents: int = 80, k: int = 6, **cfg_extra
) -> tuple[dict[str, torch.Tensor], dict]:
    """A sparsify SAE folder as `SparseCoder.save_to_disk` writes it."""
    tensors = {
        "encoder.weight": torch.randn(n_latents, d_in, generator=gen) / d_in**0.5,
        "encoder.bias": 0.1 * torch.randn(n_latents, generator=gen),
        "W_dec": torch.randn(n_latents, d_in, generator=gen) / d_in**0.5,
        "b_dec": torch.randn(d_in, generator=gen),
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": n_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
        **cfg_extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    return tensors, cfg


def reference_sparsify(
    t: dict[str, torch.Tensor], k: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder: pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias),
    top k of pre, x_hat = sum top_acts * W_dec[top_indices] + b_dec (float64)."""
    t = {name: v.double() for name, v in t.items()}
    pre = torch.relu((x.double() - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = pre.topk(k, dim=1)
    x_hat = (top.values[..., None] * t["W_dec"][top.indices]).sum(1) + t["b_dec"]
    return top.values, top.indices, x_hat


def test_import_sparsify_reproduces_its_outputs(tmp_path):
    gen = torch.Generator().manual_seed(5)
    tensors, cfg = sparsify_files(tmp_path / "layers.3", gen)
    sae, read_cfg = load_sparsify(tmp_path / "layers.3")
    assert type(sae) is TopKSAE and (sae.d_in, sae.d_sae, sae.k) == (20, 80, 6)
    assert read_cfg == cfg
    x = torch.randn(500, 20, generator=gen) * 1.5
    values, indices, x_hat_ref = reference_sparsify(tensors, 6, x)
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    order = latents.values.argsort(dim=1, descending=True)
    torch.testing.assert_close(latents.values.gather(1, order).double(), values, rtol=0, atol=1e-5)
    assert torch.equal(latents.indices.gather(1, order)[values > 0], indices[values > 0])
    torch.testing.assert_close(x_hat.double(), x_hat_ref, rtol=0, atol=1e-5)


def test_sparsify_import_then_export_to_saelens(tmp_path):
    """An imported sparsify SAE is saved in our SAELens layout and reloads identically."""
    tensors, cfg = sparsify_files(tmp_path / "sp", torch.Generator().manual_seed(6))
    sae = sae_from_sparsify(tensors, cfg)
    save_sae(sae, tmp_path / "ours", METADATA)
    loaded, saved_cfg = load_sae(tmp_path / "ours")
    assert saved_cfg["architecture"] == "topk" and saved_cfg["k"] == 6
    assert torch.equal(loaded.W_enc, tensors["encoder.weight"].T)
    x = torch.randn(50, 20)
    assert torch.equal(encode_decode(loaded, x)[1], encode_decode(sae, x)[1])


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"transcode": True}, "transcoder"),
        ({"skip_connection": True}, "skip"),
        ({"activation": "groupmax"}, "groupmax"),
    ],
)
def test_sparsify_unsupported_variants_fail_clearly(extra, match, tmp_path):
    tensors, cfg = sparsify_files(tmp_path, torch.Generator().manual_seed(7), **extra)
    with pytest.raises(ValueError, match=match):
        sae_from_sparsify(tensors, cfg)


# --- the real sae-lens package ---------------------------------------------------------------

SAE_LENS_CHECK = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE
    folder = sys.argv[1]
    x = load_file(folder + "/x.safetensors")["x"]
    out = {}
    for arch in sys.argv[2:]:
        sae = SAE.load_from_disk(folder + "/" + arch)
        with torch.no_grad():
            z = sae.encode(x)
            out[arch + ".z"], out[arch + ".x_hat"] = z, sae.decode(z)
            out[arch + ".forward"] = sae(x)
    save_file({k: v.contiguous() for k, v in out.items()}, folder + "/sae_lens_out.safetensors")
""")


def export_all(folder) -> torch.Tensor:
    """Every architecture exported under folder/<arch>; returns the input x [300, 16]."""
    for arch in ARCHS:
        save_sae(trained_like(arch), folder / arch, METADATA)
    x = torch.randn(300, 16)
    save_file({"x": x}, str(folder / "x.safetensors"))
    return x


def check_sae_lens_outputs(folder, x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """sae-lens's latents equal ours; its reconstructions (plain forward too) within 1e-5."""
    for arch in ARCHS:
        z, x_hat = encode_decode(trained_like(arch), x)
        torch.testing.assert_close(out[f"{arch}.z"], z, rtol=0, atol=1e-6)
        torch.testing.assert_close(out[f"{arch}.x_hat"], x_hat, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[f"{arch}.forward"], x_hat, rtol=0, atol=1e-5)


def test_sae_lens_loads_our_exports(tmp_path):
    """The real sae-lens (dev extra) loads every export and computes what we compute. It runs
    in $SAE_LENS_PYTHON when set (an interpreter with sae-lens installed), else in this one."""
    python = os.environ.get("SAE_LENS_PYTHON", sys.executable)
    x = export_all(tmp_path)
    result = subprocess.run(
        [python, "-c", SAE_LENS_CHECK, str(tmp_path), *ARCHS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"sae-lens in {python} failed (installed by `pip install -e '.[dev]'`):\n{result.stderr}"
    )
    check_sae_lens_outputs(tmp_path, x, load_file(str(tmp_path / "sae_lens_out.safetensors")))
