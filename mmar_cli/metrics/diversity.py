"""Diversity of generated images next to their accuracy: a model that draws one picture per prompt must
not score as well as one that draws the distribution.

Both measures work on feature vectors (one per image; the evaluation uses the FID extractor's features and
names them in metrics.json):

    precision, recall   Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing
                        generative models": each set's manifold is the union of balls around its points
                        with radius the distance to the point's k-th nearest neighbour in the same set
                        (k = 3). Precision = share of generated points inside the real manifold (are they
                        realistic?); recall = share of real points inside the generated manifold (is the
                        real variety covered?).
    spread              per group (a class, or one prompt): the mean pairwise distance between generated
                        images divided by the same between real images of the group, averaged over the
                        groups with at least two of each. 1.0 = as varied as the data; near-copies -> 0.
"""

from __future__ import annotations

from typing import Dict, Hashable, Sequence

import numpy as np

K_NEAREST = 3


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b)


def _radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour among the others."""
    d = _distances(points, points)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _inside(queries: np.ndarray, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (_distances(queries, points) <= radii[None, :]).any(axis=1)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = K_NEAREST) -> Dict[str, float]:
    """Improved precision and recall of `generated` against `real` features ([N, F] each)."""
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision/recall need more than k={k} images in each set "
                         f"(got {len(real)} real, {len(generated)} generated)")
    precision = _inside(generated, real, _radii(real, k)).mean()
    recall = _inside(real, generated, _radii(generated, k)).mean()
    return {"precision": float(precision), "recall": float(recall)}


def _mean_pairwise(points: np.ndarray) -> float:
    d = _distances(points, points)
    n = len(points)
    return float(d.sum() / (n * (n - 1)))


def group_spread(real: np.ndarray, generated: np.ndarray, groups: Sequence[Hashable]) -> Dict[str, float]:
    """`spread`: mean over groups of (pairwise distance among generated) / (among real), row i of both
    sets in group `groups[i]` (generated image i was drawn from real sample i's prompt), and `groups`: how
    many groups had at least two images (NaN spread when none)."""
    ratios = []
    groups = np.asarray(groups, dtype=object)
    for group in sorted(set(groups.tolist()), key=str):
        rows = groups == group
        if rows.sum() >= 2:
            base = _mean_pairwise(real[rows])
            if base > 0:
                ratios.append(_mean_pairwise(generated[rows]) / base)
    return {"spread": float(np.mean(ratios)) if ratios else float("nan"), "groups": len(ratios)}


def spread_groups(samples: Sequence[dict], label_key: str) -> tuple[list, str]:
    """What the within-group spread compares: the class when every sample has one, else the prompt."""
    from mmar_cli.metrics.judges import read_label

    labels = [read_label(s, label_key) for s in samples]
    if all(label is not None for label in labels):
        return labels, "class"
    return [s["caption"] for s in samples], "prompt"
