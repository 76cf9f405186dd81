"""SAEs made by other tools, read into our classes for evaluation and steering.

- SAELens v6 (`cfg.json` + `sae_weights.safetensors`; Gemma Scope, SAEBench, Neuronpedia):
  `normalize_saelens` maps what other writers vary to the form our classes load: any float
  dtype, `apply_b_dec_to_input: false` (pre = x @ W_enc + b_enc, folded as
  b_enc + b_dec @ W_enc since we always subtract b_dec), `normalize_activations: null`.
  Architectures: "standard" (ReLU), "topk", "jumprelu" (also what SAELens writes for BatchTopK).
  `sae_dist.sae.sae_from_saelens` applies it, so `checkpoint.load_sae` reads such folders.
- EleutherAI sparsify (`cfg.json` + `sae.safetensors`): `encoder.weight [M, d]`,
  `encoder.bias [M]`, `W_dec [M, d]`, `b_dec [d]`; pre = (x - b_dec) @ encoder.weight.T + bias,
  z = top k of relu(pre), x_hat = z @ W_dec + b_dec: a TopK SAE with W_enc = encoder.weight.T.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from sae_dist.config import TopKConfig
from sae_dist.sae.topk import TopKSAE

SPARSIFY_WEIGHTS = "sae.safetensors"


def normalize_saelens(
    tensors: dict[str, Tensor], cfg: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """SAELens v6 tensors and cfg as any tool writes them -> float32 tensors and a cfg with
    apply_b_dec_to_input true and normalize_activations "none" (same encode/decode outputs)."""
    tensors = {name: t.float() for name, t in tensors.items()}
    cfg = dict(cfg)
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    if cfg.get("apply_b_dec_to_input", True) is False:
        tensors["b_enc"] = torch.addmv(tensors["b_enc"], tensors["W_enc"].t(), tensors["b_dec"])
        cfg["apply_b_dec_to_input"] = True
    return tensors, cfg


def sae_from_sparsify(tensors: dict[str, Tensor], cfg: dict[str, Any]) -> TopKSAE:
    """TopK SAE from sparsify's weights and cfg.json (float32, CPU). Transcoders, skip
    connections and the groupmax activation have no counterpart and raise ValueError."""
    if cfg.get("transcode") or cfg.get("skip_connection") or "W_skip" in tensors:
        raise ValueError("sparsify transcoders and skip connections are not supported")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(
            f"sparsify activation {cfg['activation']!r} is not supported; expected 'topk'"
        )
    weight = tensors["encoder.weight"].float()
    d_sae, d_in = weight.shape
    sae = TopKSAE(TopKConfig(d_sae=d_sae, k=int(cfg["k"])), d_in)
    sae.load_saelens_tensors(
        {
            "W_enc": weight.t(),
            "b_enc": tensors["encoder.bias"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
        }
    )
    return sae


def load_sparsify(folder: str | Path) -> tuple[TopKSAE, dict[str, Any]]:
    """The sparsify SAE saved in `folder` (cfg.json, sae.safetensors) and its cfg."""
    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    return sae_from_sparsify(load_file(str(folder / SPARSIFY_WEIGHTS)), cfg), cfg
