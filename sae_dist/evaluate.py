"""Evaluation of SAEs on held-out tokens (DESIGN.md section 8).

Reconstruction metrics over the tokens that pass the train mask, accumulated in float64:
fvu = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, mse = mean_tokens ||x - x_hat||^2 / d_in,
cosine = mean_tokens cos(x, x_hat), l0 = mean_tokens #active latents, dead_frac = latents never
active, dense_frac = latents active on more than 10% of tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sae_dist.data import TokenStream
from sae_dist.hookpoints import Hookpoint, capture
from sae_dist.sae import SparseAutoencoder

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1
"""A latent active on more than this fraction of tokens counts as dense."""


@dataclass
class ReconstructionAccumulator:
    """Running float64 sums for one SAE; `update` per batch, `result` at the end."""

    d_in: int
    d_sae: int
    n: int = 0
    sum_sq_err: float = 0.0
    sum_sq_x: float = 0.0
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    sum_x: torch.Tensor = field(init=False)
    fire_counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fire_counts = torch.zeros(self.d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(self, sae: SparseAutoencoder, x: torch.Tensor) -> None:
        """x [n, d_in] raw activations of tokens that pass the train mask."""
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
        x64, x_hat64 = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_sq_err += float((x64 - x_hat64).pow(2).sum())
        self.sum_sq_x += float(x64.pow(2).sum())
        self.sum_x += x64.sum(0).cpu()
        self.sum_cos += float(nn.functional.cosine_similarity(x64, x_hat64, dim=1).sum())
        self.sum_l0 += float(latents.l0().double().sum())
        self.fire_counts += latents.fire_counts().cpu()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no evaluation tokens passed the mask")
        mean = self.sum_x / self.n
        total_var = self.sum_sq_x - self.n * float(mean.pow(2).sum())
        fvu = self.sum_sq_err / total_var
        freq = self.fire_counts.double() / self.n
        return {"fvu": fvu, "explained_variance": 1 - fvu,
                "mse": self.sum_sq_err / self.n / self.d_in, "cosine": self.sum_cos / self.n,
                "l0": self.sum_l0 / self.n, "dead_frac": float((self.fire_counts == 0).double().mean()),
                "dense_frac": float((freq > DENSE_THRESHOLD).double().mean()),
                "tokens": self.n}


def evaluate_reconstruction(model: nn.Module, saes: dict[Hookpoint, SparseAutoencoder],
                            stream: TokenStream, n_tokens: int, forward_batch_seqs: int,
                            device: torch.device) -> dict[str, dict[str, float]]:
    """Reconstruction metrics of every SAE over at least `n_tokens` masked held-out tokens;
    one forward pass (stopped after the last layer needed) serves all SAEs."""
    accs = {hp: ReconstructionAccumulator(sae.d_in, sae.d_sae) for hp, sae in saes.items()}
    seen = 0
    bar = tqdm(total=n_tokens, desc="eval", unit="tok", leave=False)
    for batch in stream.batches(forward_batch_seqs):
        mask = batch.train_mask.to(device)
        acts = capture(model, list(saes), batch.input_ids.to(device), stop_early=True)
        for hp, sae in saes.items():
            accs[hp].update(sae, acts[hp][mask].float())
        seen += int(mask.sum())
        bar.update(int(mask.sum()))
        if seen >= n_tokens:
            break
    bar.close()
    if seen < n_tokens:
        log.warning("held-out data ran out after %d of %d tokens", seen, n_tokens)
    return {hp.name: acc.result() for hp, acc in accs.items()}
