"""The refusal case study: do selected SAE features steer the model toward refusal, at what
cost, against a difference-in-means direction and random features (DESIGN.md section 9).
`python -m sae_dist.studies.refusal [suite=<path>] out_dir=<path>`."""

from sae_dist.studies.refusal.study import run_refusal_study

__all__ = ["run_refusal_study"]
