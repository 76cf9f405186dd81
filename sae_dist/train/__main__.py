"""`python -m sae_dist.train` / `sae-train`: compose the training config and run it."""

from sae_dist.cli import run_hydra
from sae_dist.config import TrainRunConfig
from sae_dist.train.loop import train


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("train", TrainRunConfig, train)


if __name__ == "__main__":
    main()
