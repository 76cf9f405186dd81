"""`python -m sae_dist.features` / `sae-features`: compose the features config and run it."""

from sae_dist.cli import run_hydra
from sae_dist.config import FeaturesRunConfig
from sae_dist.features.command import run_features


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("features", FeaturesRunConfig, run_features)


if __name__ == "__main__":
    main()
