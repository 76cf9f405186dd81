"""End-to-end training on the tiny Qwen3 with the real offline chat data: the suite on disk,
its metadata, the W&B offline run, honest held-out metrics, and exact resume."""

import json
from pathlib import Path

import pytest
import torch

from sae_dist.checkpoint import load_suite_sae, read_suite_index
from sae_dist.data import TokenStream
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.models import load_model
from sae_dist.producer import ActivationProducer
from sae_dist.train import train
from tests.conftest import compose_train_config

TINY = ["model=tiny-qwen3", "sites.layers=[1,3]", "sites.sites=[resid,mlp]", "sae.expansion=4",
        "sae.k=8", "sae.dead_tokens=2048", "train.tokens=4096", "train.batch_size=256",
        "train.forward_batch_seqs=4", "train.buffer_batches=4", "train.eval_tokens=1000",
        "train.log_every=1", "data.context_size=64", "train.lr=0.001"]


def tiny_run(out_dir: Path, *extra: str):
    return compose_train_config(TINY + [f"out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_run(out, "logger=wandb", "logger.mode=offline")
    return cfg, train(cfg), out


def test_suite_on_disk(trained):
    cfg, results, out = trained
    index = read_suite_index(out / "suite")
    names = [e["hookpoint"] for e in index["saes"]]
    assert names == ["layers.1.resid", "layers.1.mlp", "layers.3.resid", "layers.3.mlp"]
    for name in names:
        sae, sae_cfg = load_suite_sae(out / "suite", name)
        meta = sae_cfg["metadata"]
        assert meta["hookpoint"] == name and meta["layer"] == int(name.split(".")[1])
        assert meta["site"] == name.split(".")[2]
        assert meta["training_tokens"] == 4096
        assert meta["fvu"] == pytest.approx(results[name]["fvu"])
        assert 0 < meta["fvu"] < 1 and 0 < meta["l0"] <= 8 and 0 <= meta["dead_frac"] <= 1
        assert (sae.d_in, sae.d_sae, sae_cfg["k"]) == (64, 256, 8)
    assert "| layers.3.mlp |" in (out / "report.md").read_text()


def test_wandb_offline_run_and_curve(trained):
    _, _, out = trained
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fvu = [r["layers.1.resid/fvu"] for r in rows if "layers.1.resid/fvu" in r]
    assert len(fvu) >= 5
    assert min(fvu[-3:]) < fvu[0]  # training reduces the reconstruction error
    assert all("tokens_per_s" in r and "layers.1.resid/outliers_dropped" in r for r in rows)
    assert (out / "fvu_curve.png").stat().st_size > 10_000


def test_reported_fvu_matches_an_independent_computation(trained):
    """Recompute held-out FVU/L0 with plain code from the saved SAE and fresh captures."""
    cfg, results, out = trained
    model, tokenizer = load_model(cfg.model)
    hp = Hookpoint(3, "resid")
    sae, _ = load_suite_sae(out / "suite", hp.name)
    stream = TokenStream(cfg.data, tokenizer, "eval", seed=cfg.train.seed)
    xs = []
    for batch in stream.batches(cfg.train.forward_batch_seqs):
        xs.append(capture(model, [hp], batch.input_ids)[hp][batch.train_mask])
        if sum(len(x) for x in xs) >= cfg.train.eval_tokens:
            break
    x = torch.cat(xs).double()
    with torch.no_grad():
        pre = (x - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        top = pre.topk(8, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        x_hat = z @ sae.W_dec.double() + sae.b_dec.double()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert results[hp.name]["tokens"] == len(x)
    assert results[hp.name]["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    assert results[hp.name]["l0"] == pytest.approx(float((z > 0).sum(1).double().mean()), rel=1e-6)


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    train(tiny_run(reference, "logger=none"))

    resumed = tmp_path / "killed"
    calls = {"n": 0}
    original = ActivationProducer.activations

    def dies_on_call_seven(self, batches):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batches)

    monkeypatch.setattr(ActivationProducer, "activations", dies_on_call_seven)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(resumed, "logger=none", "train.checkpoint_every=2"))
    assert (resumed / "checkpoint" / "run.pt").exists()
    assert not (resumed / "suite").exists()
    monkeypatch.setattr(ActivationProducer, "activations", original)
    train(tiny_run(resumed, "logger=none", "train.checkpoint_every=2"))
    for name in ["layers.1.resid", "layers.3.mlp"]:
        a, _ = load_suite_sae(reference / "suite", name)
        b, _ = load_suite_sae(resumed / "suite", name)
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_embedded_smollm2_trains_from_real_chats(tmp_path):
    """The demo's model and data path for real (GGUF dequantised and cached, ChatML template),
    on a tiny budget: every hookpoint gets its tokens and a held-out FVU below that of the mean."""
    cfg = compose_train_config([
        "experiment=demo", "logger=none", f"out_dir={tmp_path}", "sites.layers=[3]",
        "sae.expansion=2", "sae.k=16", "train.tokens=4096", "train.batch_size=512",
        "train.buffer_batches=4", "train.forward_batch_seqs=4", "train.eval_tokens=1000"])
    results = train(cfg)
    assert list(results) == ["layers.3.resid", "layers.3.mlp", "layers.3.attn"]
    for res in results.values():
        assert 0 < res["fvu"] < 1 and res["l0"] <= 16 and res["tokens"] >= 1000
    meta = load_suite_sae(tmp_path / "suite", "layers.3.attn")[1]["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_attn_out"
    assert meta["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_eval_tokens_0_saves_the_suite_unevaluated(tmp_path):
    train(tiny_run(tmp_path, "logger=none", "train.eval_tokens=0", "train.tokens=1024"))
    index = read_suite_index(tmp_path / "suite")
    assert index["evaluated"] is False and len(index["saes"]) == 4
    sae, cfg = load_suite_sae(tmp_path / "suite", "layers.1.resid")
    assert cfg["metadata"]["training_tokens"] == 1024 and "fvu" not in cfg["metadata"]
    assert cfg["metadata"]["input_scale"] > 0
    assert not (tmp_path / "eval").exists()
