"""`mmar tokenize`: raw images + text -> token shards (see mmar_cli/data/shards.py).

    mmar tokenize                                     # built-in shapes -> data/shapes/{train,val,test}
    mmar tokenize --input photos/ --out data/photos   # image folder with <stem>.txt captions
    mmar tokenize --input pairs.jsonl --out data/pairs
    mmar tokenize --input 'laion/{00000..00009}.tar' --out data/laion --workers 8
    mmar tokenize image_tokenizer.kind=pca image_tokenizer.pca_dim=32 shapes.num_train=5000

Per split: list the inputs (main process), fit the image tokenizer on the first training images
(pca basis, vae scale), tokenize fixed chunks of `shard_size` records, one shard per chunk, in a pool of
`workers` processes (so the output does not depend on the worker count), then train the BPE on the
training texts, save the tokenizers beside the shards and write the manifest last. The built-in
dataset's val/test splits reuse the train split's tokenizer files as they are (same hashes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmar_cli.cli_common import (CONFIG_HELP, OVERRIDES_HELP, build_config, command_line, console,
                                 handle_errors, single_command_app)
from mmar_cli.config import TokenizeConfig
from mmar_cli.data import shards, sources
from mmar_cli.errors import UserError
from mmar_cli.tokenizers.image import IMAGE_TOKENIZER_FILE, build_image_tokenizer, load_image_tokenizer
from mmar_cli.tokenizers.text import TEXT_TOKENIZER_FILE, build_text_tokenizer

SCHEMA = TokenizeConfig
FIT_IMAGES = 512  # training images that fit the pca basis / measure the vae scale
ENCODE_BATCH = 64
OUR_FILES = ("*.tar", "*.tar.tmp", shards.MANIFEST, shards.SIZES, f"{shards.MANIFEST}.tmp", f"{shards.SIZES}.tmp",
             TEXT_TOKENIZER_FILE, IMAGE_TOKENIZER_FILE)  # what --overwrite may delete


# --------------------------------------------------------------------------------------------------
# One chunk -> one shard (runs in a worker process, or in-process when workers=1)
# --------------------------------------------------------------------------------------------------
_worker_tokenizer = {}  # spec json -> tokenizer, so a worker process builds it once


def _image_tokenizer(directory: str, spec: dict):
    key = json.dumps(spec, sort_keys=True)
    if key not in _worker_tokenizer:
        _worker_tokenizer[key] = load_image_tokenizer(directory, spec)
    return _worker_tokenizer[key]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def tokenize_chunk(job: dict, progress=None) -> dict:
    """Load, encode and write the records of one chunk, streaming in batches of ENCODE_BATCH. Returns
    the shard entry (None when every record was bad), the skipped inputs and the chunk's texts (they
    train the BPE)."""
    tokenizer = _image_tokenizer(job["dir"], job["image_spec"])
    skipped, texts = [], []

    def encode(batch):
        images = np.stack([s["image"] for _, s in batch])
        tokens = tokenizer.encode(images).numpy()
        flips = tokenizer.encode(images[:, :, ::-1].copy()).numpy() if job["flip"] else [None] * len(batch)
        for (record, s), tok, flip in zip(batch, tokens, flips):
            texts.extend(t for t in (s["caption"], s["meta"]["question"], s["meta"]["answer"]) if t)
            yield shards.encode_sample(record.key, tok, s["caption"], s["meta"], flip)

    def samples():
        batch = []
        for record in job["records"]:
            try:
                batch.append((record, sources.load_record(record, job["image_size"])))
            except sources.BadInput as bad:
                if job["strict"]:
                    raise UserError(f"{bad.file}: {bad.reason} (--strict stops at the first bad input)") from None
                skipped.append((bad.file, bad.reason))
            if progress is not None:
                progress(1)
            if len(batch) == ENCODE_BATCH:
                yield from encode(batch)
                batch = []
        if batch:
            yield from encode(batch)

    shard = shards.write_shard(job["path"], samples())
    if shard["samples"] == 0:
        Path(job["path"]).unlink()
        shard = None
    return {"shard": shard, "skipped": skipped, "texts": texts}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def _prepare_output(directory: Path, overwrite: bool) -> None:
    """Refuse an existing directory unless `overwrite`; even then delete only files tokenize writes."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {directory} already exists; pass --overwrite to replace it")
        ours = {p for pattern in OUR_FILES for p in directory.glob(pattern)}
        foreign = [p for p in directory.iterdir() if p not in ours]
        if foreign:
            raise UserError(f"refusing to overwrite {directory}: it holds files tokenize did not write "
                            f"(e.g. {foreign[0].name})")
        for p in ours:
            p.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def _fail_if_strict(skipped: list, strict: bool) -> None:
    if strict and skipped:
        file, reason = skipped[0]
        raise UserError(f"{file}: {reason} (--strict stops at the first bad input)")


def _no_usable_samples(input: str, split: Optional[str], skipped: list) -> UserError:
    reasons = "; ".join(f"{file}: {reason}" for file, reason in skipped[:3])
    return UserError(f"input {input}{f' ({split} split)' if split else ''}: no usable samples"
                     + (f" ({len(skipped)} skipped, e.g. {reasons})" if skipped else ""))


def _fit_images(records: list, image_size: int, input: str) -> np.ndarray:
    images, skipped = [], []
    for record in records:
        if len(images) == FIT_IMAGES:
            break
        try:
            images.append(sources.load_record(record, image_size)["image"])
        except sources.BadInput as bad:  # counted again when its chunk is tokenized
            skipped.append((bad.file, bad.reason))
    if not images:
        raise _no_usable_samples(input, None, skipped)
    return np.stack(images)


def _pool_context():
    """fork starts a worker in milliseconds, where spawn re-imports the whole `mmar` app (Lightning
    included) in each; torch resets its thread pool in forked children, but a CUDA context (the VAE on
    a GPU) cannot be forked."""
    fork_ok = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    return multiprocessing.get_context("fork" if fork_ok else "spawn")


def _run_chunks(jobs: List[dict], workers: int, total: int, label: str) -> List[dict]:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(escape(label), total=total)
        if workers == 1:
            return [tokenize_chunk(job, progress=lambda n: bar.advance(task, n)) for job in jobs]
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        results = []
        with _pool_context().Pool(workers, _init_worker, (threads,)) as pool:
            for result, job in zip(pool.imap(tokenize_chunk, jobs), jobs):
                results.append(result)
                bar.advance(task, len(job["records"]))
        return results


def run(cfg) -> List[dict]:
    """Tokenize `cfg.input` into `cfg.out` (one directory per split for the built-in dataset).
    Returns one summary per split: dir, samples, shards, skipped, seconds."""
    fmt = sources.detect_format(cfg.input, cfg.format)
    out = Path(cfg.out)
    if fmt == "builtin":
        sizes = {"train": cfg.shapes.num_train, "val": cfg.shapes.num_val, "test": cfg.shapes.num_test}
        splits = {s: (sources.list_builtin(s, n, cfg.shapes), []) for s, n in sizes.items() if n > 0 or s == "train"}
        dirs = {s: out / s for s in splits}
    else:
        splits = {None: sources.list_records(fmt, cfg.input)}
        dirs = {None: out}
    for split, (records, skipped) in splits.items():
        _fail_if_strict(skipped, cfg.strict)
        if not records:
            raise _no_usable_samples(cfg.input, split, skipped)
    for directory in dirs.values():
        _prepare_output(directory, cfg.overwrite)

    first = next(iter(splits))
    image_tok = build_image_tokenizer(cfg.image_tokenizer, cfg.image_size,
                                      _fit_images(splits[first][0], cfg.image_size, cfg.input)
                                      if cfg.image_tokenizer.kind != "patch" else None)
    text_tok, summaries = None, []
    for split, (records, skipped) in splits.items():
        start, directory = time.time(), dirs[split]
        image_tok.save(directory)
        image_spec, name = image_tok.spec(), split or "shard"
        jobs = [{"records": records[i:i + cfg.shard_size], "path": str(directory / shards.shard_name(name, k)),
                 "dir": str(directory), "image_spec": image_spec, "image_size": cfg.image_size,
                 "flip": cfg.image_tokenizer.flip, "strict": cfg.strict}
                for k, i in enumerate(range(0, len(records), cfg.shard_size))]
        results = _run_chunks(jobs, cfg.workers, len(records), f"tokenize {split or cfg.input}")
        skipped = skipped + [s for r in results for s in r["skipped"]]
        written = [r["shard"] for r in results if r["shard"] is not None]
        if not written:
            raise _no_usable_samples(cfg.input, split, skipped)
        if text_tok is None:  # fitted on the first (training) split only, then reused as is
            text_tok = build_text_tokenizer(cfg.text_tokenizer, (t for r in results for t in r["texts"]))
        shards.save_tokenizers(directory, text_tok, image_tok)
        source = {"input": cfg.input, "format": fmt, "split": split}
        manifest = shards.build_manifest(written, text_tok, image_tok, source, skipped,
                                         cfg.image_tokenizer.flip, command_line())
        shards.write_manifest(directory, manifest)
        summaries.append({"dir": str(directory), "samples": manifest["samples"], "shards": len(written),
                          "skipped": len(skipped), "seconds": time.time() - start})
    return summaries


def _print_summary(summaries: List[dict]) -> None:
    from rich.table import Table

    table = Table("directory", "samples", "shards", "skipped", "time (s)", "images/s")
    for s in summaries:
        table.add_row(s["dir"], str(s["samples"]), str(s["shards"]), str(s["skipped"]), f"{s['seconds']:.1f}",
                      f"{(s['samples'] + s['skipped']) / max(s['seconds'], 1e-9):.0f}")
    Console().print(table)


@handle_errors
def cli(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="what to tokenize: 'builtin' (default), "
                                        "an image folder with .txt captions, a .jsonl, or img2dataset .tar "
                                        "shards (a directory or a brace pattern) [key: input]"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output shard directory; the built-in "
                                      "dataset writes train/, val/ and test/ inside it [key: out]"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="worker processes; the output is "
                                          "the same for any number [key: workers]"),
    strict: Optional[bool] = typer.Option(None, "--strict", help="stop with an error at the first bad "
                                          "input instead of skipping and counting it [key: strict]"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="replace an existing output "
                                             "directory [key: overwrite]"),
):
    """Turn images and captions into token shards: the built-in shapes dataset by default, or an image
    folder, a JSONL or img2dataset shards. Writes {name}-000000.tar shards, sizes.json, the tokenizers
    and manifest.json (last)."""
    cfg = build_config(SCHEMA, config, overrides, input=input, out=out, workers=workers, strict=strict,
                       overwrite=overwrite)
    _print_summary(run(cfg))


def main() -> None:
    single_command_app(cli, SCHEMA)()
