"""sae_dist: train, evaluate and steer with suites of sparse autoencoders on instruct LMs."""

__version__ = "0.1.0"
