"""`mmar sample`: text -> image, image -> text, or many samples as shards for evaluation.

    mmar sample --prompt "a large red circle at the top left" --prompt "a small blue cross in the center"
    mmar sample --prompts-file prompts.txt -n 8 --cfg 3 --iterations 64 --steps 100 --sampler ddpm
    mmar sample --image shape.png                                    # caption
    mmar sample --image shape.png --prompt "what colour is the shape?"  # answer
    mmar sample --prompts-file prompts.txt --out-shards runs/samples/shards

Text -> image writes `{out}/{prompt:03d}-{image:02d}.png`, `{out}/grid.png` (a row per prompt) and
`{out}/samples.json` (every setting, the checkpoint's path and sha256, the files). Image -> text prints
the text and writes `{out}/understanding.json`. `--out-shards` writes `samples-000000.tar`, ... (img2dataset
layout: png + txt + json, each under a temporary name renamed when complete) and `samples.json` last.

Image i of prompt p draws from its own generator seeded by (seed, p * num_images + i): a fixed seed gives
the same images whatever the batch size.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from mmar_cli import __version__
from mmar_cli.cli_common import CONFIG_HELP, OVERRIDES_HELP, command_line, handle_errors, single_command_app
from mmar_cli.config import SampleConfig, load_config, to_container
from mmar_cli.errors import UserError, console
from mmar_cli.pictures import image_grid, png_bytes, save_png
from mmar_cli.progress import progress

SCHEMA = SampleConfig
SHARD_SIZE = 1000  # samples per output shard


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def read_prompts(cfg) -> List[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts_file: {path} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def provenance(cfg, model, seconds: float, count: int, unit: str) -> dict:
    return {"mmar_version": __version__, "command": command_line(),
            "checkpoint": {k: model.source[k] for k in ("path", "weights", "sha256")},
            "config": to_container(cfg), "seconds": round(seconds, 3), f"{unit}_per_s": round(count / seconds, 3)}


def text_to_image(cfg, model, prompts: List[str]) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [p for p in prompts for _ in range(cfg.num_images)]
    start = time.perf_counter()
    with progress("sample images", len(rows)) as advance:
        images = model.text_to_image(rows, cfg.gen, cfg.seed, cfg.batch_size, progress=advance)
    seconds = time.perf_counter() - start
    files = []
    for i, image in enumerate(images):
        p, k = divmod(i, cfg.num_images)
        files.append({"prompt": rows[i], "file": f"{p:03d}-{k:02d}.png", "row": i})
        save_png(image, out / files[-1]["file"])
    save_png(image_grid(images, cfg.num_images), out / "grid.png")
    result = {**provenance(cfg, model, seconds, len(images), "images"), "images": files, "grid": "grid.png"}
    (out / "samples.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"{len(images)} images -> {out}/ (grid.png, samples.json), {result['images_per_s']} images/s")
    return result


def image_to_text(cfg, model, questions: List[str]) -> dict:
    from mmar_cli.inference import load_image

    image = load_image(cfg.image, model.image_size)
    asks: List[Optional[str]] = list(questions) or [None]
    tokens = model.image_tok.encode(image[None]).expand(len(asks), -1, -1)
    start = time.perf_counter()
    with progress("sample texts", len(asks)) as advance:
        texts = model.image_to_text(tokens, asks, cfg.gen, cfg.seed, cfg.batch_size, progress=advance)
    seconds = time.perf_counter() - start
    results = [{"task": "caption" if q is None else "qa", "question": q, "text": t} for q, t in zip(asks, texts)]
    for r in results:
        print(r["text"] if r["question"] is None else f"{r['question']} -> {r['text']}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**provenance(cfg, model, seconds, len(texts), "texts"), "image": cfg.image, "results": results}
    (out / "understanding.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def write_shards(cfg, model, prompts: List[str]) -> dict:
    """prompts x num_images as WebDataset shards, SHARD_SIZE samples each, generated shard by shard."""
    import webdataset as wds

    out = Path(cfg.out_shards)
    out.mkdir(parents=True, exist_ok=True)
    rows = [p for p in prompts for _ in range(cfg.num_images)]
    settings = {"seed": cfg.seed, "ema": model.source["weights"] == "ema", "checkpoint_sha256": model.source["sha256"],
                **to_container(cfg.gen)}
    shards, start = [], time.perf_counter()
    with progress("sample shards", len(rows)) as advance:
        for index, first in enumerate(range(0, len(rows), SHARD_SIZE)):
            chunk = rows[first:first + SHARD_SIZE]
            images = model.text_to_image(chunk, cfg.gen, cfg.seed, cfg.batch_size, first_row=first, progress=advance)
            name = f"samples-{index:06d}.tar"
            tmp = out / (name + ".tmp")
            with wds.TarWriter(str(tmp)) as sink:
                for i, (prompt, image) in enumerate(zip(chunk, images), start=first):
                    p, k = divmod(i, cfg.num_images)
                    sink.write({"__key__": f"{p:06d}-{k:03d}", "png": png_bytes(image), "txt": prompt,
                                "json": {"prompt": prompt, "prompt_index": p, "image_index": k, "row": i, **settings}})
            os.replace(tmp, out / name)
            shards.append({"file": name, "samples": len(chunk)})
    seconds = time.perf_counter() - start
    result = {**provenance(cfg, model, seconds, len(rows), "images"), "shards": shards}
    (out / "samples.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"{len(rows)} samples in {len(shards)} shards -> {out}/, {result['images_per_s']} images/s")
    return result


def run(cfg) -> dict:
    """Sample as `cfg` (a validated SampleConfig) says; returns what samples.json / understanding.json hold."""
    from mmar_cli.inference import load_checkpoint

    prompts = read_prompts(cfg)
    if cfg.image is None and not prompts:
        raise UserError("nothing to sample: give --prompt TEXT (repeatable), --prompts-file FILE, or "
                        "--image PNG to caption")
    model = load_checkpoint(cfg.ckpt, cfg.ema)
    if cfg.image is not None:
        return image_to_text(cfg, model, prompts)
    if cfg.out_shards is not None:
        return write_shards(cfg, model, prompts)
    return text_to_image(cfg, model, prompts)


@handle_errors
def cli(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="text prompt (repeatable); with "
                                               "--image, a question about it [prompts]"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="prompts, one per line [prompts_file]"),
    image: Optional[Path] = typer.Option(None, "--image", help="image to caption, or to ask the prompts about; "
                                         "another size than the model's is center-cropped and resized with a "
                                         "warning [image]"),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="checkpoint directory; default: the newest "
                                        "complete final/ under runs/ [ckpt]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory [out]"),
    out_shards: Optional[Path] = typer.Option(None, "--out-shards", help="write prompts x num_images as "
                                              "WebDataset shards here [out_shards]"),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", help="images per prompt [num_images]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="rows per forward pass [batch_size]"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg", help="classifier-free guidance scale (1: off) [gen.cfg]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="diffusion temperature at the first iteration (gen.temperature_end: at the last) [gen.temperature]"),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="autoregressive iterations [gen.iterations]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="diffusion sampling steps [gen.diffusion_steps]"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="ddpm or ddim [gen.sampler]"),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="images drawn per image kept: the one the "
                                             "model captions likeliest with the prompt, less what a redraw by the "
                                             "image tokenizer changes [gen.candidates, gen.redraw_weight]"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed [seed]"),
    ema: Optional[bool] = typer.Option(None, "--ema/--raw", help="EMA or raw weights [ema]"),
):
    """Generate images from text, or text from an image, with a trained checkpoint.

    Options are shortcuts for the config keys in brackets; key=value arguments set any key (listed below).
    """
    shortcuts = {"prompts_file": prompts_file, "image": image, "ckpt": ckpt, "out": out, "out_shards": out_shards,
                 "num_images": num_images, "batch_size": batch_size, "gen.cfg": cfg_scale,
                 "gen.temperature": temperature, "gen.iterations": iterations, "gen.diffusion_steps": steps,
                 "gen.sampler": sampler, "gen.candidates": candidates, "seed": seed, "ema": ema}
    cfg = load_config(SCHEMA, config, overrides, shortcuts)
    if prompt:
        cfg.prompts = list(cfg.prompts) + list(prompt)
    run(cfg)


def main() -> None:
    single_command_app(cli, SCHEMA)()
