"""Image tokenizers side by side on the built-in dataset: patch, pca and ae (`mmar_cli/tokenizers/image.py`).

Each tokenizer is fitted as `mmar tokenize` fits it (pca: the first 512 training images; ae: the first
`ae_images`, trained for `ae_steps`), then the held-out test images, drawn again from their JSON as
evaluate does (`metrics.recon.builtin_renders`), go through encode -> decode. Per tokenizer:

    fit s          seconds to fit (pca basis / ae training)
    mse, psnr      of the reconstructions (pixels in [0, 255]; PSNR in dB, data range 1)
    seam           seam ratio of the reconstructions against the true images (`metrics/seams.py`; 1.0: none)
    background     share of reconstructions whose background is one colour (`checker.background_coherent`)
    checker all    share of reconstructions whose shape, colour, size and position the checker reads right
    token std      the tokens' per-channel std on the test images: min / median / max
    noisy ...      the same three measures after adding N(0, noise^2) to every token value (tokens have unit
                   std): how forgiving the decoder is of tokens a diffusion head draws a little off

    OMP_NUM_THREADS=1 python benchmarks/bench_tokenizers.py --threads 1
    python benchmarks/bench_tokenizers.py --kinds ae ae_width=24 ae_steps=800    # key=value: image_tokenizer keys
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import numpy as np
import torch
from omegaconf import OmegaConf

from mmar_cli.config import ImageTokenizerConfig, ShapesConfig
from mmar_cli.data import checker, sources
from mmar_cli.machine import cpu_model
from mmar_cli.metrics.recon import builtin_renders, reconstruction_metrics
from mmar_cli.metrics.seams import seam_ratio
from mmar_cli.tokenizers.image import build_image_tokenizer

FIT_IMAGES = 512  # as stages/tokenize.py
TARGETS = {"seam": ("<=", 1.1), "background": (">=", 0.97), "checker all": (">=", 0.98)}


def builtin_split(split: str, n: int, image_size: int = 32):
    """(uint8 images [n, S, S, 3], the samples with their JSON) of the built-in dataset, as tokenize loads them."""
    shapes_cfg = OmegaConf.structured(ShapesConfig)
    samples = [sources.load_record(r, image_size) for r in sources.list_builtin(split, n, shapes_cfg)]
    return np.stack([s["image"] for s in samples]), samples


def round_trip(tok, images: np.ndarray, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(decoded images, tokens) of encode -> (+ noise) -> decode, in batches of 256."""
    gen = torch.Generator().manual_seed(seed)
    decoded, tokens = [], []
    for i in range(0, len(images), 256):
        t = tok.encode(images[i:i + 256])
        tokens.append(t)
        if noise:
            t = t + noise * torch.randn(t.shape, generator=gen)
        decoded.append(tok.decode(t))
    return np.concatenate(decoded), torch.cat(tokens)


def judged(images: np.ndarray, samples: List[dict]) -> Dict[str, float]:
    """Checker's all-attribute accuracy and the background coherence share."""
    right = [checker.score(img, s["meta"]["attributes"])["all"] for img, s in zip(images, samples)]
    coherent = [checker.background_coherent(img, len(s["meta"]["attributes"])) for img, s in zip(images, samples)]
    return {"checker all": float(np.mean(right)), "background": float(np.mean(coherent))}


def measure(name: str, tok, seconds: float, originals: np.ndarray, samples: List[dict], noise: float) -> dict:
    cell = originals.shape[1] // tok.grid[1]
    recon, tokens = round_trip(tok, originals)
    mse = float(np.mean((recon.astype(np.float64) - originals.astype(np.float64)) ** 2))
    row = {"tokenizer": name, "fit s": seconds, "tokens": f"{tok.grid[0] * tok.grid[1]}x{tok.token_dim}",
           "mse": mse, "psnr": reconstruction_metrics(originals, recon)["psnr"],
           "seam": seam_ratio(recon, originals, cell), **judged(recon, samples)}
    std = tokens.reshape(-1, tokens.shape[-1]).std(0)
    row["token std"] = f"{std.min():.2f}/{std.median():.2f}/{std.max():.2f}"
    noisy, _ = round_trip(tok, originals, noise)
    row.update({f"noisy {k}": v for k, v in judged(noisy, samples).items()})
    row["noisy seam"] = seam_ratio(noisy, originals, cell)
    return row


def fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="image_tokenizer key=value settings (ae_width=24 ...)")
    parser.add_argument("--kinds", nargs="+", default=["patch", "pca", "ae"], choices=["patch", "pca", "ae"])
    parser.add_argument("--train", type=int, default=20000, help="training images rendered (ae_images of them fit the ae)")
    parser.add_argument("--test", type=int, default=512, help="held-out test images")
    parser.add_argument("--noise", type=float, default=0.2, help="std of the noise added to tokens (noisy columns)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = OmegaConf.merge(OmegaConf.structured(ImageTokenizerConfig), OmegaConf.from_dotlist(args.overrides))
    test_images, samples = builtin_split("test", args.test)
    originals, _ = builtin_renders(samples, 32)
    assert np.array_equal(originals, test_images)
    train_images, _ = builtin_split("train", args.train if "ae" in args.kinds else FIT_IMAGES)

    rows = [{"tokenizer": "true images", **judged(originals, samples)}]
    for kind in args.kinds:
        kind_cfg = OmegaConf.merge(cfg, {"kind": kind})
        fit = train_images[:FIT_IMAGES] if kind == "pca" else train_images[:kind_cfg.ae_images]
        start = time.perf_counter()
        tok = build_image_tokenizer(kind_cfg, 32, fit if kind != "patch" else None)
        seconds = time.perf_counter() - start
        rows.append(measure(kind, tok, seconds, originals, samples, args.noise))

    print(f"\nbuilt-in shapes: {args.test} test images, fit on {len(train_images)} training images; "
          f"cpu {cpu_model()}, {torch.get_num_threads()} torch threads")
    if "ae" in args.kinds:
        print("ae settings: " + ", ".join(f"{k}={cfg[k]}" for k in cfg if k.startswith("ae_")))
    columns = ["tokenizer", "tokens", "fit s", "mse", "psnr", "seam", "background", "checker all", "token std",
               "noisy seam", "noisy background", "noisy checker all"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    by_name = {r["tokenizer"]: r for r in rows}
    if "pca" in by_name and "ae" in by_name:
        pca, ae = by_name["pca"], by_name["ae"]
        print(f"\nae / pca: mse {ae['mse'] / pca['mse']:.3f}, seam {ae['seam'] / pca['seam']:.3f}, "
              f"fit time {ae['fit s'] / max(pca['fit s'], 1e-9):.0f}x")
    for name in ("pca", "ae"):
        if name in by_name:
            r = by_name[name]
            verdicts = [f"{k} {fmt(r[k])} {op} {bound}: {'met' if (r[k] <= bound if op == '<=' else r[k] >= bound) else 'MISSED'}"
                        for k, (op, bound) in TARGETS.items()]
            print(f"{name} targets: " + "; ".join(verdicts))
    return rows


if __name__ == "__main__":
    main()
