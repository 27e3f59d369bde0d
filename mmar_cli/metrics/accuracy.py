"""Accuracy of what a model says about an image, and of what it draws: exact match and per attribute.

Captions of the built-in dataset are parsed back into attributes (`shapes.parse_caption`), so a caption
that gets the colour right and the position wrong scores 1 on colour and 0 on position rather than
a flat 0. A caption that does not parse counts as wrong on every attribute.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

from mmar_cli.data.checker import ATTRIBUTES
from mmar_cli.data.shapes import parse_caption
from mmar_cli.errors import UserError


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: the form exact match compares."""
    return " ".join(text.lower().split()).rstrip(".")


def exact_match(predictions: Sequence[str], truths: Sequence[str]) -> float:
    if not truths:
        return float("nan")
    return sum(normalise(p) == normalise(t) for p, t in zip(predictions, truths)) / len(truths)


def attribute_hits(found: Sequence[dict], expected: Sequence[dict]) -> Dict[str, bool]:
    """Per attribute (and `all`): every expected shape matched, pairing shapes in the best order.

    Missing shapes are wrong on every attribute; extra shapes are ignored, as the checker does.
    """
    padded: List[Optional[dict]] = list(found)[: len(expected)]
    padded += [None] * (len(expected) - len(padded))

    def hits(order) -> Dict[str, bool]:
        return {a: all(f is not None and f[a] == e[a] for f, e in zip(order, expected)) for a in ATTRIBUTES}

    best = max((hits(order) for order in itertools.permutations(padded)), key=lambda h: sum(h.values()))
    best["all"] = all(best.values())
    return best


def caption_hits(caption: str, expected: Sequence[dict]) -> Dict[str, bool]:
    try:
        found = parse_caption(caption)
    except UserError:
        found = []
    return attribute_hits(found, expected)


def mean_hits(hits: Sequence[Dict[str, bool]]) -> Dict[str, float]:
    """Share of rows right on each attribute and on `all`."""
    keys = ATTRIBUTES + ["all"]
    if not hits:
        return {k: float("nan") for k in keys}
    return {k: sum(h[k] for h in hits) / len(hits) for k in keys}
