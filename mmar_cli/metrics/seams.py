"""Seams between image tokens: whether a generated image looks like one picture or a patchwork of tiles.

A token covers a `cell` x `cell` block of pixels (the patch size, or the VAE's downsampling times its
patch size). Where neighbouring tokens were drawn inconsistently, the pixel step across their shared edge
is larger than the steps inside a token. The seam ratio compares the two:

    steps(images) = mean |x[i+1] - x[i]| over neighbouring pixel pairs (rows and columns, all channels)
                    that straddle a token boundary, divided by the same mean over pairs inside a token
    seam ratio    = steps(generated) / steps(true images of the same prompts)

1.0: the generated images' token boundaries are no more visible than the data's; 2.0: twice as sharp.
"""

from __future__ import annotations

import numpy as np


def boundary_step_ratio(images: np.ndarray, cell: int) -> float:
    """uint8 [B, H, W, C] -> mean absolute pixel step across token boundaries / the same inside tokens."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] % cell or x.shape[2] % cell or cell < 2:
        raise ValueError(f"seams need [B, H, W, C] images tiled by {cell}-pixel tokens, got {x.shape}")
    across, inside = [], []
    for axis in (1, 2):
        steps = np.abs(np.diff(x, axis=axis))                     # step i: pixel i -> i + 1
        on_edge = (np.arange(steps.shape[axis]) + 1) % cell == 0  # i + 1 starts a new token
        across.append(np.compress(on_edge, steps, axis=axis).ravel())
        inside.append(np.compress(~on_edge, steps, axis=axis).ravel())
    inside_mean = np.concatenate(inside).mean()
    return float(np.concatenate(across).mean() / max(inside_mean, 1e-6))


def seam_ratio(generated: np.ndarray, true: np.ndarray, cell: int) -> float:
    """boundary_step_ratio of the generated images over that of the true ones (1.0: no visible seams)."""
    return boundary_step_ratio(generated, cell) / boundary_step_ratio(true, cell)
