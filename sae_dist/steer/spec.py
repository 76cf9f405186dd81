"""`intervention.json`: a list of {"sae": SAE folder, "hookpoint": "layers.{i}.{site}",
"features": [ids], "alpha": float, "mode": "add"|"clamp", "positions": "all"|"prompt"|
"generated"}, enough to re-apply an edit with any code. With W_dec as saved on disk and d_f =
W_dec[f] / ||W_dec[f]||, add means x + alpha * sum_f d_f, clamp means each feature's
contribution set to alpha * d_f (latent alpha / ||W_dec[f]||), keeping the SAE error term."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from sae_dist.checkpoint import load_sae
from sae_dist.errors import ConfigError
from sae_dist.hookpoints import Hookpoint
from sae_dist.steer.interventions import MODES, Intervention, add_features, clamp_features


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


