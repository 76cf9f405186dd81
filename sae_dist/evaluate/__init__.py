"""Evaluation of SAEs on held-out tokens (DESIGN.md section 8).

`evaluator` runs one clean forward per batch and the spliced passes of every SAE,
`reconstruction` and `model_level` hold the metric accumulators, `outputs` the tables and plots,
`command` the `python -m sae_dist.evaluate` command."""

from sae_dist.evaluate.evaluator import evaluate_saes, scalar_metrics
from sae_dist.evaluate.model_level import NextTokenScorer, ce_positions
from sae_dist.evaluate.outputs import pyplot

__all__ = ["NextTokenScorer", "ce_positions", "evaluate_saes", "pyplot", "scalar_metrics"]
