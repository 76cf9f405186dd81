"""Gates: whether gated interventions act on a sequence, decided once on its prompt pass from one
hookpoint's activation (DESIGN.md section 9, "Gated interventions").

A gate reads the activation x [B, T, d_model] of its hookpoint on the prompt pass (the first
forward pass of a `steer` block, which covers the prompt; under `generate` with or without the
KV cache), before any intervention at that hookpoint edits it:

- score of a position t: s_t = sum_f w_f z_f(x_t) with z = the SAE's own encoder output
  (activation function included, raw activations in, as saved on disk), or s_t = <x_t, u> for
  a direction u [d_model] (activation units, u as given);
- reduced over the prompt's positions, except its first token: the positions t with absolute
  position < prompt length, not padding, and not the row's first non-pad token (the chat
  template's first token, often an attention sink with an outlier norm); `reduce` is max or
  mean;
- open iff the reduced score >= threshold (with `invert`: open iff it is < threshold).

A gated intervention acts on its positions (`all`, `prompt` or `generated`) of the rows whose
gate is open, and on nothing else. The decision holds for the rest of the block. An edit of
prompt positions needs its gate read no later in the network than itself (the order of
`interventions.run_order`; at the same hookpoint the gate reads first), so that the gate has
decided when the prompt pass reaches the edit; an edit of generated positions only may come
before its gate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from sae_dist.checkpoint import load_sae
from sae_dist.errors import ConfigError
from sae_dist.hookpoints import ForwardPositions, Hookpoint
from sae_dist.sae import SparseAutoencoder
from sae_dist.steer.interventions import Intervention, check_features, feature_values

REDUCES = ("max", "mean")


@dataclass(eq=False)
class Gate:
    """A condition on the prompt; build it with `features_gate` or `direction_gate`."""

    hookpoint: Hookpoint
    threshold: float
    """In score units (the SAE's latent units times the weights, or activation units along u)."""
    reduce: str = "max"
    invert: bool = False
    sae: SparseAutoencoder | None = None
    features: list[int] = field(default_factory=list)
    weights: Tensor | None = None
    """float32 [len(features)]: w_f."""
    direction: Tensor | None = None
    """float32 [d_model]: u."""

    @property
    def width(self) -> int:
        """The activation width the gate reads."""
        if self.sae is not None:
            return self.sae.d_in
        assert self.direction is not None, "a gate without an SAE is a direction gate"
        return self.direction.shape[0]

    def position_scores(self, x: Tensor) -> Tensor:
        """s_t of every position: x [..., d_model] -> float32 [...]."""
        flat = x.reshape(-1, x.shape[-1])
        if self.sae is None:
            assert self.direction is not None, "a gate without an SAE is a direction gate"
            scores = flat.float() @ self.direction.to(flat.device)
        else:
            assert self.weights is not None, "a features gate has one weight per feature"
            feats = torch.as_tensor(self.features, device=x.device)
            z = feature_values(self.sae.encode(flat.to(self.sae.W_dec.dtype)), feats)
            scores = z.float() @ self.weights.to(x.device)
        return scores.view(x.shape[:-1])

    def reduce_scores(self, scores: Tensor, keep: Tensor) -> Tensor:
        """Reduced score per row: scores [B, T] over the positions where keep [B, T] -> [B]."""
        n = keep.sum(1)
        if bool((n == 0).any()):
            raise ValueError("a gate needs prompts of at least 2 tokens (it skips the first)")
        if self.reduce == "max":
            return scores.masked_fill(~keep, float("-inf")).amax(1)
        return (scores * keep).sum(1) / n

    def opens(self, reduced: Tensor) -> Tensor:
        """bool [B]: the rows whose gated interventions act."""
        return (reduced >= self.threshold) != self.invert

    @torch.no_grad()
    def read(self, act: Tensor, positions: ForwardPositions, prompt_len: int) -> GateReading:
        """Score the prompt positions of act [B, T, d] (a pass starting at 0) and decide."""
        keep = prompt_positions(
            positions.valid, positions.start, prompt_len, act.shape[0], act.shape[1], act.device
        )
        reduced = self.reduce_scores(self.position_scores(act), keep)
        return GateReading(reduced.float().cpu(), self.opens(reduced).cpu())


@dataclass
class GateReading:
    """What a gate read on the prompt pass."""

    scores: Tensor
    """float32 [B]: the reduced scores."""
    open: Tensor
    """bool [B]."""


def _check(hp: Hookpoint, threshold: float, reduce: str) -> None:
    if reduce not in REDUCES:
        raise ConfigError("gate.reduce", reduce, ", ".join(REDUCES))
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ConfigError("gate.threshold", threshold, f"a number (the gate at {hp})")


def features_gate(
    hp: Hookpoint,
    sae: SparseAutoencoder,
    features: Sequence[int],
    weights: Sequence[float] | float,
    threshold: float,
    reduce: str = "max",
    invert: bool = False,
) -> Gate:
    """Gate on s_t = sum_f w_f z_f(x_t) (one weight for all features, or one per feature)."""
    _check(hp, threshold, reduce)
    feats = check_features(sae, features, hp)
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() == 1:
        w = w.expand(len(feats)).clone()
    if w.numel() != len(feats):
        raise ConfigError(
            "gate.weights", w.tolist(), f"one weight or {len(feats)} (one per feature)"
        )
    return Gate(hp, float(threshold), reduce, invert, sae=sae, features=feats, weights=w)


def direction_gate(
    hp: Hookpoint, direction: Tensor, threshold: float, reduce: str = "max", invert: bool = False
) -> Gate:
    """Gate on s_t = <x_t, u>, direction u [d_model] as given."""
    _check(hp, threshold, reduce)
    if direction.dim() != 1:
        raise ConfigError("gate.direction", tuple(direction.shape), "a vector [d_model]")
    return Gate(hp, float(threshold), reduce, invert, direction=direction.detach().float())


def prompt_positions(
    valid: Tensor | None, start: int, prompt_len: int, batch: int, seq: int, device: torch.device
) -> Tensor:
    """bool [B, T]: the positions of a forward pass a gate reads (module docstring). valid
    [B, T] marks non-pad tokens (None: all); start is the pass's first absolute position."""
    keep = (
        valid.to(device)
        if valid is not None
        else torch.ones(batch, seq, dtype=torch.bool, device=device)
    )
    keep = keep & ((start + torch.arange(seq, device=device)) < prompt_len)[None, :]
    if start == 0:
        first = keep.int().argmax(1)
        keep = keep.clone()
        keep[torch.arange(batch, device=device), first] = False
    return keep


# ---------------------------------------------------------------------- intervention.json


@dataclass
class GateSpec:
    """The `gate` of an intervention.json entry: enough to re-apply it with any code."""

    hookpoint: str
    threshold: float
    reduce: str = "max"
    invert: bool = False
    sae: str | None = None
    """SAE folder (SAELens layout) whose features are read; null for a direction gate."""
    features: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    direction: list[float] | None = None
    """u [d_model] for a direction gate (null for a features gate)."""

    def build(self, n_layers: int, device: str | torch.device = "cpu") -> Gate:
        """Load the SAE (features gate) and make the Gate; ConfigError for bad values."""
        hp = Hookpoint.parse(self.hookpoint, n_layers, key="gate.hookpoint")
        if (self.sae is None) == (self.direction is None):
            raise ConfigError(
                "gate",
                {"sae": self.sae, "direction": "..." if self.direction else None},
                "exactly one of sae (with features and weights) or direction",
            )
        if self.direction is not None:
            return direction_gate(
                hp,
                torch.tensor(self.direction, dtype=torch.float32),
                self.threshold,
                self.reduce,
                self.invert,
            )
        assert self.sae is not None, "checked above: exactly one of sae or direction"
        sae, _ = load_sae(Path(self.sae), device)
        return features_gate(
            hp, sae.eval(), self.features, self.weights, self.threshold, self.reduce, self.invert
        )


def gated(iv: Intervention, gate: Gate) -> Intervention:
    """A copy of `iv` that acts only on the prompts whose `gate` opens (on iv's positions)."""
    return replace(iv, gate=gate)
