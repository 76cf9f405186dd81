"""Training: one SAE per hookpoint, all fed by one streaming producer (DESIGN.md section 7).

`loop` holds the run (`train`, the loop and its checkpoints), `suite_trainer` the SAEs of one
process with their optimizer, `results` the end of a run (evaluate, save the suite, report)."""

from sae_dist.train.loop import train

__all__ = ["train"]
