"""Interventions on the residual stream, MLP or attention output during any forward pass or
`generate` (DESIGN.md section 9), and the `python -m sae_dist.steer` entry point.

An `Intervention` edits the activation x [B, T, d_model] of one hookpoint at selected positions:

- add: x' = x + v with a fixed vector v [d_model] in activation units; `add_features` builds
  v = alpha * sum_f d_f from the SAE's unit decoder directions d_f = W_dec[f] / ||W_dec[f]||
  (so alpha is in the model's own activation scale whatever the norm of the saved rows),
  `add_direction` v = alpha * u for any direction u.
- clamp: encode x with the SAE, set features f to values, decode, and keep the SAE's error
  term: x' = x + decode(z') - decode(z) = x + sum_f (z'_f - z_f) W_dec[f] (the decoder is
  linear in the latents), so only the clamped features change and a clamp to the current value
  adds exactly zero. A clamp value c is in the same units as alpha: the feature's contribution
  z_f W_dec[f] becomes c d_f, i.e. z'_f = c / ||W_dec[f]|| (= c for unit-norm rows).

Positions: `all` (every non-pad token), `prompt` (absolute position < prompt length) or
`generated` (>= prompt length). `steer` tracks where each forward pass sits (the KV cache length
and the 2-D attention mask, `hookpoints.track_positions`), so the same intervention acts on the
same tokens with or without the cache, and never on left-padding. Several interventions (several
SAEs, hookpoints) apply at once; at one hookpoint they apply in list order. Leaving the block
removes every hook.

`intervention.json` (written by the refusal case study, read by `InterventionSpec`): a list of
{"sae": SAE folder, "hookpoint": "layers.{i}.{site}", "features": [ids], "alpha": float,
"mode": "add"|"clamp", "positions": "all"|"prompt"|"generated"}; with W_dec as saved on disk
and d_f = W_dec[f] / ||W_dec[f]||, add means x + alpha * sum_f d_f, clamp means each feature's
contribution set to alpha * d_f (latent alpha / ||W_dec[f]||), keeping the SAE error term.

`python -m sae_dist.steer intervention=<file> prompt="..."` prints the unsteered and steered
generations; `python -m sae_dist.steer experiment=refusal [suite=<path>] out_dir=<path>` runs the
refusal case study (`sae_dist.refusal`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_dist.cli import run_hydra
from sae_dist.config import SteerRunConfig, register_configs
from sae_dist.errors import ConfigError
from sae_dist.hookpoints import ForwardPositions, HookFn, Hookpoint, hooks, track_positions
from sae_dist.sae import Latents, SparseAutoencoder

log = logging.getLogger(__name__)

MODES = ("add", "clamp")
POSITIONS = ("all", "prompt", "generated")


# ------------------------------------------------------------------------------ interventions

@dataclass
class Intervention:
    """One edit of one hookpoint's activation; build it with `add_features`, `add_direction` or
    `clamp_features`, which check their arguments."""

    hookpoint: Hookpoint
    mode: str
    positions: str = "all"
    vector: Optional[Tensor] = None
    """add: the vector [d_model] added at every selected position (activation units)."""
    sae: Optional[SparseAutoencoder] = None
    """clamp: the SAE that encodes the activation (raw activations in, as saved on disk)."""
    features: list[int] = field(default_factory=list)
    """Feature ids (clamp: clamped; add_features: summed), for reports."""
    values: Optional[Tensor] = None
    """clamp: float32 [n_features], the latent value each feature is clamped to."""

    def delta(self, x: Tensor) -> Tensor:
        """What to add to the selected activations x [n, d_model] -> [n, d_model] (x's dtype)."""
        if self.mode == "add":
            return self.vector.to(x.dtype).expand_as(x)
        sae = self.sae
        latents = sae.encode(x.to(sae.W_dec.dtype))
        feats = torch.as_tensor(self.features, device=x.device)
        change = self.values.to(x.device) - feature_values(latents, feats)
        return (change.to(sae.W_dec.dtype) @ sae.W_dec[feats]).to(x.dtype)


def feature_values(latents: Latents, features: Tensor) -> Tensor:
    """Activations [n, len(features)] of the given features, from sparse or dense latents."""
    if latents.indices is None:
        return latents.values[:, features]
    hit = latents.indices[:, :, None] == features[None, None, :]
    return (latents.values[:, :, None] * hit).sum(1)


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ConfigError("positions", positions, ", ".join(POSITIONS))


def _check_features(sae: SparseAutoencoder, features: Sequence[int], hp: Hookpoint) -> list[int]:
    feats = [int(f) for f in features]
    if not feats:
        raise ConfigError("features", feats, f"at least one feature id of the SAE at {hp}")
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if bad:
        raise ConfigError("features", bad, f"ids 0..{sae.d_sae - 1} (d_sae of the SAE at {hp})")
    return feats


def decoder_direction(sae: SparseAutoencoder, features: Sequence[int]) -> Tensor:
    """sum_f W_dec[f] / ||W_dec[f]|| [d_model] (float32): what `add_features` adds per unit
    alpha."""
    rows = sae.W_dec.detach()[list(features)].float()
    return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)


def add_features(hp: Hookpoint, sae: SparseAutoencoder, features: Sequence[int], alpha: float,
                 positions: str = "all") -> Intervention:
    """x' = x + alpha * sum_f W_dec[f] / ||W_dec[f]|| at `positions` (alpha in activation
    units)."""
    _check_positions(positions)
    feats = _check_features(sae, features, hp)
    return Intervention(hp, "add", positions, vector=alpha * decoder_direction(sae, feats),
                        features=feats)


def add_direction(hp: Hookpoint, direction: Tensor, alpha: float = 1.0,
                  positions: str = "all") -> Intervention:
    """x' = x + alpha * direction at `positions`; direction [d_model] in activation units."""
    _check_positions(positions)
    if direction.dim() != 1:
        raise ConfigError("direction", tuple(direction.shape), "a vector [d_model]")
    return Intervention(hp, "add", positions, vector=alpha * direction.detach().float())


def clamp_features(hp: Hookpoint, sae: SparseAutoencoder, features: Sequence[int],
                   values: float | Sequence[float], positions: str = "all") -> Intervention:
    """Set each feature's contribution to c_f * d_f (one float c for all, or one per feature;
    activation units, d_f the unit decoder direction) at `positions`, keeping the SAE's error
    term: x' = x + sum_f (c_f / ||W_dec[f]|| - z_f(x)) W_dec[f]."""
    _check_positions(positions)
    feats = _check_features(sae, features, hp)
    vals = torch.as_tensor(values, dtype=torch.float32).flatten()
    if vals.numel() == 1:
        vals = vals.expand(len(feats)).clone()
    if vals.numel() != len(feats):
        raise ConfigError("values", vals.tolist(), f"one value or {len(feats)} (one per feature)")
    norms = sae.W_dec.detach()[feats].float().norm(dim=1)
    return Intervention(hp, "clamp", positions, sae=sae, features=feats, values=vals / norms)


def check_interventions(model: nn.Module, interventions: Sequence[Intervention]) -> None:
    """Raise ConfigError when an intervention cannot apply to `model`: hookpoint out of range,
    or a vector / SAE of another width than the model's hidden size."""
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    for iv in interventions:
        hp = Hookpoint.parse(iv.hookpoint.name, n_layers, key="hookpoint")
        width = iv.vector.shape[-1] if iv.mode == "add" else iv.sae.d_in
        if width != d_model:
            raise ConfigError("intervention", f"{iv.mode} at {hp} of width {width}",
                              f"width {d_model} (the model's hidden size)")


# ----------------------------------------------------------------------------------- hooks

class Steering:
    """Handle of an active `steer` block. `prompt_len` (absolute positions < prompt_len are the
    prompt, the rest generated; with left padding the padded prompt length) may be set or
    changed between forward passes."""

    def __init__(self, interventions: Sequence[Intervention], prompt_len: Optional[int]):
        self.interventions = list(interventions)
        self.prompt_len = prompt_len
        self.positions = ForwardPositions()

    def mask(self, positions: str, batch: int, seq: int, device: torch.device) -> Tensor:
        """bool [B, T]: the tokens of the current forward pass an intervention edits."""
        pos = self.positions
        keep = (pos.valid.to(device) if pos.valid is not None
                else torch.ones(batch, seq, dtype=torch.bool, device=device))
        if positions == "all":
            return keep
        if self.prompt_len is None:
            raise ValueError(f"positions={positions!r} needs the prompt length: pass prompt_len "
                             "to steer() or set Steering.prompt_len")
        absolute = pos.start + torch.arange(seq, device=device)
        in_prompt = absolute < self.prompt_len
        return keep & (in_prompt if positions == "prompt" else ~in_prompt)[None, :]

    def hook(self, ivs: list[Intervention]) -> HookFn:
        """The forward-hook function applying `ivs` (one hookpoint's) in order."""
        def fn(act: Tensor) -> Tensor:
            out = act
            for iv in ivs:
                sel = self.mask(iv.positions, act.shape[0], act.shape[1], act.device)
                if bool(sel.all()):
                    out = out + iv.delta(out.reshape(-1, out.shape[-1])).view_as(out)
                elif bool(sel.any()):
                    out = out.clone()
                    out[sel] = out[sel] + iv.delta(out[sel])
            return out
        return fn


@contextlib.contextmanager
def steer(model: nn.Module, interventions: Sequence[Intervention],
          prompt_len: Optional[int] = None) -> Iterator[Steering]:
    """Apply `interventions` to every forward pass of `model` in the block (plain calls or
    `generate`, with or without KV cache); all hooks are removed on exit. Checks them first."""
    check_interventions(model, interventions)
    steering = Steering(interventions, prompt_len)
    by_hp: dict[Hookpoint, list[Intervention]] = {}
    for iv in interventions:
        by_hp.setdefault(iv.hookpoint, []).append(iv)
    with track_positions(model) as positions, \
            hooks(model, {hp: steering.hook(ivs) for hp, ivs in by_hp.items()}):
        steering.positions = positions
        yield steering


# ------------------------------------------------------------------------------ generation

@dataclass
class Generation:
    """One greedy completion."""

    prompt: str
    text: str
    """The completion decoded without special tokens."""
    tokens: list[int]
    """Generated token ids, cut after the first EOS (excluded)."""
    prompt_tokens: list[int]
    """The rendered prompt's token ids (no padding)."""


def render_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as one user turn in the model's chat template, with the
    assistant header appended (the template's default system prompt included)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                          add_generation_prompt=True, return_dict=False)
            for p in prompts]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids int64 [B, T], attention_mask int64 [B, T]) with rows left-padded to T."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.int64)
        mask[i, width - len(r):] = 1
    return ids, mask


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    ids.discard(None)
    return ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str],
             interventions: Sequence[Intervention] = (), max_new_tokens: int = 48,
             batch_size: int = 32, use_cache: bool = True, desc: str = "generate"
             ) -> list[Generation]:
    """Greedy completions of each prompt (one user turn) under `interventions`, in batches of
    `batch_size` left-padded prompts of similar length; results in the order of `prompts`."""
    rendered = render_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
    out: list[Optional[Generation]] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        ids, mask = left_pad([rendered[i] for i in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        with steer(model, interventions, prompt_len=ids.shape[1]):
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  use_cache=use_cache, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(batch):
            new = seqs[row, ids.shape[1]:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eos), len(new))
            out[i] = Generation(prompts[i], tokenizer.decode(new[:cut], skip_special_tokens=True),
                                new[:cut], rendered[i])
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------- intervention.json

@dataclass
class InterventionSpec:
    """One entry of intervention.json: enough to re-apply the edit with any code."""

    sae: str
    """Path of the SAE folder (SAELens layout)."""
    hookpoint: str
    """`layers.{i}.{site}`."""
    features: list[int]
    """Feature ids of that SAE."""
    alpha: float
    """Activation units. add: x + alpha * sum_f d_f; clamp: each feature's contribution set to
    alpha * d_f (d_f = W_dec[f] / ||W_dec[f]||, W_dec as saved on disk)."""
    mode: str = "add"
    positions: str = "all"

    def build(self, n_layers: int, device: str | torch.device = "cpu") -> Intervention:
        """Load the SAE and make the Intervention; ConfigError for bad values."""
        from sae_dist.checkpoint import load_sae

        if self.mode not in MODES:
            raise ConfigError("intervention.mode", self.mode, ", ".join(MODES))
        hp = Hookpoint.parse(self.hookpoint, n_layers)
        sae, _ = load_sae(Path(self.sae), device)
        if self.mode == "add":
            return add_features(hp, sae.eval(), self.features, self.alpha, self.positions)
        return clamp_features(hp, sae.eval(), self.features, self.alpha, self.positions)


def save_interventions(specs: Sequence[InterventionSpec], path: Path) -> None:
    Path(path).write_text(json.dumps([asdict(s) for s in specs], indent=2) + "\n")


def load_interventions(path: Path) -> list[InterventionSpec]:
    """Read intervention.json; ConfigError naming the file when it is malformed."""
    try:
        raw = json.loads(Path(path).read_text())
        items = raw if isinstance(raw, list) else [raw]
        return [InterventionSpec(**item) for item in items]
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError("intervention", str(path), "a JSON list of {sae, hookpoint, features, "
                          f"alpha, mode, positions}} objects ({e})") from e


# ---------------------------------------------------------------------------- entry point

def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError("device", name, "auto, cpu, cuda, cuda:<i>")
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def model_config_of_sae(folder: Path):
    """The conf/model/ entry of the model an SAE folder's metadata names."""
    from sae_dist.evaluate import model_config_for

    meta = json.loads((Path(folder) / "cfg.json").read_text()).get("metadata", {})
    if not meta.get("model_name"):
        raise ConfigError("model", None, f"model=<name>: {folder} does not name its model")
    return model_config_for(meta["model_name"])


def apply_intervention_file(cfg: SteerRunConfig) -> dict[str, str]:
    """Generate `cfg.prompt` without and with the interventions of `cfg.intervention`, print
    both and return them ({"unsteered", "steered"})."""
    from sae_dist.models import load_model

    if not cfg.prompt:
        raise ConfigError("prompt", cfg.prompt, 'a non-empty prompt="..." to steer')
    specs = load_interventions(Path(cfg.intervention))
    model_cfg = cfg.model or model_config_of_sae(Path(specs[0].sae))
    if cfg.model_dtype:
        model_cfg.dtype = cfg.model_dtype
    device = resolve_device(cfg.device)
    ivs = [s.build(model_cfg.n_layers, device) for s in specs]
    model, tokenizer = load_model(model_cfg, device)
    check_interventions(model, ivs)
    n = cfg.max_new_tokens
    plain = generate(model, tokenizer, [cfg.prompt], (), n, desc="unsteered")[0].text
    steered = generate(model, tokenizer, [cfg.prompt], ivs, n, desc="steered")[0].text
    what = "; ".join(f"{s.mode} {s.features} at {s.hookpoint}, alpha {s.alpha:g}, {s.positions}"
                     for s in specs)
    print(f"prompt: {cfg.prompt}\n\n--- unsteered ---\n{plain}\n\n--- steered ({what}) ---\n"
          f"{steered}")
    return {"unsteered": plain, "steered": steered}


def run(cfg: SteerRunConfig):
    """Dispatch: apply an intervention file, or run the refusal case study."""
    if cfg.max_new_tokens < 1:
        raise ConfigError("max_new_tokens", cfg.max_new_tokens, ">= 1")
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ConfigError("threads", cfg.threads, ">= 1 or null")
        torch.set_num_threads(cfg.threads)
    if cfg.intervention:
        return apply_intervention_file(cfg)
    if cfg.task == "refusal":
        from sae_dist.refusal import run_refusal_study

        return run_refusal_study(cfg)
    raise ConfigError("task", cfg.task, "refusal (experiment=refusal), or give "
                      "intervention=<file> prompt=\"...\"")


register_configs()


def main() -> None:
    """`python -m sae_dist.steer` / `sae-steer` (sae_dist.cli: overrides, --help, errors)."""
    run_hydra("steer", SteerRunConfig, run)


if __name__ == "__main__":
    main()
