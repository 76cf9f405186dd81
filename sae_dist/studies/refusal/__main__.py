"""`python -m sae_dist.studies.refusal [suite=<path>] out_dir=<path>`: the refusal case study
(conf/refusal.yaml; the keys of SteerRunConfig and RefusalConfig in sae_dist/config.py)."""

from sae_dist.cli import run_hydra
from sae_dist.config import SteerRunConfig
from sae_dist.studies.refusal.study import run_refusal_study


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("refusal", SteerRunConfig, run_refusal_study)


if __name__ == "__main__":
    main()
