"""Shared fixtures: the real SmolLM2 tokenizer (cached after the first GGUF read), the tiny
random Qwen3 model and its config, composed through Hydra exactly as users compose it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch

from sae_dist import cli

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# SAE_DIST_TEST_THREADS=1 on a machine shared with other CPU-bound jobs: two OpenMP threads on
# a busy core spin-wait and run many times slower.
torch.set_num_threads(int(os.environ.get("SAE_DIST_TEST_THREADS", min(2, os.cpu_count() or 1))))

CONF_DIR = str(cli.CONF_DIR)

PRECISION = {
    "fp32": ["model.dtype=float32", "trainer.mixed_precision=no"],
    "bf16": ["model.dtype=bfloat16", "trainer.mixed_precision=bf16"],
}
"""Overrides that fix a run's precision whatever `auto` resolves to on the machine: fp32 (LM and
SAE step in float32) or bf16 (LM in bfloat16, SAE step under bf16 autocast with float32 master
weights: what `auto` chooses where bf16 is native). Emulated, and slow, on AVX2-only CPUs."""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's processor string)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    names = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")
    ]
    return names[0] if names else platform.processor() or "unknown CPU"


def pytest_report_header(config) -> list[str]:
    """The CPU, its native bf16 support as torch sees it, and what `auto` resolves to here.
    Tests fix their precision (PRECISION), so none depends on these lines."""
    from sae_dist.models import resolve_dtype, resolve_mixed_precision

    flags = {
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
    }
    native = any(flags.values())
    return [
        f"cpu: {cpu_model()} ({os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        "cpu bf16: "
        + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in flags.items())
        + f" -> model.dtype=auto: {resolve_dtype('auto', 'cpu')}, trainer.mixed_precision="
        f"auto: {resolve_mixed_precision('auto', 'cpu')}",
        "precision paths: fp32 and bf16 both tested explicitly; bf16 is "
        + ("native here" if native else "emulated here (slow)"),
    ]


def compose_train_config(overrides: list[str]):
    """TrainRunConfig from conf/train.yaml plus Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sae_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name="train", overrides=overrides))


@pytest.fixture(scope="session")
def tiny_cfg():
    return compose_train_config(["model=tiny-qwen3", "logger=none", "out_dir=unused"])


@pytest.fixture(scope="session")
def smollm2_tokenizer(tiny_cfg):
    from sae_dist.models import _tokenizer_only

    return _tokenizer_only(tiny_cfg.model)


def scaled_tiny_model(tiny_cfg, gain: float):
    """The tiny Qwen3 with its 2-D weights scaled up (embeddings x20, the others x `gain`): the
    default init gives an almost uniform next-token distribution, and greedy generation repeats
    one token."""
    from sae_dist.models import _random_model

    m = _random_model(tiny_cfg.model).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.mul_(20.0 if "embed" in name else gain)
    return m


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from sae_dist.models import _random_model

    return _random_model(tiny_cfg.model).eval().requires_grad_(False)


def one_document_per_row(ids: torch.Tensor, first: int = 0) -> torch.Tensor:
    """doc_ids [rows, cols] of a synthetic batch whose row r is document first + r."""
    return torch.arange(first, first + len(ids))[:, None].expand_as(ids).clone()


def random_token_batches(n: int, rows: int, cols: int, drop: float, seed: int) -> list:
    """n TokenBatches of random token ids [rows, cols] (ids < 3000) with a random train mask
    (each position left out with probability `drop`; column 0, the BOS column, always)."""
    from sae_dist.data import TokenBatch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        ids = torch.randint(0, 3000, (rows, cols), generator=gen)
        mask = torch.rand(rows, cols, generator=gen) > drop
        mask[:, 0] = False
        out.append(TokenBatch(ids, mask, one_document_per_row(ids, b * rows)))
    return out


SINK_POSITION = 5
"""The position at which `sink_tiny_model` has a massive activation, in every row."""


def sink_tiny_model(tiny_cfg):
    """The scaled tiny Qwen3 with an attention-sink-like outlier: layer 1's MLP output is 1000x
    at position SINK_POSITION of every row, so the residual stream from layer 1 on is too (a
    forward hook of the model itself: captures, splices and replays all see it)."""
    model = scaled_tiny_model(tiny_cfg, 4.0)

    def massive(module, args, out):
        out = out.clone()
        out[:, SINK_POSITION] *= 1000.0
        return out

    model.model.layers[1].mlp.register_forward_hook(massive)
    return model
