"""Reads shape, colour, size and position back from an image: the judge of generated images.

Analytic, so there is nothing to train or ship:
  background  the median of the border pixels (shapes cover only a few of them)
  foreground  pixels far from the background colour, split into connected blobs, largest first
  colour      the palette entry nearest to a blob's median colour
  shape       the shape whose mask, stretched to the blob's bounding box, overlaps the blob best (IoU)
  size        the side a shape of that kind with the blob's area would have, against the small/large midpoint
  position    the bounding box's centre, in thirds of the image

It always answers: on a noisy generated image or one with no visible shape it falls back to the pixels
that stand out most, so a bad image is scored wrong rather than crashing the evaluation.
Accuracy on true renders is measured in tests/test_checker.py.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from mmar_cli.data.shapes import COLOURS, POSITIONS, SHAPES, size_px, unit_mask

ATTRIBUTES = ["shape", "colour", "size", "position"]
# Palette colours are >= 130 from every background; half of that separates shape from background even
# on a blurred edge or a noisy generated image.
FOREGROUND_DISTANCE = 65.0
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _blobs(image: np.ndarray, max_shapes: int) -> List[np.ndarray]:
    """Boolean masks of up to `max_shapes` foreground blobs, largest first; never empty."""
    distance = np.linalg.norm(image.astype(np.float32) - _background(image), axis=-1)
    foreground = distance > FOREGROUND_DISTANCE
    if not foreground.any():  # nothing visible: the best guess is whatever stands out most
        foreground = distance >= distance.max() * 0.5
    labels, count = ndimage.label(foreground)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-areas, kind="stable")
    # A second blob counts only if it could be a shape (a quarter of a small one), not a speck of noise.
    min_area = 0.25 * size_px("small", image.shape[0]) ** 2
    keep = [i for n, i in enumerate(order[:max_shapes]) if n == 0 or areas[i] >= min_area]
    return [labels == i + 1 for i in keep]


def _read_blob(image: np.ndarray, blob: np.ndarray) -> Dict[str, str]:
    size = image.shape[0]
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = blob[y0:y1, x0:x1]

    templates = {shape: unit_mask(shape, *crop.shape) for shape in SHAPES}
    shape = max(SHAPES, key=lambda s: (templates[s] & crop).sum() / (templates[s] | crop).sum())
    side = np.sqrt(blob.sum() / templates[shape].mean())
    large = side > np.sqrt(size_px("small", size) * size_px("large", size))

    colour = np.median(image[blob].astype(np.float32), axis=0)
    colour_name = list(COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - colour, axis=-1)))]

    col = min(int((x0 + x1) / 2 * 3 / size), 2)
    row = min(int((y0 + y1) / 2 * 3 / size), 2)
    return {"shape": shape, "colour": colour_name, "size": "large" if large else "small",
            "position": POSITIONS[3 * row + col]}


def read(image: np.ndarray, max_shapes: int = 1) -> List[Dict[str, str]]:
    """Attributes (shape, colour, size, position) of up to `max_shapes` shapes in a uint8 [H, W, 3] image.

    Returns at least one guess, largest shape first.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"checker expects a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return [_read_blob(image, blob) for blob in _blobs(image, max_shapes)]


def score(image: np.ndarray, expected: Sequence[dict]) -> Dict[str, bool]:
    """Whether an image shows the expected shapes: per attribute and `all`, whatever the shapes' order.

    With two shapes, the read shapes are matched to the expected ones in the order that gets the most
    attributes right; a shape that was not found counts as wrong on every attribute.
    """
    found: List[Optional[dict]] = list(read(image, max_shapes=len(expected)))
    found += [None] * (len(expected) - len(found))

    def matches(order) -> np.ndarray:  # [shape, attribute] booleans
        return np.array([[f is not None and f[a] == e[a] for a in ATTRIBUTES] for f, e in zip(order, expected)])

    best = max((matches(order) for order in itertools.permutations(found)), key=lambda m: m.sum())
    result = {a: bool(best[:, i].all()) for i, a in enumerate(ATTRIBUTES)}
    result["all"] = bool(best.all())
    return result


def accuracy(images: Sequence[np.ndarray], expected: Sequence[Sequence[dict]]) -> Dict[str, float]:
    """Share of images right on each attribute and on all of them (the keys of `score`)."""
    scores = [score(image, attrs) for image, attrs in zip(images, expected)]
    return {key: float(np.mean([s[key] for s in scores])) for key in ATTRIBUTES + ["all"]}
