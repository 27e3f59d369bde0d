"""mmar: train and run MMAR models (continuous image tokens + per-token diffusion head in one transformer)."""

__version__ = "0.1.0"
