"""lmalign: post-train and evaluate language models from one Hydra entrypoint."""

__version__ = "0.1.0"
