"""Planning a run before renting it (DESIGN.md section 12): per process memory, step time,
throughput, wall-clock and cost of a training config under every trainer, from the model
built on the meta device and the real SAE classes, sharding rules and DeepSpeed settings."""

from sae_dist.plan.command import Planner, TrainerPlan, plan_run, run_plan

__all__ = ["Planner", "TrainerPlan", "plan_run", "run_plan"]
