"""`python -m sae_dist.steer` / `sae-steer`: compose the steer config and run it."""

from sae_dist.cli import run_hydra
from sae_dist.config import SteerRunConfig
from sae_dist.steer.command import run


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("steer", SteerRunConfig, run)


if __name__ == "__main__":
    main()
