"""Pictures on disk: uint8 [H, W, 3] arrays as PNG files or bytes, and many of them as one grid."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_grid(images: np.ndarray, cols: int, scale: int = 4, gap: int = 2) -> np.ndarray:
    """uint8 [M, H, W, 3] -> one uint8 picture, `cols` per row, each image scaled up `scale` times
    (nearest, so pixels stay visible) on a white background."""
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    m, h, w, _ = images.shape
    rows = -(-m // cols)
    grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[gap + r * (h + gap): gap + r * (h + gap) + h, gap + c * (w + gap): gap + c * (w + gap) + w] = image
    return grid
