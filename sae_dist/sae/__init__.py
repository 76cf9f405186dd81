"""Sparse autoencoders: one module per architecture behind one interface (`base.py`).

`SAE_REGISTRY` maps an architecture name (`sae=<name>` in Hydra) to its class: topk, batchtopk,
jumprelu, relu. `build_sae` makes a freshly initialised SAE from the run config;
`sae_from_saelens` rebuilds one from SAELens v6 tensors and cfg, written by us or by other tools
(`interop.py`, which also reads EleutherAI sparsify SAEs).
"""

from __future__ import annotations

from torch import Tensor

from sae_dist.config import SAEConfig
from sae_dist.errors import ConfigError
from sae_dist.sae.base import SAE_REGISTRY, Latents, SAEOutput, SparseAutoencoder, register
from sae_dist.sae.batchtopk import BatchTopKSAE
from sae_dist.sae.interop import load_sparsify, normalize_saelens, sae_from_sparsify
from sae_dist.sae.jumprelu import JumpReLUSAE
from sae_dist.sae.relu import ReLUSAE
from sae_dist.sae.topk import TopKSAE

SAELENS_ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
    "standard": ReLUSAE,
}
"""SAELens v6 `architecture` -> the class that loads it (BatchTopK SAEs export as jumprelu)."""

__all__ = [
    "SAELENS_ARCHITECTURES",
    "SAE_REGISTRY",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "Latents",
    "ReLUSAE",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "build_sae",
    "load_sparsify",
    "register",
    "sae_from_saelens",
    "sae_from_sparsify",
]


def _lookup(
    table: dict[str, type[SparseAutoencoder]], name: str, key: str
) -> type[SparseAutoencoder]:
    """Architecture lookup that names the allowed architectures on failure."""
    if name not in table:
        raise ConfigError(key, name, ", ".join(sorted(table)))
    return table[name]


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """Freshly initialised SAE of `cfg.architecture` with d_sae = cfg.latents(d_in) latents
    (seed with torch.manual_seed before calling)."""
    return _lookup(SAE_REGISTRY, cfg.architecture, "sae.architecture")(cfg, d_in)


def sae_from_saelens(tensors: dict[str, Tensor], cfg: dict) -> SparseAutoencoder:
    """SAE from SAELens v6 weights and cfg (any writer, see `normalize_saelens`); the class is
    chosen by cfg["architecture"] (`SAELENS_ARCHITECTURES`)."""
    cls = _lookup(SAELENS_ARCHITECTURES, cfg["architecture"], "architecture")
    return cls.from_saelens(*normalize_saelens(tensors, cfg))
