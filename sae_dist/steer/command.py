"""`python -m sae_dist.steer intervention=<file> prompt="..."` (conf/steer.yaml): generate the
prompt without and with the interventions of an intervention.json and print both. The refusal
case study has its own command, `python -m sae_dist.studies.refusal`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae_dist.config import SteerRunConfig
from sae_dist.errors import ConfigError, UserError
from sae_dist.models import load_model, resolve_device
from sae_dist.steer.generate import generate
from sae_dist.steer.interventions import check_interventions
from sae_dist.steer.spec import load_interventions
from sae_dist.suite import model_config_for


def model_config_of_sae(folder: Path):
    """The conf/model/ entry of the model an SAE folder's metadata names."""

    meta = json.loads((Path(folder) / "cfg.json").read_text()).get("metadata", {})
    if not meta.get("model_name"):
        raise ConfigError("model", None, f"model=<name>: {folder} does not name its model")
    return model_config_for(meta["model_name"])


def apply_intervention_file(cfg: SteerRunConfig) -> dict[str, str]:
    """Generate `cfg.prompt` without and with the interventions of `cfg.intervention`, print
    both and return them ({"unsteered", "steered"})."""

    if not cfg.prompt:
        raise ConfigError("prompt", cfg.prompt, 'a non-empty prompt="..." to steer')
    assert cfg.intervention is not None, "run() calls this only with an intervention file"
    specs = load_interventions(Path(cfg.intervention))
    folders = [s.sae for s in specs if s.sae] + [s.gate.sae for s in specs if s.gate and s.gate.sae]
    if cfg.model is None and not folders:
        raise ConfigError("model", None, "model=<name>: the intervention file names no SAE")
    model_cfg = cfg.model or model_config_of_sae(Path(folders[0]))
    if cfg.model_dtype:
        model_cfg.dtype = cfg.model_dtype
    device = resolve_device(cfg.device)
    ivs = [s.build(model_cfg.n_layers, device) for s in specs]
    model, tokenizer = load_model(model_cfg, device)
    check_interventions(model, ivs)
    n = cfg.max_new_tokens
    plain = generate(model, tokenizer, [cfg.prompt], (), n, desc="unsteered")[0].text
    steered = generate(model, tokenizer, [cfg.prompt], ivs, n, desc="steered")[0].text
    what = "; ".join(
        f"{s.mode} {s.features or 'direction'} at {s.hookpoint}, alpha "
        f"{s.alpha:g}, {s.positions}" + (f", gated at {s.gate.hookpoint}" if s.gate else "")
        for s in specs
    )
    print(
        f"prompt: {cfg.prompt}\n\n--- unsteered ---\n{plain}\n\n--- steered ({what}) ---\n{steered}"
    )
    return {"unsteered": plain, "steered": steered}


def apply_generation_settings(cfg: SteerRunConfig) -> None:
    """Check `max_new_tokens` and apply `threads` (torch's intra-op threads) of a steering run."""
    if cfg.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", cfg.max_new_tokens, ">= 1")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ConfigError("threads", cfg.threads, ">= 1 or null")
        torch.set_num_threads(cfg.threads)


def run(cfg: SteerRunConfig):
    """Apply an intervention file to a prompt; the refusal case study has its own command."""
    if cfg.task == "refusal":
        raise UserError(
            "experiment=refusal: the refusal case study has its own command, "
            "`python -m sae_dist.studies.refusal [suite=<path>] out_dir=<path>`"
        )
    apply_generation_settings(cfg)
    if cfg.intervention:
        return apply_intervention_file(cfg)
    raise ConfigError(
        "intervention", cfg.intervention, 'intervention=<intervention.json> prompt="..."'
    )
