"""Sampling speed and quality on one checkpoint: default vs MAR's reference settings, the prompt's KV
cache, guidance in one batch, and text decoding with and without the KV cache.

The variants without an optimisation are built around the model's own generate_images(), never a copy
of it: `RecomputePrefix` stands in for the backbone and re-runs the prompt in every iteration, and
"guidance in two passes" runs the conditional and the unconditional rows as two separate batches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from mmar_cli.config import GenerationConfig
from mmar_cli.data import checker, shapes
from mmar_cli.data.sequence import T2I, UNCOND
from mmar_cli.inference import InferenceModel, row_generators
from mmar_cli.model.generate import generate_images

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PRESET = ROOT / "configs" / "sample" / "mar-reference.yaml"
DEMO_PRESET = ROOT / "configs" / "sample" / "demo.yaml"  # the defaults, best of gen.candidates


def generation_config(preset: Optional[Path] = None, **overrides):
    """GenerationConfig defaults, or a sample preset's `gen:` section, with `overrides`."""
    gen = OmegaConf.structured(GenerationConfig)
    if preset is not None:
        gen = OmegaConf.merge(gen, OmegaConf.load(preset).gen)
    return OmegaConf.merge(gen, overrides)


def describe(gen, tokens: Optional[int] = None) -> str:
    """The settings in words; `tokens`: image tokens per image (iterations run at most one per token)."""
    guidance = f"CFG {gen.cfg:g} ({gen.cfg_schedule})" if gen.cfg != 1 else "no CFG"
    its = f"{gen.iterations} iterations"
    if tokens is not None and gen.iterations > tokens:
        its += f" (run as {tokens}: one per image token)"
    end = gen.temperature_end
    temperature = f"temperature {gen.temperature:g}" + ("" if end is None else f"→{end:g}")
    best = f", best of {gen.candidates} by caption likelihood" if gen.candidates > 1 else ""
    steps = f"{gen.diffusion_steps} {gen.sampler.upper()} steps"
    return f"{its} × {steps}, {guidance}, {temperature}, {gen.precision}{best}"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def fastest(fn, min_seconds: float = 0.0):
    """(fn's output, the fastest of as many runs as fill `min_seconds` (at least one), runs), as timeit
    does: a run of a few seconds moves by a third with the machine's load."""
    out, seconds = timed(fn)
    times = [seconds]
    while sum(times) < min_seconds:
        times.append(timed(fn)[1])
    return out, min(times), len(times)


# --------------------------------------------------------------------------------------------------
# Prompts and accuracy
# --------------------------------------------------------------------------------------------------
def shapes_samples(n: int, image_size: int) -> List[dict]:
    """Held-out built-in samples: their captions are the prompts, their renders the images to caption."""
    return list(shapes.iterate("test", n, image_size=image_size))


def checker_accuracy(images: np.ndarray, prompts: List[str]) -> float:
    """% of images the checker reads as every attribute their prompt asks for."""
    hits = [checker.score(image, shapes.parse_caption(p))["all"] for image, p in zip(images, prompts)]
    return 100.0 * sum(hits) / len(hits)


def images_per_second(inf: InferenceModel, prompts: List[str], gen, batch_size: int,
                      min_seconds: float = 0.0) -> dict:
    """Images/s of the fastest of as many runs as fill `min_seconds` (every run draws the same images)."""
    images, seconds, runs = fastest(lambda: inf.text_to_image(prompts, gen, seed=0, batch_size=batch_size),
                                    min_seconds)
    return {"settings": describe(gen, inf.layout.num_image_tokens), "candidates": gen.candidates,
            "images_s": len(prompts) / seconds,
            "seconds": seconds, "runs": runs, "accuracy": checker_accuracy(images, prompts)}


# --------------------------------------------------------------------------------------------------
# Prompt cache
# --------------------------------------------------------------------------------------------------
class RecomputePrefix(nn.Module):
    """Stands in for `model.backbone` in generate_images() with no KV cache: the "cache" keeps the
    prompt's embeddings and mask, and each image iteration runs the backbone on prompt + image."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone
        self.embed_tokens = backbone.embed_tokens

    def new_cache(self) -> dict:
        return {}

    def forward(self, x, positions, mask, cache: dict, update_cache: bool = True, keep=None):
        if update_cache:  # the prompt pass: remember it, compute nothing
            cache.update(x=x, positions=positions, mask=mask)
            return x
        prompt_mask, P = cache["mask"], cache["x"].shape[1]
        # the prompt's rows see only the prompt (causal): nothing of the image
        prompt_rows = torch.cat((prompt_mask, prompt_mask.new_zeros(*prompt_mask.shape[:3], mask.shape[3] - P)), 3)
        return self.inner(torch.cat((cache["x"], x), 1), torch.cat((cache["positions"], positions)),
                          torch.cat((prompt_rows, mask), dim=2), keep=None if keep is None else P + keep)


def prompt_cache_speedup(inf: InferenceModel, prompts: List[str], gen, min_seconds: float = 0.0) -> dict:
    """generate_images() with the prompt's keys/values cached vs the prompt re-run every iteration (each
    timed as the fastest of runs filling `min_seconds`)."""
    model = inf.model
    prefix = inf.encode(T2I, prompts).to(inf.device)
    def run():
        with inf.autocast(gen):
            return generate_images(model, prefix, None, gen, row_generators(0, 0, len(prompts)))

    cached, with_cache, _ = fastest(run, min_seconds)
    backbone = model.backbone
    model.backbone = RecomputePrefix(backbone)
    try:
        recomputed, without_cache, _ = fastest(run, min_seconds)
    finally:
        model.backbone = backbone
    return {"with_s": with_cache, "without_s": without_cache, "speedup": without_cache / with_cache,
            "max_diff": float((cached - recomputed).abs().max())}


def batched_cfg_speedup(inf: InferenceModel, prompts: List[str], gen, min_seconds: float = 0.0) -> dict:
    """Guided generation with cond + uncond rows in one batch vs the same rows as two separate batches
    (each timed as the fastest of runs filling `min_seconds`)."""
    model = inf.model
    prefix = inf.encode(T2I, prompts).to(inf.device)
    uncond = inf.encode(UNCOND, [""]).expand(len(prompts), -1).to(inf.device)
    def run(rows, unconditional):
        with inf.autocast(gen):
            return generate_images(model, rows, unconditional, gen, row_generators(0, 0, len(prompts)))

    one_batch = fastest(lambda: run(prefix, uncond), min_seconds)[1]
    cond_pass = fastest(lambda: run(prefix, None), min_seconds)[1]
    uncond_pass = fastest(lambda: run(uncond, None), min_seconds)[1]
    return {"one_batch_s": one_batch, "two_passes_s": cond_pass + uncond_pass,
            "speedup": (cond_pass + uncond_pass) / one_batch}


# --------------------------------------------------------------------------------------------------
# Image -> text
# --------------------------------------------------------------------------------------------------
def captions_per_second(inf: InferenceModel, samples: List[dict], gen, batch_size: int) -> dict:
    """Captions of true renders, decoded with and without the KV cache (greedy: the same captions)."""
    tokens = inf.image_tok.encode(np.stack([x["image"] for x in samples]))
    questions = [None] * len(samples)
    result = {}
    for use_cache in (True, False):
        captions, seconds = timed(lambda: inf.image_to_text(tokens, questions, gen, 0, batch_size, use_cache))
        result["cached" if use_cache else "uncached"] = {"captions_s": len(samples) / seconds, "seconds": seconds,
                                                          "captions": captions}
    truth = [x["caption"] for x in samples]
    result["exact"] = 100.0 * np.mean([c == t for c, t in zip(result["cached"]["captions"], truth)])
    result["same"] = result["cached"]["captions"] == result["uncached"]["captions"]
    result["speedup"] = result["uncached"]["seconds"] / result["cached"]["seconds"]
    result["max_new_tokens"] = gen.max_new_tokens
    return result

