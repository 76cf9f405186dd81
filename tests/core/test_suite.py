"""`load_suite`, the one way to open a saved suite: SAEs by hookpoint on the resolved device,
the model config the suite names, and clear errors for what does not fit."""

from dataclasses import asdict

import pytest
import torch

from sae_dist.checkpoint import CheckpointError
from sae_dist.config import ConfigError, DataConfig
from sae_dist.hookpoints import Hookpoint
from sae_dist.suite import load_suite, model_config_for
from tests.steer.test_steer import write_suite


def test_load_suite_opens_every_sae_with_the_model_it_names(tmp_path):
    suite = write_suite(tmp_path, {"layers.2.mlp": 64, "layers.1.resid": 64})
    opened = load_suite(suite, "cpu")
    assert opened.model.name == "tiny-qwen3" and opened.device == torch.device("cpu")
    assert opened.hookpoints == [Hookpoint(1, "resid"), Hookpoint(2, "mlp")]
    assert set(opened.folders) == {"layers.1.resid", "layers.2.mlp"}
    assert opened.folders["layers.2.mlp"] == suite / "layers.2.mlp"
    assert opened.sae_configs["layers.1.resid"]["d_in"] == 64
    assert all(not sae.training for sae in opened.saes.values())
    assert opened.token_policy is None and opened.train_config is None  # not recorded here
    only = load_suite(suite, "auto", hookpoints=["layers.2.mlp"])
    assert only.hookpoints == [Hookpoint(2, "mlp")]


def test_load_suite_refuses_what_does_not_fit(tmp_path):
    suite = write_suite(tmp_path, {"layers.1.resid": 64, "layers.2.mlp": 96})
    with pytest.raises(ConfigError, match=r"hookpoints='layers.3.resid'.*layers.1.resid"):
        load_suite(suite, "cpu", hookpoints=["layers.3.resid"])
    with pytest.raises(CheckpointError, match="d_in=96 but tiny-qwen3 has d_model=64"):
        load_suite(suite, "cpu", hookpoints=["layers.2.mlp"])
    with pytest.raises(ConfigError, match="device='tpu'"):
        load_suite(suite, "tpu", hookpoints=["layers.1.resid"])
    with pytest.raises(ConfigError, match="suite="):
        load_suite(tmp_path / "missing", "cpu")
    unnamed = write_suite(tmp_path / "u", {"layers.1.resid": 64}, model_name="")
    with pytest.raises(ConfigError, match="does not name its model"):
        load_suite(unnamed, "cpu")
    assert load_suite(unnamed, "cpu", model_config_for("tiny-qwen3")).hookpoints == [
        Hookpoint(1, "resid")
    ]


def test_held_out_data_follows_the_training_document_order(tmp_path):
    """Evaluating a suite on its training source reads it in the training's document order
    (otherwise the held-out split would hold trained-on documents); another source is kept."""
    suite = load_suite(write_suite(tmp_path, {"layers.1.resid": 64}), "cpu")
    trained = DataConfig(seed=3, reserved_frac=0.05, holdout_every=20)
    suite.train_config = {"data": asdict(trained)}
    got = suite.held_out_data(DataConfig(context_size=32))
    assert (got.seed, got.reserved_frac, got.holdout_every, got.shuffle) == (3, 0.05, 20, True)
    assert got.context_size == 32
    other = DataConfig(source=str(tmp_path / "mine.jsonl"))
    assert suite.held_out_data(other) == other
    suite.train_config = None
    assert suite.held_out_data(DataConfig()) == DataConfig()
