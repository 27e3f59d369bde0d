"""Image augmentation done once, at tokenize: copies of a training image that image -> text training reads
in place of the image, at random per sample and epoch (`image_tokenizer.shifts`)."""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from mmar_cli.data import sources


def shifted_copies(images: np.ndarray, keys: List[str], copies: int, max_px: int, max_deg: float = 0.0,
                   max_scale: float = 0.0, warp_px: float = 0.0) -> np.ndarray:
    """uint8 [B, H, W, 3] -> [B, copies, H, W, 3]: each image moved by a whole number of pixels up to `max_px`
    each way, turned by up to `max_deg` degrees and scaled by 1 +- up to `max_scale` about its centre, and
    with `warp_px` > 0 bent by a smooth random displacement field (an elastic distortion: white noise blurred
    by a Gaussian of std 1/8 of the side, rescaled to a std of `warp_px` pixels). Bilinear; outside the
    image the edge pixels are repeated. The draws come from a generator seeded by the sample's key, so a
    sample's copies are the same for any worker count or shard size."""
    b, h, w, _ = images.shape
    theta = np.zeros((b, copies, 2, 3))
    noise = np.zeros((b, copies, 2, h, w), np.float32)
    for i, key in enumerate(keys):
        rng = np.random.default_rng(sources.key_hash("shift", key))
        dy, dx = (rng.integers(0, 2 * max_px + 1, (copies, 2)) - max_px).T
        angle = np.deg2rad(rng.uniform(-max_deg, max_deg, copies)) if max_deg else np.zeros(copies)
        scale = 1 + rng.uniform(-max_scale, max_scale, copies) if max_scale else np.ones(copies)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        # output pixel (x, y) reads input (A [x, y] + t) in grid_sample's [-1, 1] coordinates
        theta[i, :, 0] = np.stack([cos, -sin * h / w, 2 * dx / w], -1)
        theta[i, :, 1] = np.stack([sin * w / h, cos, 2 * dy / h], -1)
        if warp_px:
            noise[i] = rng.standard_normal((copies, 2, h, w))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().repeat_interleave(copies, 0)
    grid = F.affine_grid(torch.from_numpy(theta).float().reshape(-1, 2, 3), list(x.shape), align_corners=False)
    if warp_px:
        grid = grid + _smooth_field(torch.from_numpy(noise).reshape(-1, 2, h, w), warp_px)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(b, copies, h, w, 3).numpy()


def _smooth_field(noise: torch.Tensor, std_px: float) -> torch.Tensor:
    """White noise [N, 2, H, W] -> a smooth displacement [N, H, W, 2] in grid_sample's units (x, y), whose
    values have a std of `std_px` pixels: blurred by a Gaussian of std side / 8 (each field on its own)."""
    n, _, h, w = noise.shape
    sigma = max(h, w) / 8
    r = int(3 * sigma)
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    g = (g / g.sum()).to(noise.dtype)
    x = noise.reshape(n * 2, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))  # separable: along x,
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))  # then along y
    x = x.reshape(n, 2, h, w)
    x = x / x.flatten(1).std(1).clamp(min=1e-8)[:, None, None, None] * std_px
    # pixels -> [-1, 1] units: x along the width, y along the height
    return torch.stack([x[:, 0] * 2 / w, x[:, 1] * 2 / h], -1)
