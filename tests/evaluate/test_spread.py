"""Spread of held-out figures: per-document sums, the bootstrap over documents, regions."""

from __future__ import annotations

import math

import pytest
import torch

from sae_dist.evaluate.reconstruction import ReconstructionAccumulator
from sae_dist.evaluate.spread import (
    DocumentSums,
    bootstrap_intervals,
    region_slices,
    sum_by_document,
)


def accumulate(x, x_hat, docs, batch: int = 7) -> ReconstructionAccumulator:
    acc = ReconstructionAccumulator(x.shape[1])
    for i in range(0, len(x), batch):
        acc.update(x[i : i + batch], x_hat[i : i + batch], docs[i : i + batch])
    return acc


def test_sums_by_document_add_up_across_batches_to_the_accumulators_figures():
    """A document split over batches is one unit; equal weights give the accumulator's FVU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen) + 3
    x_hat = x + 0.3 * torch.randn(60, 5, generator=gen)
    docs = torch.arange(60) // 9 * 10  # 7 documents, ids 0, 10, ..., 60
    acc = accumulate(x, x_hat, docs)
    sums = DocumentSums.from_columns(acc.by_document())
    assert sums.ids.tolist() == list(range(0, 70, 10))
    assert sums.n.tolist() == [9.0] * 6 + [6.0]
    fvu = sums.metrics(torch.ones(1, 7, dtype=torch.float64))["fvu"]
    assert float(fvu) == pytest.approx(acc.result()["fvu"], rel=1e-12)
    ids, s = sum_by_document(torch.tensor([3, 1, 3]), torch.tensor([1.0, 2.0, 4.0]))
    assert ids.tolist() == [1, 3] and s.tolist() == [2.0, 5.0]


def test_bootstrap_interval_covers_the_truth_at_its_level_and_widens_with_spread():
    """Documents whose FVU differs by document: over 200 draws of 40 documents from the same
    population, the 90% interval holds the population FVU in 80-97% of draws (binomial
    spread around 90%); a population with 4x the between-document spread gets a wider one."""

    def draw(seed: int, spread: float) -> DocumentSums:
        gen = torch.Generator().manual_seed(seed)
        n_docs, per = 40, 20
        docs = torch.arange(n_docs).repeat_interleave(per)
        x = torch.randn(n_docs * per, 4, generator=gen)
        noise = 0.4 + spread * torch.rand(n_docs, generator=gen)  # per-document error scale
        x_hat = x + noise[docs, None] * torch.randn(n_docs * per, 4, generator=gen)
        return DocumentSums.from_columns(accumulate(x, x_hat, docs).by_document())

    # population FVU: E[noise^2] * 4 per position over E||x||^2 = 4 -> E[noise^2]
    truth = 0.4**2 + 0.4 * 0.6 + 0.6**2 / 3  # noise = 0.4 + 0.6 U
    hits = 0
    for seed in range(200):
        lo, hi = bootstrap_intervals(draw(seed, 0.6), 300, seed, level=0.9)["fvu_ci"]
        hits += lo <= truth <= hi
    assert 160 <= hits <= 194
    narrow = bootstrap_intervals(draw(0, 0.15), 300, 0)["fvu_ci"]
    wide = bootstrap_intervals(draw(0, 0.6), 300, 0)["fvu_ci"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    one = DocumentSums.from_columns(
        accumulate(
            torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
        ).by_document()
    )
    assert all(math.isnan(v) for v in bootstrap_intervals(one, 10, 0)["fvu_ci"])


def test_region_slices_split_documents_by_id_into_disjoint_runs():
    """Regions in document-id order: the first half of the ids reconstructs perfectly, the
    second not at all."""
    x = torch.randn(80, 3, generator=torch.Generator().manual_seed(1))
    docs = torch.arange(80) // 10  # 8 documents
    x_hat = torch.where(docs[:, None] < 4, x, torch.zeros_like(x))
    sums = DocumentSums.from_columns(accumulate(x, x_hat, docs).by_document())
    first, second = region_slices(sums, 2)
    assert (first["first_doc"], first["last_doc"], first["docs"], first["tokens"]) == (0, 3, 4, 40)
    assert (second["first_doc"], second["last_doc"]) == (4, 7)
    assert first["fvu"] == 0.0 and second["fvu"] > 0.9
    assert len(region_slices(sums, 3)) == 3
