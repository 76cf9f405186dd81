"""`python -m sae_dist.export` / `sae-export`: compose the export config and run it."""

from sae_dist.cli import run_hydra
from sae_dist.config import ExportConfig
from sae_dist.export.command import run_export


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("export", ExportConfig, run_export)


if __name__ == "__main__":
    main()
