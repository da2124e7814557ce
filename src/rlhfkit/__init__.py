"""rlhfkit: align causal language models with human feedback."""

__version__ = "0.1.0"
