"""Steering: interventions on a hookpoint's activations during any forward pass or `generate`
(DESIGN.md section 9), contrast sets that score SAE features, and the intervention file.

`interventions` holds the edits and the context manager that applies them, `gate` conditions
read on the prompt that switch gated edits on, `generate` batched generation with them,
`contrast` feature scores between two sets of sequences, `spec` the re-applicable
`intervention.json`, `command` the `python -m sae_dist.steer` command."""

from sae_dist.steer.command import apply_generation_settings
from sae_dist.steer.contrast import (
    ContrastTokens,
    FeatureScores,
    diff_in_means,
    prompt_tokens,
    response_tokens,
    score_features,
    top_contexts,
)
from sae_dist.steer.gate import (
    Gate,
    GateReading,
    GateSpec,
    direction_gate,
    features_gate,
    gated,
)
from sae_dist.steer.generate import Generation, generate, left_pad, render_prompts
from sae_dist.steer.interventions import (
    STEER_POSITIONS,
    Intervention,
    Steering,
    add_direction,
    add_features,
    check_interventions,
    clamp_features,
    decoder_direction,
    steer,
)
from sae_dist.steer.spec import InterventionSpec, load_interventions, save_interventions

__all__ = [
    "STEER_POSITIONS",
    "ContrastTokens",
    "FeatureScores",
    "Gate",
    "GateReading",
    "GateSpec",
    "Generation",
    "Intervention",
    "direction_gate",
    "features_gate",
    "gated",
    "InterventionSpec",
    "Steering",
    "add_direction",
    "add_features",
    "apply_generation_settings",
    "check_interventions",
    "clamp_features",
    "decoder_direction",
    "diff_in_means",
    "generate",
    "left_pad",
    "load_interventions",
    "prompt_tokens",
    "render_prompts",
    "response_tokens",
    "save_interventions",
    "score_features",
    "steer",
    "top_contexts",
]
