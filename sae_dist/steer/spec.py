"""`intervention.json`: a list of entries, each enough to re-apply one edit with any code
(DESIGN.md section 9 gives the semantics in full):

{"sae": SAE folder | null, "hookpoint": "layers.{i}.{site}", "features": [ids], "alpha": float,
 "mode": "add"|"clamp", "positions": "all"|"prompt"|"generated", "direction": [d_model floats]
 | null, "gate": {...} | null}

With W_dec as saved on disk and d_f = W_dec[f] / ||W_dec[f]||, add means x + alpha * sum_f d_f,
clamp means each feature's contribution set to alpha * d_f (latent alpha / ||W_dec[f]||), keeping
the SAE error term; an entry with a `direction` u (and no SAE) adds alpha * u / ||u||. A `gate`
({hookpoint, sae, features, weights | direction, reduce, threshold, invert}, `GateSpec`) makes
the edit act on the generated positions of the prompts whose gate opens, and nowhere else."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sae_dist.checkpoint import load_sae
from sae_dist.errors import ConfigError
from sae_dist.hookpoints import Hookpoint
from sae_dist.steer.gate import GateSpec, gated
from sae_dist.steer.interventions import (
    MODES,
    Intervention,
    add_direction,
    add_features,
    clamp_features,
)


@dataclass
class InterventionSpec:
    """One entry of intervention.json: enough to re-apply the edit with any code."""

    sae: str | None
    """Path of the SAE folder (SAELens layout); null for a direction."""
    hookpoint: str
    """`layers.{i}.{site}`."""
    features: list[int]
    """Feature ids of that SAE ([] for a direction)."""
    alpha: float
    """Activation units. add: x + alpha * sum_f d_f (a direction: x + alpha * u / ||u||); clamp:
    each feature's contribution set to alpha * d_f (d_f = W_dec[f] / ||W_dec[f]||, W_dec as
    saved on disk)."""
    mode: str = "add"
    positions: str = "all"
    direction: list[float] | None = None
    """u [d_model] of a direction edit (add only), instead of an SAE's features."""
    gate: GateSpec | None = None
    """The condition on the prompt; null: always on."""

    def __post_init__(self):
        if isinstance(self.gate, dict):
            self.gate = GateSpec(**self.gate)

    def build(self, n_layers: int, device: str | torch.device = "cpu") -> Intervention:
        """Load the SAE(s) and make the Intervention; ConfigError for bad values."""
        if self.mode not in MODES:
            raise ConfigError("intervention.mode", self.mode, ", ".join(MODES))
        hp = Hookpoint.parse(self.hookpoint, n_layers)
        if (self.sae is None) == (self.direction is None):
            raise ConfigError(
                "intervention",
                f"sae={self.sae}, direction={'[...]' if self.direction else None}",
                "exactly one of sae (with features) or direction",
            )
        if self.direction is not None:
            if self.mode != "add":
                raise ConfigError("intervention.mode", self.mode, "add (for a direction)")
            u = torch.tensor(self.direction, dtype=torch.float32)
            iv = add_direction(hp, u / u.norm().clamp_min(1e-12), self.alpha, self.positions)
        else:
            assert self.sae is not None, "checked above: exactly one of sae or direction"
            sae, _ = load_sae(Path(self.sae), device)
            build = add_features if self.mode == "add" else clamp_features
            iv = build(hp, sae.eval(), self.features, self.alpha, self.positions)
        return iv if self.gate is None else gated(iv, self.gate.build(n_layers, device))


def save_interventions(specs: Sequence[InterventionSpec], path: Path) -> None:
    Path(path).write_text(json.dumps([asdict(s) for s in specs], indent=2) + "\n")


def load_interventions(path: Path) -> list[InterventionSpec]:
    """Read intervention.json; ConfigError naming the file when it is malformed."""
    try:
        raw = json.loads(Path(path).read_text())
        items = raw if isinstance(raw, list) else [raw]
        return [InterventionSpec(**item) for item in items]
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError(
            "intervention",
            str(path),
            "a JSON list of {sae, hookpoint, features, "
            f"alpha, mode, positions[, direction, gate]}} objects ({e})",
        ) from e
