"""Interventions on the residual stream, MLP or attention output during any forward pass or
`generate` (DESIGN.md section 9).

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
removes every hook. A gated intervention (`Intervention.gate`, `sae_dist.steer.gate`) acts on
its positions of the rows whose gate opened on the prompt pass, and nowhere else; when those
positions include the prompt, the gate must read no later in the network than the edit (same
hookpoint: the gate reads the activation before the edit), so it has decided when the prompt
pass reaches the edit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sae_dist.errors import ConfigError
from sae_dist.hookpoints import ForwardPositions, HookFn, Hookpoint, hooks, track_positions
from sae_dist.sae import Latents, SparseAutoencoder

log = logging.getLogger(__name__)

MODES = ("add", "clamp")
STEER_POSITIONS = ("all", "prompt", "generated")


# ------------------------------------------------------------------------------ interventions


class GateReading(Protocol):
    """What a gate read on the prompt pass (`steer.gate.GateReading`)."""

    scores: Tensor
    """float32 [B]: reduced scores."""
    open: Tensor
    """bool [B]: the rows whose gated interventions act."""


class Gate(Protocol):
    """What `Steering` needs of a gate (implemented by `steer.gate.Gate`)."""

    hookpoint: Hookpoint

    @property
    def width(self) -> int:
        """The activation width the gate reads."""
        ...

    def read(self, act: Tensor, positions: ForwardPositions, prompt_len: int) -> GateReading:
        """Score the prompt positions of act [B, T, d] on a pass starting at 0, and decide."""
        ...


@dataclass
class Intervention:
    """One edit of one hookpoint's activation; build it with `add_features`, `add_direction` or
    `clamp_features`, which check their arguments."""

    hookpoint: Hookpoint
    mode: str
    positions: str = "all"
    vector: Tensor | None = None
    """add: the vector [d_model] added at every selected position (activation units)."""
    sae: SparseAutoencoder | None = None
    """clamp: the SAE that encodes the activation (raw activations in, as saved on disk)."""
    features: list[int] = field(default_factory=list)
    """Feature ids (clamp: clamped; add_features: summed), for reports."""
    values: Tensor | None = None
    """clamp: float32 [n_features], the latent value each feature is clamped to."""
    gate: Gate | None = None
    """When set, the edit acts on its positions of the rows whose gate opened on the prompt pass,
    and nowhere else (`steer.gate`)."""

    def delta(self, x: Tensor) -> Tensor:
        """What to add to the selected activations x [n, d_model] -> [n, d_model] (x's dtype)."""
        if self.mode == "add":
            assert self.vector is not None, "an add intervention has a vector"
            return self.vector.to(x.dtype).expand_as(x)
        sae = self.sae
        assert sae is not None and self.values is not None, "a clamp has an SAE and values"
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
    if positions not in STEER_POSITIONS:
        raise ConfigError("positions", positions, ", ".join(STEER_POSITIONS))


def check_features(sae: SparseAutoencoder, features: Sequence[int], hp: Hookpoint) -> list[int]:
    """The feature ids as ints; ConfigError when empty or outside 0..d_sae - 1."""
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


def add_features(
    hp: Hookpoint,
    sae: SparseAutoencoder,
    features: Sequence[int],
    alpha: float,
    positions: str = "all",
) -> Intervention:
    """x' = x + alpha * sum_f W_dec[f] / ||W_dec[f]|| at `positions` (alpha in activation
    units)."""
    _check_positions(positions)
    feats = check_features(sae, features, hp)
    return Intervention(
        hp, "add", positions, vector=alpha * decoder_direction(sae, feats), features=feats
    )


def add_direction(
    hp: Hookpoint, direction: Tensor, alpha: float = 1.0, positions: str = "all"
) -> Intervention:
    """x' = x + alpha * direction at `positions`; direction [d_model] in activation units."""
    _check_positions(positions)
    if direction.dim() != 1:
        raise ConfigError("direction", tuple(direction.shape), "a vector [d_model]")
    return Intervention(hp, "add", positions, vector=alpha * direction.detach().float())


def clamp_features(
    hp: Hookpoint,
    sae: SparseAutoencoder,
    features: Sequence[int],
    values: float | Sequence[float],
    positions: str = "all",
) -> Intervention:
    """Set each feature's contribution to c_f * d_f (one float c for all, or one per feature;
    activation units, d_f the unit decoder direction) at `positions`, keeping the SAE's error
    term: x' = x + sum_f (c_f / ||W_dec[f]|| - z_f(x)) W_dec[f]."""
    _check_positions(positions)
    feats = check_features(sae, features, hp)
    vals = torch.as_tensor(values, dtype=torch.float32).flatten()
    if vals.numel() == 1:
        vals = vals.expand(len(feats)).clone()
    if vals.numel() != len(feats):
        raise ConfigError("values", vals.tolist(), f"one value or {len(feats)} (one per feature)")
    norms = sae.W_dec.detach()[feats].float().norm(dim=1)
    return Intervention(hp, "clamp", positions, sae=sae, features=feats, values=vals / norms)


def check_interventions(
    model: nn.Module, interventions: Sequence[Intervention], gates: Sequence[Gate] = ()
) -> None:
    """Raise ConfigError when an intervention or gate cannot apply to `model`: hookpoint out of
    range, a vector / SAE of another width than the model's hidden size, or a gated edit of
    prompt positions whose gate reads later in the network than the edit."""
    config: Any = model.config  # an HF PretrainedConfig (nn.Module's stubs: Tensor | Module)
    n_layers, d_model = int(config.num_hidden_layers), int(config.hidden_size)
    for iv in interventions:
        hp = Hookpoint.parse(iv.hookpoint.name, n_layers, key="hookpoint")
        if iv.mode == "add":
            assert iv.vector is not None, "an add intervention has a vector"
            width = iv.vector.shape[-1]
        else:
            assert iv.sae is not None, "a clamp intervention has an SAE"
            width = iv.sae.d_in
        if width != d_model:
            raise ConfigError(
                "intervention",
                f"{iv.mode} at {hp} of width {width}",
                f"width {d_model} (the model's hidden size)",
            )
        if (
            iv.gate is not None
            and iv.positions != "generated"
            and run_order(iv.gate.hookpoint) > run_order(iv.hookpoint)
        ):
            raise ConfigError(
                "gate.hookpoint",
                iv.gate.hookpoint.name,
                f"a hookpoint no later "
                f"than the edit at {iv.hookpoint} (it edits prompt positions: "
                "positions=generated lifts this)",
            )
    for gate in _gates(interventions, gates):
        hp = Hookpoint.parse(gate.hookpoint.name, n_layers, key="gate.hookpoint")
        if gate.width != d_model:
            raise ConfigError(
                "gate",
                f"gate at {hp} of width {gate.width}",
                f"width {d_model} (the model's hidden size)",
            )


def run_order(hp: Hookpoint) -> tuple[int, int]:
    """Order in which a forward pass reaches hookpoints: by layer, then attn, mlp, resid."""
    return hp.layer, ("attn", "mlp", "resid").index(hp.site)


def _gates(interventions: Sequence[Intervention], gates: Sequence[Gate]) -> list[Gate]:
    """The distinct gates of `interventions` (first seen first), then those of `gates`."""
    out: list[Gate] = []
    for gate in [iv.gate for iv in interventions if iv.gate is not None] + list(gates):
        if not any(gate is g for g in out):
            out.append(gate)
    return out


# ----------------------------------------------------------------------------------- hooks


class Steering:
    """Handle of an active `steer` block. `prompt_len` (absolute positions < prompt_len are the
    prompt, the rest generated; with left padding the padded prompt length) may be set or
    changed between forward passes. Gates read on the first pass that starts at position 0 and
    keep their decision until `reset_gates` (call it before a new batch of prompts)."""

    def __init__(
        self,
        interventions: Sequence[Intervention],
        prompt_len: int | None,
        gates: Sequence[Gate] = (),
    ):
        self.interventions = list(interventions)
        self.prompt_len = prompt_len
        self.positions = ForwardPositions()
        self.gates = _gates(interventions, gates)
        """Every gate read: the interventions' own (first seen first), then the extra ones."""
        self._readings: dict[int, GateReading] = {}

    def readings(self) -> list[GateReading | None]:
        """What each gate of `gates` read on the prompt pass (None before it)."""
        return [self._readings.get(id(g)) for g in self.gates]

    def prompt_readings(self) -> list[GateReading]:
        """What each gate of `gates` read, once the prompt pass has run (RuntimeError before)."""
        out = self.readings()
        for g, r in zip(self.gates, out):
            if r is None:
                raise RuntimeError(f"the gate at {g.hookpoint} has not read the prompt")
        return [r for r in out if r is not None]

    def reset_gates(self) -> None:
        """Forget the gates' decisions: the next pass starting at position 0 reads them anew."""
        self._readings.clear()

    def _read_gates(self, hp: Hookpoint, act: Tensor) -> None:
        """On a pass starting at position 0, let the unread gates at `hp` read `act`."""
        if self.positions.start != 0:
            return
        for gate in self.gates:
            if gate.hookpoint == hp and id(gate) not in self._readings:
                if self.prompt_len is None:
                    raise ValueError("a gate needs the prompt length: pass prompt_len to steer()")
                self._readings[id(gate)] = gate.read(act, self.positions, self.prompt_len)

    def _gate_open(self, iv: Intervention, batch: int, device: torch.device) -> Tensor:
        """bool [B, 1]: the rows whose gate of `iv` opened."""
        assert iv.gate is not None, "called for gated interventions only"
        reading = self._readings.get(id(iv.gate))
        if reading is None:
            raise RuntimeError(
                f"the gate at {iv.gate.hookpoint} has not read the prompt when "
                f"the intervention at {iv.hookpoint} needs it: run a prompt-only "
                "pass first (generate does)"
            )
        if reading.open.shape[0] != batch:
            raise RuntimeError(
                f"the gate read {reading.open.shape[0]} prompts, this pass has "
                f"{batch} rows: call Steering.reset_gates() for a new batch"
            )
        return reading.open.to(device)[:, None]

    def mask(self, positions: str, batch: int, seq: int, device: torch.device) -> Tensor:
        """bool [B, T]: the tokens of the current forward pass an intervention edits."""
        pos = self.positions
        keep = (
            pos.valid.to(device)
            if pos.valid is not None
            else torch.ones(batch, seq, dtype=torch.bool, device=device)
        )
        if positions == "all":
            return keep
        if self.prompt_len is None:
            raise ValueError(
                f"positions={positions!r} needs the prompt length: pass prompt_len "
                "to steer() or set Steering.prompt_len"
            )
        absolute = pos.start + torch.arange(seq, device=device)
        in_prompt = absolute < self.prompt_len
        return keep & (in_prompt if positions == "prompt" else ~in_prompt)[None, :]

    def hook(self, hp: Hookpoint, ivs: list[Intervention]) -> HookFn:
        """The forward-hook function at `hp`: its unread gates read the activation, then `ivs`
        (the hookpoint's interventions) apply in order."""

        def fn(act: Tensor) -> Tensor:
            self._read_gates(hp, act)
            out = act
            for iv in ivs:
                sel = self.mask(iv.positions, act.shape[0], act.shape[1], act.device)
                if iv.gate is not None and bool(sel.any()):
                    sel = sel & self._gate_open(iv, act.shape[0], act.device)
                if bool(sel.all()):
                    out = out + iv.delta(out.reshape(-1, out.shape[-1])).view_as(out)
                elif bool(sel.any()):
                    out = out.clone()
                    out[sel] = out[sel] + iv.delta(out[sel])
            return out

        return fn


@contextlib.contextmanager
def steer(
    model: nn.Module,
    interventions: Sequence[Intervention],
    prompt_len: int | None = None,
    gates: Sequence[Gate] = (),
) -> Iterator[Steering]:
    """Apply `interventions` to every forward pass of `model` in the block (plain calls or
    `generate`, with or without KV cache); all hooks are removed on exit. Checks them first.
    `gates` are read on the prompt pass besides the interventions' own (`Steering.readings`)."""
    check_interventions(model, interventions, gates)
    steering = Steering(interventions, prompt_len, gates)
    by_hp: dict[Hookpoint, list[Intervention]] = {g.hookpoint: [] for g in steering.gates}
    for iv in interventions:
        by_hp.setdefault(iv.hookpoint, []).append(iv)
    with (
        track_positions(model) as positions,
        hooks(model, {hp: steering.hook(hp, ivs) for hp, ivs in by_hp.items()}),
    ):
        steering.positions = positions
        yield steering


# ------------------------------------------------------------------------------ generation


# ---------------------------------------------------------------------- intervention.json


# ---------------------------------------------------------------------------- entry point
