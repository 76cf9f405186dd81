"""SAELens-layout save/load: bit-identical reloads, suite index, clear errors for bad folders,
atomic replacement."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_dist.checkpoint import (
    CheckpointError,
    load_sae,
    load_suite_sae,
    read_suite_index,
    save_sae,
    write_atomically,
    write_suite_index,
)
from sae_dist.config import sae_config
from sae_dist.sae import build_sae


@pytest.fixture
def sae():
    torch.manual_seed(0)
    sae = build_sae(sae_config(expansion=4, k=8), d_in=32)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return sae


def test_saved_sae_reloads_bit_identically(sae, tmp_path):
    save_sae(sae, tmp_path / "layers.3.resid", {"hookpoint": "layers.3.resid", "fvu": 0.25})
    files = sorted(p.name for p in (tmp_path / "layers.3.resid").iterdir())
    assert files == ["cfg.json", "sae_weights.safetensors"]
    tensors = load_file(str(tmp_path / "layers.3.resid" / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (32, 128) and tensors["W_dec"].shape == (128, 32)
    assert tensors["b_enc"].shape == (128,) and tensors["b_dec"].shape == (32,)
    cfg = json.loads((tmp_path / "layers.3.resid" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 8
    assert (cfg["d_in"], cfg["d_sae"]) == (32, 128)
    assert cfg["metadata"]["sae_lens_version"] >= "6" and cfg["metadata"]["fvu"] == 0.25
    loaded, _ = load_sae(tmp_path / "layers.3.resid")
    for name, p in sae.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    x = torch.randn(50, 32)
    assert torch.equal(sae.decode(sae.encode(x)), loaded.decode(loaded.encode(x)))


def test_suite_index_and_lookup(sae, tmp_path):
    save_sae(sae, tmp_path / "layers.0.mlp", {"hookpoint": "layers.0.mlp"})
    write_suite_index(
        tmp_path, [{"hookpoint": "layers.0.mlp", "path": "layers.0.mlp"}], {"model": "m"}
    )
    assert read_suite_index(tmp_path)["model"] == "m"
    loaded, cfg = load_suite_sae(tmp_path, "layers.0.mlp")
    assert cfg["metadata"]["hookpoint"] == "layers.0.mlp"
    with pytest.raises(KeyError, match="layers.0.attn.*layers.0.mlp"):
        load_suite_sae(tmp_path, "layers.0.attn")


def test_bad_folders_fail_clearly(sae, tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_sae(tmp_path / "nothing")
    save_sae(sae, tmp_path / "s", {})
    weights = tmp_path / "s" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_sae(tmp_path / "s")
    save_sae(sae, tmp_path / "t", {})
    (tmp_path / "t" / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_sae(tmp_path / "t")


def test_failed_write_keeps_previous_folder(tmp_path):
    write_atomically(tmp_path / "ckpt", lambda d: (d / "a.txt").write_text("first"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomically(tmp_path / "ckpt", crash)
    assert (tmp_path / "ckpt" / "a.txt").read_text() == "first"
    write_atomically(tmp_path / "ckpt", lambda d: (d / "a.txt").write_text("second"))
    assert (tmp_path / "ckpt" / "a.txt").read_text() == "second"
