"""The producer's shuffle buffer and real forwards through it (its filter: test_policy.py)."""

import torch

from sae_dist.data import TokenBatch
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.policy import PositionFilter
from sae_dist.producer import ActivationProducer, ShuffleBuffer
from tests.conftest import one_document_per_row


def test_shuffle_buffer_hands_out_every_row_once_shuffled():
    buf = ShuffleBuffer(capacity=64, batch_size=8, generator=torch.Generator().manual_seed(0))
    out = []
    for start in range(0, 400, 20):
        rows = torch.arange(start, start + 20, dtype=torch.float32)[:, None]
        buf.push(rows)
        while buf.available():
            batch = buf.pop()
            assert batch.shape == (8, 1)
            out.append(batch)
    got = torch.cat(out).flatten()
    assert got.unique().numel() == got.numel()  # no row twice
    assert got.numel() + buf.size == 400  # nothing lost
    assert buf.size < 64
    assert not torch.equal(got, got.sort().values)  # shuffled
    # consecutive rows end up far apart on average
    assert (got[1:] - got[:-1]).abs().float().mean() > 10


def test_producer_masks_and_counts(tiny_model):
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 5:] = False
    hps = [Hookpoint(0, "resid"), Hookpoint(2, "attn")]
    producer = ActivationProducer(
        tiny_model,
        hps,
        outlier_factor=1e6,
        device=torch.device("cpu"),
        streams={},
        seqs_per_shard=1,
    )
    producer.filters = {v: PositionFilter([hp.name for hp in hps], 1e6) for v in (3, 5)}
    # shards 3 and 5 each bring one row; one forward serves both, each gets its own rows
    docs = one_document_per_row(ids)
    out = producer.activations(
        {3: TokenBatch(ids[:1], mask[:1], docs[:1]), 5: TokenBatch(ids[1:], mask[1:], docs[1:])}
    )
    ref = capture(tiny_model, hps, ids)
    for hp in hps:
        torch.testing.assert_close(out[3][hp.name], ref[hp][:1][mask[:1]])
        torch.testing.assert_close(out[5][hp.name], ref[hp][1:][mask[1:]])
    assert out[3][hps[0].name].shape[0] == 9 and out[5][hps[0].name].shape[0] == 4
    assert producer.stats.tokens == 20 and producer.stats.train_tokens == 13
    assert producer.stats.forward_passes == 1


def test_a_token_rejected_at_one_hookpoint_is_dropped_at_all(tiny_model):
    """Every SAE trains on the same tokens (lockstep buffers stay equal); each filter counts
    only what it rejected itself."""
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 12, dtype=torch.bool)
    hps = [Hookpoint(0, "resid"), Hookpoint(1, "mlp")]
    producer = ActivationProducer(
        tiny_model,
        hps,
        outlier_factor=1e6,
        device=torch.device("cpu"),
        streams={},
        seqs_per_shard=1,
    )
    producer.filters = {0: PositionFilter([hp.name for hp in hps], 1e6)}
    clean = capture(tiny_model, hps, ids)
    original = producer.model.model.layers[1].mlp.forward

    def nan_at_token_4(x):
        y = original(x)
        y[:, 4] = float("nan")
        return y

    producer.model.model.layers[1].mlp.forward = nan_at_token_4
    try:
        out = producer.activations({0: TokenBatch(ids, mask, one_document_per_row(ids))})
    finally:
        producer.model.model.layers[1].mlp.forward = original
    keep = torch.arange(12) != 4
    torch.testing.assert_close(out[0]["layers.0.resid"], clean[hps[0]][0][keep])
    assert out[0]["layers.1.mlp"].shape == (11, 64)
    assert producer.dropped()["nonfinite"] == {"layers.0.resid": 0, "layers.1.mlp": 1}
