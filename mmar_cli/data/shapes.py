"""The built-in procedural dataset: coloured shapes at named positions, with captions and questions.

Every image is drawn from a small generative space: one or two shapes, each with a shape, a colour, a size
and one of nine grid positions (plus a little jitter), on a plain background. Because the attributes are
known, captions and answers are exact and a generated image can be judged (see `checker.py`).

Sizes are chosen so every attribute stays readable at 32x32: a 7 px circle and square rasterise almost
alike, so the small shapes are 9 px and the large ones 13 px, scaled with the image.

Splits never share an image: a sample's split is a hash of the parameters that fully determine its pixels
(background and each shape's kind, colour, pixel size and pixel position), so the same picture always
lands in the same split, whatever the seed. A sample draws parameters until they hash into its split.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mmar_cli.errors import UserError

SHAPES = ["circle", "square", "triangle", "cross"]
# Well separated from each other (>= 130 apart in RGB) and from every background (>= 130).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 255),
    "yellow": (245, 225, 40),
    "purple": (170, 60, 230),
    "cyan": (40, 220, 230),
}
SIZES = ["small", "large"]
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right"]
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "navy": (20, 30, 90),
}
SPLITS = ["train", "val", "test"]
_COLOUR_NAMES, _BACKGROUND_NAMES = list(COLOURS), list(BACKGROUNDS)

# How a position reads in a caption or a question ("a red circle at the top left", "in the center").
POSITION_PHRASES = {p: ("in the " if p == "center" else "on the " if p in ("left", "right") else "at the ") + p
                    for p in POSITIONS}
_PHRASE_TO_POSITION = {phrase: p for p, phrase in POSITION_PHRASES.items()}
_CELLS = {p: divmod(i, 3) for i, p in enumerate(POSITIONS)}  # (row, col)

# Two-shape images use cells two apart in a row or a column (never neighbours), and a draw whose jitter
# still brings the shapes closer than image_size/16 px is redrawn: two shapes never touch.
_FAR_PAIRS = [(a, b) for a, b in itertools.combinations(range(9), 2)
              if max(abs(a // 3 - b // 3), abs(a % 3 - b % 3)) == 2]
# Hash bucket (out of 10) -> split: 80 % train, 10 % val, 10 % test of the parameter space.
_BUCKET_SPLIT = ["test", "val"] + ["train"] * 8


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------
def size_px(size: str, image_size: int) -> int:
    """Side of a shape's bounding box in pixels: 9 (small) / 13 (large) at 32 px, scaled."""
    return round(image_size * (9 if size == "small" else 13) / 32)


def max_jitter(image_size: int) -> int:
    """Largest shift (pixels, each axis) from a cell's centre: 2 at 32 px."""
    return image_size // 16


def cell_centre(position: str, image_size: int) -> Tuple[float, float]:
    """(x, y) of a grid cell's centre: 7, 16, 25 at 32 px, so a large shape fits at the edge."""
    row, col = _CELLS[position]
    step = image_size * 9 / 32
    return image_size / 2 + (col - 1) * step, image_size / 2 + (row - 1) * step


def unit_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean [height, width] mask of a shape filling that box (pixel centres in unit coordinates).

    The checker compares a segmented shape with these same masks stretched to its bounding box.
    """
    y = ((np.arange(height) + 0.5) / height)[:, None]
    x = ((np.arange(width) + 0.5) / width)[None, :]
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":  # apex up; the half-pixel keeps the apex row visible for even sides
        return np.abs(x - 0.5) <= 0.5 * y + 0.5 / width
    if shape == "cross":  # a plus whose arms are a third of the side wide
        return (np.abs(x - 0.5) <= 1 / 6) | (np.abs(y - 0.5) <= 1 / 6)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@lru_cache(maxsize=None)
def _stamp(shape: str, side: int) -> np.ndarray:
    return unit_mask(shape, side, side)


def _top_left(attr: dict, image_size: int, jitter: Tuple[int, int]) -> Tuple[int, int, int]:
    """(x0, y0, side) of a shape's box; jitter is clamped so the shape stays inside the image."""
    side = size_px(attr["size"], image_size)
    cx, cy = cell_centre(attr["position"], image_size)
    x0 = math.floor(cx + jitter[0] - side / 2 + 0.5)
    y0 = math.floor(cy + jitter[1] - side / 2 + 0.5)
    hi = image_size - side
    return min(max(x0, 0), hi), min(max(y0, 0), hi), side


def render(attributes: Sequence[dict], background: str, image_size: int = 32,
           jitter: Optional[Sequence[Tuple[int, int]]] = None) -> np.ndarray:
    """uint8 [H, W, 3] image of the shapes (dicts of shape, colour, size, position) on a background."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    jitter = jitter or [(0, 0)] * len(attributes)
    for attr, jit in zip(attributes, jitter):
        x0, y0, side = _top_left(attr, image_size, jit)
        image[y0:y0 + side, x0:x0 + side][_stamp(attr["shape"], side)] = COLOURS[attr["colour"]]
    return image


# --------------------------------------------------------------------------------------------------
# Text: captions and questions
# --------------------------------------------------------------------------------------------------
def caption_for(attributes: Sequence[dict]) -> str:
    """'a large red circle at the top left' (and ' and a ...' for a second shape)."""
    return " and ".join(f"a {a['size']} {a['colour']} {a['shape']} {POSITION_PHRASES[a['position']]}"
                        for a in attributes)


def parse_caption(caption: str) -> List[dict]:
    """Inverse of `caption_for`: the attributes a caption asks for. Raises UserError if it is not one."""
    attributes = []
    for phrase in caption.strip().rstrip(".").lower().split(" and "):
        words = phrase.split()
        where = " ".join(words[4:])
        if (len(words) < 6 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLOURS
                or words[3] not in SHAPES or where not in _PHRASE_TO_POSITION):
            raise UserError(
                f"caption {caption!r} is not a shapes caption: expected 'a <size> <colour> <shape> "
                f"<position>' (e.g. 'a large red circle at the top left'), sizes {SIZES}, colours "
                f"{list(COLOURS)}, shapes {SHAPES}, positions {list(_PHRASE_TO_POSITION)}")
        attributes.append({"shape": words[3], "colour": words[2], "size": words[1],
                           "position": _PHRASE_TO_POSITION[where]})
    return attributes


def _question(attributes: Sequence[dict], rng: random.Random) -> Tuple[str, str]:
    # Shapes in one image are distinct kinds at distinct positions, so each question has one answer.
    a = rng.choice(attributes)
    kind = rng.randrange(4)
    if kind == 0:
        return f"what colour is the {a['shape']}?", a["colour"]
    if kind == 1:
        return f"what shape is {POSITION_PHRASES[a['position']]}?", a["shape"]
    if kind == 2:
        return f"where is the {a['colour']} {a['shape']}?", a["position"]
    return f"how big is the {a['colour']} {a['shape']}?", a["size"]


# --------------------------------------------------------------------------------------------------
# Samples and splits
# --------------------------------------------------------------------------------------------------
def split_of(attributes: Sequence[dict], background: str, image_size: int,
             jitter: Sequence[Tuple[int, int]]) -> str:
    """The split an image belongs to, from what fixes its pixels (order of the shapes ignored)."""
    boxes = sorted((a["shape"], a["colour"], *_top_left(a, image_size, j)) for a, j in zip(attributes, jitter))
    digest = hashlib.blake2b(repr((image_size, background, boxes)).encode(), digest_size=8).digest()
    return _BUCKET_SPLIT[int.from_bytes(digest, "little") % len(_BUCKET_SPLIT)]


def _boxes_apart(attributes: Sequence[dict], image_size: int, jitter: Sequence[Tuple[int, int]]) -> bool:
    """Whether two shapes' boxes leave a gap of at least image_size/16 pixels between them."""
    (ax, ay, a_side), (bx, by, b_side) = (_top_left(a, image_size, j) for a, j in zip(attributes, jitter))
    gap = max(bx - ax - a_side, ax - bx - b_side, by - ay - a_side, ay - by - b_side)
    return gap >= image_size // 16


def _draw(rng: random.Random, image_size: int, max_shapes: int):
    count = 1 + rng.randrange(max_shapes)
    first = rng.randrange(len(SHAPES))
    kinds = [first, (first + 1 + rng.randrange(len(SHAPES) - 1)) % len(SHAPES)][:count]
    cells = [rng.randrange(9)] if count == 1 else _FAR_PAIRS[rng.randrange(len(_FAR_PAIRS))]
    j = max_jitter(image_size)
    attributes, jitter = [], []
    for kind, cell in zip(kinds, cells):
        attributes.append({"shape": SHAPES[kind], "colour": _COLOUR_NAMES[rng.randrange(len(COLOURS))],
                           "size": SIZES[rng.randrange(len(SIZES))], "position": POSITIONS[cell]})
        jitter.append((rng.randint(-j, j), rng.randint(-j, j)))
    return attributes, _BACKGROUND_NAMES[rng.randrange(len(BACKGROUNDS))], jitter


def make_sample(split: str, index: int, seed: int = 0, image_size: int = 32, max_shapes: int = 1) -> dict:
    """Sample `index` of a split: image, caption, question, answer, attributes, background, jitter, key."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} of the built-in dataset; expected one of {SPLITS}")
    if max_shapes not in (1, 2):
        raise UserError(f"shapes.max_shapes must be 1 or 2, got {max_shapes}")
    # Python's generator: cheap per scalar draw, and a val/test sample draws ~10 times before its
    # parameters hash into its split. Seeding from a string is stable across platforms and versions.
    rng = random.Random(f"{seed}-{split}-{index}")
    while True:
        attributes, background, jitter = _draw(rng, image_size, max_shapes)
        if len(attributes) == 2 and not _boxes_apart(attributes, image_size, jitter):
            continue
        if split_of(attributes, background, image_size, jitter) == split:
            break
    question, answer = _question(attributes, rng)
    return {
        "image": render(attributes, background, image_size, jitter),
        "caption": caption_for(attributes),
        "question": question,
        "answer": answer,
        "attributes": attributes,
        "background": background,
        "jitter": jitter,
        "key": f"{split}-{index:06d}",
    }


def iterate(split: str, n: int, seed: int = 0, image_size: int = 32, max_shapes: int = 1) -> Iterator[dict]:
    """Samples 0..n-1 of a split."""
    for index in range(n):
        yield make_sample(split, index, seed, image_size, max_shapes)
