"""mmar: train and run MMAR models (continuous image tokens + per-token diffusion head in one transformer)."""

import os

# oneDNN, which runs torch's bf16 matmuls on a CPU, compiles a kernel for each matmul shape and keeps the last
# 1024. Training's shapes change every step (mask ratios, the rows of each task), so with 1024 most matmuls
# compiled their kernel again; keeping 16384 made the demo's training steps 1.22x faster in `make bench` for
# ~0.75 GB more memory, and a whole `make demo` 25.4 -> 23.4 min, while training ran a backbone pass per task.
# With one pass for all rows (model.split_tasks=false, since) `make bench`'s short runs put 1024 at 0.94x the
# time, but 1200-step pretrainings still ran 16384 faster: 304 / 288 against 279 / 268 samples/s
# (benchmarks/results.md, "Training step choices"; docs/RESULTS.md). Set here, before torch is imported; a
# value in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

__version__ = "0.1.0"
