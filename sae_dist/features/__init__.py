"""The feature browser (DESIGN.md section 9b): one streaming pass over held-out tokens per
suite (`collect`), an LLM-free interpretability score (`score`), and a static report that opens
from disk (`report`); `command` is the `python -m sae_dist.features` command."""

from sae_dist.features.command import run_features

__all__ = ["run_features"]
