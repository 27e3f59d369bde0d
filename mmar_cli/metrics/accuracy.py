"""Accuracy of what a model says about an image, and of what it draws: exact match and per attribute.

Captions of the built-in dataset are parsed back into attributes (`shapes.parse_caption`) and matched as
the checker matches what it reads in an image (`checker.match`), so a caption that gets the colour right
and the position wrong scores 1 on colour and 0 on position rather than a flat 0. A caption that does
not parse counts as wrong on every attribute.
"""

from __future__ import annotations

import re
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
    """Share of rows right on each key of the hit dicts (the checker's attributes and `all`, or a
    classifier's `accuracy`); NaN for the checker's keys when there are no rows."""
    if not hits:
        return {k: float("nan") for k in ATTRIBUTES + ["all"]}
    return {k: sum(h[k] for h in hits) / len(hits) for k in hits[0]}


def caption_accuracy(captions: Sequence[str], samples: Sequence[dict]) -> Dict[str, float]:
    """Exact match of generated captions against the samples' (und.caption.exact) and, where a sample's
    caption is a built-in shapes caption, the share right on each attribute (und.caption.<attribute>)."""
    from mmar_cli.metrics.judges import CheckerJudge

    metrics = {"und.caption.exact": exact_match(captions, [s["caption"] for s in samples])}
    checker = CheckerJudge()
    scored = [(c, checker.expected(s)) for c, s in zip(captions, samples)]
    scored = [caption_hits(c, e) for c, e in scored if e is not None]
    if scored:
        metrics.update({f"und.caption.{k}": v for k, v in mean_hits(scored).items()})
    return metrics


def text_similarity(predictions: Sequence[str], truths: Sequence[str]) -> Dict[str, float]:
    """Corpus BLEU-4 and mean ROUGE-L F-measure (torchmetrics) of generated against true texts, compared
    in `normalise`d form: what exact match misses on free-form captions (a right word order, a synonym)."""
    from torchmetrics.functional.text import bleu_score, rouge_score

    preds, refs = [normalise(p) for p in predictions], [normalise(t) for t in truths]
    bleu = float(bleu_score(preds, [[r] for r in refs], n_gram=4))  # no smoothing: 0 if no text has 4 words
    # ROUGE's own cleaning keeps only [a-z0-9]; word characters of any script are kept here
    words = lambda text: re.sub(r"[^\w]+", " ", text)  # noqa: E731
    rouge = float(rouge_score(preds, refs, rouge_keys=("rougeL",), normalizer=words)["rougeL_fmeasure"])
    return {"bleu4": bleu, "rougeL": rouge}
