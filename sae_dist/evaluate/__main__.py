"""`python -m sae_dist.evaluate` / `sae-evaluate`: compose the eval config and run it."""

from sae_dist.cli import run_hydra
from sae_dist.config import EvalRunConfig
from sae_dist.evaluate.command import run_evaluation


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("eval", EvalRunConfig, run_evaluation)


if __name__ == "__main__":
    main()
