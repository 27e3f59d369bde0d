"""Reads shape, colour, size and position back from an image: the judge of generated images.

Analytic, so there is nothing to train or ship:
  background  the median of the border pixels (shapes cover only a few of them)
  foreground  pixels nearer to some palette colour than to the background (so a blurred edge splits
              where it should), split into connected blobs, largest first
  shape/size  the rendered template (each shape at each size, at every placement) that overlaps the blob
              best (IoU); fitting whole templates ignores specks of noise that would stretch a bounding box
  position    the centre of that best placement, in thirds of the image
  colour      the palette entry nearest to the blob's median colour

Beside the attributes it reads what a person sees first, whether the picture is one picture:
  background coherence  every pixel outside the drawn shapes (the fitted template and the blob's pixels of
              the blob's own colour, grown by BACKGROUND_MARGIN px for a soft edge) lies within
              BACKGROUND_TOL of the background colour on every channel; a stray block of another grey, a
              speck or a part of the shape in another colour fails it (true renders pass, tokenized and
              decoded ones too: tests)

It always answers: on a noisy generated image or one with no visible shape it falls back to the pixels
that stand out most, so a bad image is scored wrong rather than crashing the evaluation.
Accuracy on true renders, noisy and blurred ones is measured in tests/test_checker.py.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from mmar_cli.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, size_px, unit_mask

ATTRIBUTES = ["shape", "colour", "size", "position"]
BACKGROUND_TOL = 24      # of 255, per channel: the ringing of a lossy tokenizer passes, another grey fails
BACKGROUND_MARGIN = 1    # pixels around a shape that may blend shape and background
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def _background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _blobs(image: np.ndarray, max_shapes: int) -> List[np.ndarray]:
    """Boolean masks of up to `max_shapes` foreground blobs, largest first; never empty."""
    pixels, background = image.astype(np.float32), _background(image)
    # Nearer to a palette colour than to the background: |p - c|^2 < |p - b|^2, where |p|^2 cancels.
    references = np.concatenate([_PALETTE, background[None]])
    scores = (references ** 2).sum(-1)[:, None] - 2 * references @ pixels.reshape(-1, 3).T  # [7, H*W]
    foreground = (scores[:-1].min(0) < scores[-1]).reshape(image.shape[:2])
    if not foreground.any():  # nothing visible: the best guess is whatever stands out most
        to_background = ((pixels - background) ** 2).sum(-1)
        foreground = to_background >= to_background.max() * 0.25
    labels, count = ndimage.label(foreground)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-areas, kind="stable")
    # A second blob counts only if it could be a shape (a quarter of a small one), not a speck of noise.
    min_area = 0.25 * size_px("small", image.shape[0]) ** 2
    keep = [i for n, i in enumerate(order[:max_shapes]) if n == 0 or areas[i] >= min_area]
    return [labels == i + 1 for i in keep]


@lru_cache(maxsize=None)
def _templates(image_size: int):
    """Every (shape, size) drawn at the top-left corner, as conjugate spectra for correlation, with
    the placements (top-left corners) that keep it inside the image, and the drawn masks themselves."""
    count = len(SHAPES) * len(SIZES)
    masks = np.zeros((count, image_size, image_size), np.float32)
    inside = np.zeros((count, image_size, image_size), bool)
    names = []
    for k, (shape, size) in enumerate(itertools.product(SHAPES, SIZES)):
        side = size_px(size, image_size)
        masks[k, :side, :side] = unit_mask(shape, side, side)
        inside[k, :image_size - side + 1, :image_size - side + 1] = True
        names.append((shape, size, side))
    return names, np.conj(np.fft.rfft2(masks)), masks.sum((1, 2))[:, None, None], inside, masks


def _fit(blob: np.ndarray) -> tuple[int, int, int]:
    """(template index, y0, x0) of the template placement that overlaps the blob best (IoU)."""
    n = blob.shape[0]
    _, spectra, template_areas, inside, _ = _templates(n)
    # Overlap of the blob with every template at every shift, by FFT; a shift that wraps around the
    # image edge is no placement a render could have, so it is ruled out.
    overlap = np.fft.irfft2(np.fft.rfft2(blob.astype(np.float32)) * spectra, s=(n, n))
    iou = np.where(inside, overlap / (blob.sum() + template_areas - overlap), -1.0)
    k, y0, x0 = np.unravel_index(int(np.argmax(iou)), iou.shape)
    return int(k), int(y0), int(x0)


def _blob_colour(pixels: np.ndarray, blob: np.ndarray) -> int:
    """Index into the palette of the colour nearest to the blob's median pixel."""
    return int(np.argmin(((_PALETTE - np.median(pixels[blob], axis=0)) ** 2).sum(-1)))


def _read_blob(image: np.ndarray, blob: np.ndarray) -> Dict[str, str]:
    n = image.shape[0]
    k, y0, x0 = _fit(blob)
    shape, size, side = _templates(n)[0][k]

    colour_name = list(COLOURS)[_blob_colour(image.astype(np.float32), blob)]

    row, col = (min(int((corner + side / 2) * 3 / n), 2) for corner in (y0, x0))
    return {"shape": shape, "colour": colour_name, "size": size, "position": POSITIONS[3 * row + col]}


def read(image: np.ndarray, max_shapes: int = 1) -> List[Dict[str, str]]:
    """Attributes (shape, colour, size, position) of up to `max_shapes` shapes in a uint8 [H, W, 3] image.

    Returns at least one guess, largest shape first.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"checker expects a square uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    return [_read_blob(image, blob) for blob in _blobs(image, max_shapes)]


def background_coherent(image: np.ndarray, max_shapes: int = 1) -> bool:
    """Whether every pixel outside the drawn shapes is the background colour (within BACKGROUND_TOL per
    channel). A shape is its best-fitting template (as `read` fits it) together with the pixels of its blob
    that are nearest to the blob's own palette colour, grown by BACKGROUND_MARGIN pixels: a shape drawn a
    little off its template keeps its outline out of the background (its shape is the checker's to judge),
    while a part of it in another colour, a stray speck or a block of another grey counts against it."""
    image = np.asarray(image)
    n = image.shape[0]
    names, *_, masks = _templates(n)
    pixels, background = image.astype(np.float32), _background(image)
    references = np.concatenate([_PALETTE, background[None]])
    nearest = ((pixels[..., None, :] - references) ** 2).sum(-1).argmin(-1)  # [H, W]: palette index or 6
    shapes = np.zeros((n, n), bool)
    for blob in _blobs(image, max_shapes):
        k, y0, x0 = _fit(blob)
        side = names[k][2]
        shapes[y0:y0 + side, x0:x0 + side] |= masks[k, :side, :side] > 0
        shapes |= blob & (nearest == _blob_colour(pixels, blob))
    shapes = ndimage.binary_dilation(shapes, iterations=BACKGROUND_MARGIN)
    off = np.abs(pixels[~shapes] - background).max(initial=0.0)
    return bool(off <= BACKGROUND_TOL)


def match(found: Sequence[dict], expected: Sequence[dict]) -> Dict[str, bool]:
    """Per attribute (and `all`): whether every expected shape is among `found`, whatever the order.

    Shapes are paired in the order that gets the most attributes right; a missing shape is wrong on
    every attribute and shapes beyond the expected count are ignored.
    """
    if not expected:
        raise ValueError("matching needs at least one expected shape")
    padded: List[Optional[dict]] = list(found)[: len(expected)]
    padded += [None] * (len(expected) - len(padded))

    def hits(order) -> np.ndarray:  # [shape, attribute] booleans
        return np.array([[f is not None and f[a] == e[a] for a in ATTRIBUTES] for f, e in zip(order, expected)])

    best = max((hits(order) for order in itertools.permutations(padded)), key=lambda h: h.sum())
    result = {a: bool(best[:, i].all()) for i, a in enumerate(ATTRIBUTES)}
    result["all"] = bool(best.all())
    return result


def score(image: np.ndarray, expected: Sequence[dict]) -> Dict[str, bool]:
    """Whether an image shows the expected shapes: per attribute and `all` (see `match`)."""
    return match(read(image, max_shapes=max(len(expected), 1)), expected)
