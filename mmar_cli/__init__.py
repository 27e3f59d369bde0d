"""mmar: train and run MMAR models (continuous image tokens + per-token diffusion head in one transformer)."""

import os

# oneDNN, which runs torch's bf16 matmuls on a CPU, compiles a kernel for each matmul shape and keeps the last
# 1024. Training's shapes change every step (mask ratios, the rows of each task), so with 1024 most matmuls
# compiled their kernel again; keeping 16384 made the demo's pretraining 1.2-1.3x faster for ~0.75 GiB
# (benchmarks/results.md, "Kernel cache"). Set here, before torch is imported; a value in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

__version__ = "0.1.0"
