"""zipfls-train: Zipf's label smoothing and its baselines, reproducible at any scale."""

__version__ = "0.1.0"
