"""The token policy's outlier filter, and its acceptance test: the producer and the evaluation
keep the same positions of the same batches (DESIGN.md section 5)."""

import torch

from sae_dist.evaluate.evaluator import evaluate_saes
from sae_dist.hookpoints import Hookpoint
from sae_dist.policy import OutlierFilter, PositionFilter
from sae_dist.producer import ActivationProducer
from tests.conftest import SINK_POSITION, random_token_batches, sink_tiny_model

CPU = torch.device("cpu")


def test_outliers_and_nonfinite_are_dropped_and_counted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g)
    x[[3, 500]] *= 1000.0  # attention-sink-like tokens
    x[7, 2] = float("nan")
    x[8, 0] = float("inf")
    filt = OutlierFilter(factor=50.0)
    kept = filt(x)
    assert kept.shape == (996, 16)
    assert filt.dropped_outliers == 2 and filt.dropped_nonfinite == 2
    assert torch.isfinite(kept).all() and kept.norm(dim=1).max() < 50 * 4
    # the running median persists: a later batch of only huge tokens is dropped entirely
    assert filt(torch.randn(10, 16, generator=g) * 1000).shape[0] == 0
    assert filt.dropped_outliers == 12


def test_without_a_factor_only_nonfinite_rows_are_left_out():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    x[0] *= 1e6
    x[1, 3] = float("nan")
    filt = OutlierFilter(factor=None)
    assert filt.keep(x).tolist() == [True] + [False] + [True] * 98
    assert filt.dropped_outliers == 0 and filt.dropped_nonfinite == 1


def test_a_position_left_out_at_one_hookpoint_is_left_out_at_all():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[10] *= 100.0
    policy = PositionFilter(["a", "b"], 10.0)
    keep = policy.keep({"a": x, "b": y})
    assert keep.tolist() == [i != 10 for i in range(50)]
    assert policy.dropped("outliers") == {"a": 0, "b": 1}
    mask = torch.zeros(5, 20, dtype=torch.bool)
    mask[:, 3:13] = True
    acts = {
        Hookpoint(0, "resid"): torch.zeros(5, 20, 8).masked_scatter(mask[..., None], x),
        Hookpoint(1, "resid"): torch.zeros(5, 20, 8).masked_scatter(mask[..., None], y),
    }
    got = PositionFilter(["layers.0.resid", "layers.1.resid"], 10.0).keep_positions(acts, mask)
    want = mask.clone()
    want[1, 3] = False  # the 11th position of the mask, row-major
    assert torch.equal(got, want)


def test_producer_and_evaluation_keep_the_same_positions(tiny_cfg):
    """The acceptance test of the one token policy: on the same batches the evaluation
    reconstructs exactly the activations the producer hands to training (the sink position
    left out at every hookpoint, also at layer 0 where it is not an outlier), and counts the
    positions it left out."""
    model = sink_tiny_model(tiny_cfg)
    hps = [Hookpoint(0, "attn"), Hookpoint(1, "mlp"), Hookpoint(3, "resid")]
    batches = random_token_batches(3, 4, 24, drop=0.2, seed=3)
    for batch in batches:
        batch.train_mask[:2, SINK_POSITION] = True
    producer = ActivationProducer(model, hps, 10.0, CPU, streams={}, seqs_per_shard=4)
    producer.filters = {0: PositionFilter([hp.name for hp in hps], 10.0)}
    produced = [producer.activations({0: b})[0] for b in batches]
    seen: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in hps}

    def recorder(name):
        def fn(x):
            seen[name].append(x.clone())
            return x

        return fn

    res = evaluate_saes(
        model, {hp: recorder(hp.name) for hp in hps}, batches, CPU, outlier_factor=10.0
    )
    n_sinks = sum(int(b.train_mask[:, SINK_POSITION].sum()) for b in batches)
    n_mask = sum(int(b.train_mask.sum()) for b in batches)
    for hp in hps:
        want = torch.cat([p[hp.name] for p in produced])
        torch.testing.assert_close(torch.cat(seen[hp.name]), want, atol=0, rtol=0)
        assert res[hp.name]["tokens"] == len(want) == n_mask - n_sinks
        assert res[hp.name]["excluded"] == n_sinks >= 6
    assert producer.dropped()["outliers"]["layers.0.attn"] == 0
    assert producer.dropped()["outliers"]["layers.1.mlp"] == n_sinks
