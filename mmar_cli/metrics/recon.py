"""How faithfully the image tokenizer reconstructs images: PSNR and SSIM (torchmetrics).

Images are compared in [0, 1]. A lossless tokenizer (`patch`) gives PSNR = inf and SSIM = 1; inf is
kept as a float here and written as the string "inf" in metrics.json (JSON has no infinity).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0  # float64: identical images give SSIM 1 exactly


def reconstruction_metrics(originals: np.ndarray, reconstructions: np.ndarray) -> Dict[str, float]:
    """originals, reconstructions: uint8 [B, H, W, 3]. PSNR in dB over the whole set, mean SSIM."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {originals.shape} vs {reconstructions.shape}")
    x, y = _to_unit(originals), _to_unit(reconstructions)
    psnr = float(peak_signal_noise_ratio(y, x, data_range=1.0))
    ssim = float(structural_similarity_index_measure(y, x, data_range=1.0))
    return {"psnr": psnr, "ssim": ssim}
