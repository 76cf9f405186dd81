"""SAE architectures: sparse kernels against dense autograd, training on a known dictionary,
weight folding, the SAELens layout, decoder constraints and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sae_dist.config import ConfigError, sae_config
from sae_dist.sae import SAE_REGISTRY, Latents, TopKSAE, build_sae, sae_from_saelens
from sae_dist.sae.sparse_ops import (
    Entries,
    GatheredPreActs,
    SparseDecode,
    pad_rows,
    scatter_outer,
)


def make_topk(
    d_in: int = 16,
    d_sae: int = 96,
    k: int = 5,
    k_aux: int | None = 7,
    sparse: bool = True,
    seed: int = 0,
) -> TopKSAE:
    """Float64 TopK SAE with non-zero biases, so every gradient path is exercised."""
    torch.manual_seed(seed)
    sae = TopKSAE(sae_config(d_sae=d_sae, k=k, k_aux=k_aux), d_in, sparse=sparse).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def step_grads(sae: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor | None):
    """Forward + backward of the summed losses -> (output, {param name: grad})."""
    sae.zero_grad()
    out = sae(x, dead_mask)
    sum(out.losses.values()).backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


# --- 1. sparse kernels == dense autograd ---------------------------------------------------


@pytest.mark.parametrize("n_dead", [0, 3, 40])  # none dead; fewer than k_aux; more than k_aux
def test_sparse_path_matches_dense(n_dead: int):
    sparse = make_topk()
    dense = make_topk(sparse=False)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(64, 16, dtype=torch.float64) * 2 + 0.3
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96)[:n_dead]] = True

    out_s, grads_s = step_grads(sparse, x, dead)
    out_d, grads_d = step_grads(dense, x, dead)

    assert set(out_s.losses) == ({"fvu", "auxk"} if n_dead else {"fvu"})
    assert set(out_s.losses) == set(out_d.losses)
    for name in out_s.losses:
        torch.testing.assert_close(out_s.losses[name], out_d.losses[name], rtol=0, atol=1e-12)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=0, atol=1e-12)
    assert torch.equal(out_s.latents.indices, out_d.latents.indices)
    for name, grad in grads_s.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads_d[name], rtol=0, atol=1e-10, msg=name)


def test_auxk_definition():
    """AuxK = coef * min(n_dead/k_aux, 1) * ||e_hat - e||^2 / ||e - mean(e)||^2, where e_hat
    decodes (without b_dec) the top k_aux dead latents and e = x - x_hat."""
    sae = make_topk(k_aux=7)
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:4] = True  # fewer dead than k_aux: scale 4/7, all 4 used
    out = sae(x, dead)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = torch.relu(pre) * dead  # top 4 of 4 dead latents = all dead latents
        e = x - out.x_hat
        expected = (z @ sae.W_dec - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.losses["auxk"], sae.cfg.auxk_coef * 4 / 7 * expected)


def test_encode_is_relu_of_topk_preactivations():
    sae = make_topk()
    x = torch.randn(20, 16, dtype=torch.float64)
    latents = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(5, dim=1)
    order = latents.values.argsort(dim=1, descending=True)
    assert torch.equal(latents.indices.gather(1, order), top.indices)
    torch.testing.assert_close(latents.values.gather(1, order), torch.relu(top.values))
    torch.testing.assert_close(sae.decode(latents), latents.dense() @ sae.W_dec + sae.b_dec)


def test_gathered_pre_acts_gradcheck():
    """The custom backward is the true derivative, including w.r.t. the input x."""
    sae = make_topk(d_in=6, d_sae=20, k=3)
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    idx = sae.pre_acts(x).detach().topk(3, dim=1).indices

    def values(x_, w, b_enc, b_dec):
        pre_top = ((x_ - b_dec) @ w + b_enc).detach().gather(1, idx)
        return GatheredPreActs.apply(x_, w, b_enc, b_dec, pre_top, Entries.of(idx))

    assert torch.autograd.gradcheck(values, (x, sae.W_enc, sae.b_enc, sae.b_dec))


def test_sparse_decode_gradcheck_and_embedding_bag():
    """SparseDecode's backward (sampled matmul, scatter_outer) is the true derivative in the
    values and the table, padding entries and a token without entries included, and its
    forward and gradients equal those of embedding_bag's own."""
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(11)[:3] for _ in range(7)])
    live = torch.rand(7, 3) > 0.3
    live[2] = False
    for entries in (Entries.of(idx), Entries.of(idx, live)):
        values = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
        table = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda v, t, e=entries: SparseDecode.apply(e.take(v), t, e), (values, table)
        )
        grad_out = torch.randn(7, 5, dtype=torch.float64)
        ours = torch.autograd.grad(entries.bag_sum(values, table), (values, table), grad_out)
        bag = F.embedding_bag(
            entries.latent,
            table,
            entries.offsets,
            mode="sum",
            per_sample_weights=entries.take(values),
        )
        theirs = torch.autograd.grad(bag, (values, table), grad_out)
        torch.testing.assert_close(entries.bag_sum(values, table), bag, rtol=0, atol=0)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_scatter_outer_matches_dense():
    idx = torch.tensor([[0, 3], [3, 1], [2, 0]])
    coeffs = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]])
    rows = torch.randn(3, 4)
    s = torch.zeros(3, 5).scatter_(1, idx, coeffs)  # [B, d_sae]
    got = scatter_outer(Entries.of(idx), coeffs.reshape(-1), rows, 5)
    torch.testing.assert_close(got, s.t() @ rows)
    live = torch.tensor([[True, False], [True, True], [False, True]])  # skips the others
    got = scatter_outer(Entries.of(idx, live), coeffs[live], rows, 5)
    s_live = torch.zeros(3, 5).scatter_(1, idx, coeffs * live)
    torch.testing.assert_close(got, s_live.t() @ rows)


def test_pad_rows_lays_ragged_entries_out_per_row():
    rows, cols = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([4, 1, 0, 3, 2])
    indices, values, live = pad_rows(rows, cols, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 3, -1.0)
    assert torch.equal(indices, torch.tensor([[4, 1, 0], [0, 0, 0], [0, 3, 2]]))
    assert torch.equal(live, torch.tensor([[True, True, False], [False] * 3, [True] * 3]))
    assert torch.equal(
        values, torch.tensor([[1.0, 2.0, -1.0], [-1.0, -1.0, -1.0], [3.0, 4.0, 5.0]])
    )


def test_bf16_autocast_close_to_float32():
    """Under CPU bf16 autocast the encoder matmul runs in bf16; gradients stay float32."""
    torch.manual_seed(0)
    sae = TopKSAE(sae_config(d_sae=512, k=16), 64)
    x = torch.randn(256, 64)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::4] = True
    out32, grads32 = step_grads(sae, x, dead)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, grads16 = step_grads(sae, x, dead)
    assert out16.x_hat.dtype == torch.float32
    torch.testing.assert_close(out16.losses["fvu"], out32.losses["fvu"], rtol=2e-2, atol=0)
    for name, grad in grads16.items():
        assert grad.dtype == torch.float32
        assert F.cosine_similarity(grad.flatten(), grads32[name].flatten(), dim=0) > 0.95, name


# --- 2. training recovers a known dictionary ----------------------------------------------


def sample_tokens(
    dictionary: torch.Tensor, n: int, n_active: int, gen: torch.Generator
) -> torch.Tensor:
    """n tokens [n, d], each a positive combination of n_active dictionary rows plus noise."""
    n_true, d = dictionary.shape
    idx = torch.rand(n, n_true, generator=gen).topk(n_active, dim=1).indices
    coeffs = torch.rand(n, n_active, generator=gen) + 0.5
    x = F.embedding_bag(idx, dictionary, per_sample_weights=coeffs, mode="sum")
    return x + 0.01 * torch.randn(n, d, generator=gen)


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: the tiny ops of the toy training are no slower on one, and
    two threads become ~50x slower when other processes compete for the cores."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.mark.slow
def test_topk_recovers_synthetic_dictionary(one_thread):
    """256 unit directions in d_in=128, 8 active per token; a 512-latent TopK SAE (k=8) trained
    with Adam, unit-norm decoder, parallel-grad removal and AuxK on dead latents.
    (At d_in=64 the encoder's interference between 8+ active directions floors FVU near 0.18.)
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    d_in, n_true, n_active, batch, dead_after = 128, 256, 8, 256, 20_000
    dictionary = F.normalize(torch.randn(n_true, d_in, generator=gen), dim=1)
    sae = build_sae(sae_config(d_sae=512, k=n_active), d_in)
    sae.init_from_batch(sample_tokens(dictionary, 4096, n_active, gen))
    sae.project_decoder_grads()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    for _ in range(2000):
        out = sae(sample_tokens(dictionary, batch, n_active, gen), since_fired > dead_after)
        opt.zero_grad()
        sum(out.losses.values()).backward()
        opt.step()
        sae.normalize_decoder()
        since_fired += batch
        since_fired[out.latents.fire_counts() > 0] = 0

    with torch.no_grad():
        out = sae(sample_tokens(dictionary, 8192, n_active, gen))
        best_cos = (dictionary @ sae.W_dec.t()).max(dim=1).values
    assert out.losses["fvu"] < 0.1
    assert (best_cos > 0.9).float().mean() >= 0.8
    assert out.latents.l0().mean() == n_active


# --- 3-4. folding and the SAELens layout ---------------------------------------------------


def test_folded_takes_raw_activations():
    sae = make_topk()
    scale = 3.7
    x = torch.randn(30, 16, dtype=torch.float64)
    folded = sae.folded(scale)
    ref_latents, fold_latents = sae.encode(x * scale), folded.encode(x)
    assert torch.equal(fold_latents.indices, ref_latents.indices)
    torch.testing.assert_close(fold_latents.values, ref_latents.values / scale)  # raw units
    torch.testing.assert_close(folded(x).x_hat, sae(x * scale).x_hat / scale)
    torch.testing.assert_close(folded.W_dec.norm(dim=1), sae.W_dec.norm(dim=1))  # unit rows
    torch.testing.assert_close(sae.b_dec / scale, folded.b_dec)  # the original is untouched


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "relu"])
def test_folding_keeps_which_latents_fire_and_scales_thresholds(arch):
    torch.manual_seed(0)
    sae = build_sae(
        sae_config(arch, d_sae=64, **({"k": 4} if arch == "batchtopk" else {})), 16
    ).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if arch == "batchtopk":
        sae.threshold.fill_(0.3)
    x, scale = torch.randn(50, 16), 2.5
    folded = sae.folded(scale)
    with torch.no_grad():
        ref, got = sae.encode(x * scale).dense(), folded.encode(x).dense()
        assert (ref > 0).any() and torch.equal(ref > 0, got > 0)
        torch.testing.assert_close(got, ref / scale)
        torch.testing.assert_close(folded(x).x_hat, sae(x * scale).x_hat / scale)


def test_saelens_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    sae = build_sae(sae_config(expansion=4, k=6), 24)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    tensors, cfg = sae.saelens_tensors(), sae.saelens_cfg()
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "W_enc": (24, 96),
        "b_enc": (96,),
        "W_dec": (96, 24),
        "b_dec": (24,),
    }
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    assert cfg == {
        "architecture": "topk",
        "d_in": 24,
        "d_sae": 96,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "k": 6,
    }

    save_file(tensors, tmp_path / "sae_weights.safetensors")
    loaded = sae_from_saelens(load_file(tmp_path / "sae_weights.safetensors"), cfg)
    assert type(loaded) is TopKSAE and loaded.k == 6
    for name, p in sae.named_parameters():
        assert torch.equal(getattr(loaded, name), p), name
    x = torch.randn(10, 24)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


def test_saelens_tensors_are_copies():
    sae = make_topk()
    tensors = sae.saelens_tensors()
    with torch.no_grad():
        sae.W_dec.zero_()
    assert tensors["W_dec"].abs().sum() > 0


# --- 5. decoder constraints and initialisation ---------------------------------------------


def test_build_sae_initialisation():
    torch.manual_seed(0)
    sae = build_sae(sae_config(expansion=8, k=4), 16)
    assert SAE_REGISTRY["topk"] is TopKSAE and sae.architecture == "topk"
    assert (sae.d_in, sae.d_sae) == (16, 128)
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.k_aux == 8  # d_in // 2


def test_normalize_decoder():
    sae = make_topk()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, dtype=torch.float64) * 5)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96, dtype=torch.float64))


def test_project_decoder_grads():
    sae = make_topk()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, dtype=torch.float64) + 0.5)  # not unit norm
    x = torch.randn(40, 16, dtype=torch.float64)
    sum(sae(x).losses.values()).backward()
    before = sae.W_dec.grad.clone()
    sae.zero_grad()
    sae.project_decoder_grads()
    sum(sae(x).losses.values()).backward()
    after = sae.W_dec.grad
    torch.testing.assert_close((after * sae.W_dec).sum(1), torch.zeros(96, dtype=torch.float64))
    # only the parallel component was removed: the change is along each row
    change = before - after
    torch.testing.assert_close(
        change,
        (change * sae.W_dec).sum(1, keepdim=True)
        * sae.W_dec
        / sae.W_dec.pow(2).sum(1, keepdim=True),
    )
    assert after.abs().max() > 0


def test_init_from_batch_is_robust_to_outliers():
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(8, generator=gen) * 3
    x = centre + 0.1 * torch.randn(1000, 8, generator=gen)
    x[:100] += 1000.0  # 10% far outliers move the mean by ~100
    sae = build_sae(sae_config(d_sae=16, k=2), 8)
    sae.init_from_batch(x)
    assert (sae.b_dec - centre).norm() < 0.05


# --- 6. errors and latent statistics -------------------------------------------------------


def test_k_larger_than_d_sae_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sae\.k=100 .*1\.\.64"):
        build_sae(sae_config(d_sae=64, k=100), 8)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"sae\.architecture='nope'.*topk"):
        build_sae(sae_config(architecture="nope"), 8)
    with pytest.raises(ConfigError, match="topk"):
        sae_from_saelens({}, {"architecture": "gated", "d_in": 8, "d_sae": 16})


def test_from_saelens_rejects_unfoldable_normalisation():
    sae = make_topk()
    cfg = sae.saelens_cfg() | {"normalize_activations": "expected_average_only_in"}
    with pytest.raises(ValueError, match="normalize_activations"):
        sae_from_saelens(sae.saelens_tensors(), cfg)


def test_latent_statistics_on_a_hand_made_case():
    sparse = Latents(
        values=torch.tensor([[2.0, 0.0, 1.0], [0.5, 3.0, 0.0]]),
        indices=torch.tensor([[4, 1, 0], [4, 2, 3]]),
        d_sae=6,
    )
    assert torch.equal(sparse.l0(), torch.tensor([2.0, 2.0]))
    assert torch.equal(sparse.fire_counts(), torch.tensor([1, 0, 1, 0, 2, 0]))
    dense = sparse.dense()
    assert torch.equal(dense, torch.tensor([[1.0, 0, 0, 0, 2, 0], [0, 0, 3, 0, 0.5, 0]]))
    as_dense = Latents(values=dense, indices=None, d_sae=6)
    assert torch.equal(as_dense.l0(), sparse.l0())
    assert torch.equal(as_dense.fire_counts(), sparse.fire_counts())
    assert as_dense.fire_counts().dtype == torch.int64
