"""How faithfully the image tokenizer reconstructs images: PSNR and SSIM (torchmetrics), measured on
images that never were tokens (the built-in samples drawn again from their JSON: `builtin_renders`).

Images are compared in [0, 1]. A lossless tokenizer (`patch`) gives PSNR = inf and SSIM = 1; inf is
kept as a float here and written as the string "inf" in metrics.json (JSON has no infinity).
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional

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


def tokenizer_reconstruction(image_tok, originals: np.ndarray) -> Dict[str, float]:
    """PSNR/SSIM of encode -> decode on uint8 images."""
    decoded = np.concatenate([image_tok.decode(image_tok.encode(originals[i:i + 64]))
                              for i in range(0, len(originals), 64)])
    m = reconstruction_metrics(originals, decoded)
    return {"tok.psnr": m["psnr"], "tok.ssim": m["ssim"]}


def builtin_renders(samples: List[dict], image_size: int) -> Optional[tuple[np.ndarray, dict]]:
    """The held-out built-in samples drawn again from their attributes, background and jitter (in each
    sample's JSON): images that never were tokens. None when a sample lacks them (other data, older shards)."""
    from PIL import Image

    from mmar_cli.data.shapes import render
    from mmar_cli.data.sources import center_square

    if not all({"attributes", "background", "jitter", "size"} <= set(s["meta"]) for s in samples):
        return None
    images = []
    for s in samples:
        m = s["meta"]
        image = render(m["attributes"], m["background"], m["size"][0], [tuple(j) for j in m["jitter"]])
        images.append(image if m["size"][0] == image_size else center_square(Image.fromarray(image), image_size))
    originals = np.stack(images)
    reference = {"set": f"the {len(samples)} held-out built-in samples rendered again from their JSON",
                 "sha256": hashlib.sha256(originals.tobytes()).hexdigest()}
    return originals, reference
