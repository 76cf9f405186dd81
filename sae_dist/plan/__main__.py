"""`python -m sae_dist.plan` / `sae-plan`: compose the training config plus `plan` and print
the plan."""

from sae_dist.cli import run_hydra
from sae_dist.config import PlanRunConfig
from sae_dist.plan.command import run_plan


def main() -> None:
    """The command line (sae_dist.cli: overrides, --help, one-line errors)."""
    run_hydra("plan", PlanRunConfig, run_plan)


if __name__ == "__main__":
    main()
