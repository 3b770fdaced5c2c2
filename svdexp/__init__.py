"""svdexp: config-driven experiments for compressing LLMs with SVD-family methods."""

__version__ = "0.1.0"
