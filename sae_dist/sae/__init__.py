"""Sparse autoencoders: one module per architecture behind one interface (`base.py`).

`SAE_REGISTRY` maps an architecture name to its class; `build_sae` makes a freshly initialised
SAE from the run config, `sae_from_saelens` rebuilds one from SAELens v6 tensors and cfg.
"""

from __future__ import annotations

from torch import Tensor

from sae_dist.config import ConfigError, SAEConfig
from sae_dist.sae.base import SAE_REGISTRY, Latents, SAEOutput, SparseAutoencoder, register
from sae_dist.sae.topk import TopKSAE

__all__ = ["SAE_REGISTRY", "Latents", "SAEOutput", "SparseAutoencoder", "TopKSAE",
           "build_sae", "register", "sae_from_saelens"]


def _architecture(name: str, key: str) -> type[SparseAutoencoder]:
    """Registry lookup that names the allowed architectures on failure."""
    if name not in SAE_REGISTRY:
        raise ConfigError(key, name, ", ".join(sorted(SAE_REGISTRY)))
    return SAE_REGISTRY[name]


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """Freshly initialised SAE of `cfg.architecture` with d_sae = cfg.latents(d_in) latents
    (seed with torch.manual_seed before calling)."""
    return _architecture(cfg.architecture, "sae.architecture")(cfg, d_in)


def sae_from_saelens(tensors: dict[str, Tensor], cfg: dict) -> SparseAutoencoder:
    """SAE from SAELens v6 weights and cfg; the class is chosen by cfg["architecture"]."""
    return _architecture(cfg["architecture"], "architecture").from_saelens(tensors, cfg)
