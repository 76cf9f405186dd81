"""Publishing a suite where researchers look for SAEs: a SAELens release (the Hugging Face hub
folder and its pretrained_saes.yaml entry) and Neuronpedia's upload layout
(`python -m sae_dist.export`, DESIGN.md sections 6b and 9c)."""

from sae_dist.export.command import run_export

__all__ = ["run_export"]
