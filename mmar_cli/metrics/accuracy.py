"""Accuracy of what a model says about an image, and of what it draws: exact match and per attribute.

Captions of the built-in dataset are parsed back into attributes (`shapes.parse_caption`) and matched as
the checker matches what it reads in an image (`checker.match`), so a caption that gets the colour right
and the position wrong scores 1 on colour and 0 on position rather than a flat 0. A caption that does
not parse counts as wrong on every attribute.
"""

from __future__ import annotations

from typing import Dict, Sequence

from mmar_cli.data.checker import ATTRIBUTES, match
from mmar_cli.data.shapes import parse_caption
from mmar_cli.errors import UserError


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: the form exact match compares."""
    return " ".join(text.lower().split()).rstrip(".")


def exact_match(predictions: Sequence[str], truths: Sequence[str]) -> float:
    if not truths:
        return float("nan")
    return sum(normalise(p) == normalise(t) for p, t in zip(predictions, truths)) / len(truths)


def caption_hits(caption: str, expected: Sequence[dict]) -> Dict[str, bool]:
    try:
        found = parse_caption(caption)
    except UserError:
        found = []
    return match(found, expected)


def mean_hits(hits: Sequence[Dict[str, bool]]) -> Dict[str, float]:
    """Share of rows right on each attribute and on `all`."""
    keys = ATTRIBUTES + ["all"]
    if not hits:
        return {k: float("nan") for k in keys}
    return {k: sum(h[k] for h in hits) / len(hits) for k in keys}
