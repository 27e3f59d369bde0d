"""FID between generated and held-out images: clean-fid's Inception when its weights are on disk, else
the in-project extractor (`features.py`), labelled as not comparable to published numbers.

Nothing is ever downloaded: the Inception file is looked for where the user points (`--fid-weights`) or
in clean-fid's own cache, and clean-fid is only asked to load it with `download=False`. Images are
resized to 299x299 with clean-fid's "clean" resizer (PIL bicubic on float values), as `compute_fid`
does, and the Frechet distance is clean-fid's.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from mmar_cli.errors import UserError
from mmar_cli.metrics import features

INCEPTION_FILE = "inception-2015-12-05.pt"
# clean-fid keeps (and would download) its Inception torchscript file here on Linux/macOS.
CLEANFID_CACHE = Path("/tmp")
# Below this many samples FID is biased upward (it grows as 1/N); compare figures only at equal N.
MIN_UNBIASED = {"gen.fid": 2048, "gen.fid_proxy": 640}


def find_inception(path: Optional[str]) -> Optional[Path]:
    """The Inception weights file: `path` (a file or the directory holding it), else clean-fid's cache,
    else None. A `path` that does not hold it is an error, not a silent fallback."""
    if path is None:
        cached = CLEANFID_CACHE / INCEPTION_FILE
        return cached if cached.is_file() else None
    p = Path(path)
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        raise UserError(f"fid_weights: {p} does not exist; expected clean-fid's Inception torchscript "
                        f"file {INCEPTION_FILE} (or the directory holding it)")
    if p.name != INCEPTION_FILE:
        raise UserError(f"fid_weights: {p} must be named {INCEPTION_FILE} (clean-fid loads it by that name)")
    return p


def missing_weights_message() -> str:
    return (f"FID: Inception weights not found; put {INCEPTION_FILE} in {CLEANFID_CACHE}/ (clean-fid's "
            f"cache) or pass fid_weights=PATH. Using the in-project extractor ({features.NAME} v"
            f"{features.VERSION}): its FID is reported as gen.fid_proxy, not comparable to published FIDs.")


class InceptionFeatures:
    """clean-fid's Inception-v3 (2015-12-05 torchscript) pool features in its 'clean' mode."""

    def __init__(self, path: Path, device: torch.device, batch_size: int = 64):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.model = InceptionV3W(str(path.parent), download=False).to(device).eval()
        self.resize = build_resizer("clean")
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = np.stack([self.resize(img) for img in images[i:i + self.batch_size]])  # float 0..255
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
            out.append(self.model(x).double().cpu().numpy())
        return np.concatenate(out)


@dataclass
class FeatureExtractor:
    metric: str  # the name the FID is reported under
    evaluator: str
    comparable: bool  # with published FIDs
    extract: Callable[[np.ndarray], np.ndarray]


def feature_extractor(fid_weights: Optional[str], device: torch.device) -> FeatureExtractor:
    path = find_inception(fid_weights)
    if path is not None:
        return FeatureExtractor("gen.fid", f"clean-fid {version('clean-fid')} clean mode, {path.name}", True,
                                InceptionFeatures(path, device))
    return FeatureExtractor("gen.fid_proxy", f"{features.NAME} v{features.VERSION} (mmar_cli/metrics/"
                            f"features.py)", False, features.RandomConvFeatures())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    from cleanfid.fid import frechet_distance as clean_frechet

    stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (feats_a, feats_b)]
    # With fewer samples than features the covariances are singular: clean-fid regularises them and says
    # so on stdout and in warnings; the report's note about the sample count covers it.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = clean_frechet(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    return max(float(value), 0.0)  # round-off makes identical sets come out a hair below zero


def fid(generated: np.ndarray, reference: np.ndarray, extractor: FeatureExtractor) -> dict:
    """FID of generated against reference images, from their features by `extractor.extract` ([N, F]
    each), with how it was computed."""
    if len(generated) < 2 or len(reference) < 2:
        raise UserError("FID needs at least 2 generated and 2 reference images (raise num_samples)")
    value = frechet_distance(generated, reference)
    n = min(len(generated), len(reference))
    note = "" if n >= MIN_UNBIASED[extractor.metric] else (
        f"only {n} samples: FID is biased upward below ~{MIN_UNBIASED[extractor.metric]}; compare only "
        f"figures computed with the same number of samples")
    if not extractor.comparable:
        note = ("in-project features: not comparable to published FIDs. " + note).strip()
    return {"name": extractor.metric, "value": value, "evaluator": extractor.evaluator,
            "comparable": extractor.comparable, "note": note}
