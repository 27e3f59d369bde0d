"""`mmar tokenize`: raw images + text -> token shards (see mmar_cli/data/shards.py).

    mmar tokenize                                     # built-in shapes -> data/shapes/{train,val,test}
    mmar tokenize --input photos/ --out data/photos   # image folder with <stem>.txt captions
    mmar tokenize --input pairs.jsonl --out data/pairs
    mmar tokenize --input 'laion/{00000..00009}.tar' --out data/laion --workers 8
    mmar tokenize image_tokenizer.kind=pca image_tokenizer.pca_dim=32 shapes.num_train=5000
    mmar tokenize --input photos/ --out data/photos --val-fraction 0.05 --test-fraction 0.1
                                                      # -> data/photos/{train,val,test}
    mmar tokenize --input more/ --out data/more --tokenizer-from data/photos/train

List the inputs (main process). Each record's key is the sample's own identity (see
mmar_cli/data/sources.py). With val_fraction / test_fraction > 0 a user input is split by key
(`sources.assign_split`: sha256 of '{split_seed}:{key}'), so a sample's split never depends on the
workers, the shard size or the input order; a split of fraction 0 is not written, an empty one is an
error. The built-in dataset has its own splits (shapes.num_*) and refuses the fractions.
A user input's samples are written in an order set by a hash of their keys (`sources.order_key`), so
every shard mixes what the input listed in blocks (e.g. one class after another).
Then fit the image tokenizer on the first training images (pca basis, ae training, vae scale), tokenize fixed chunks
of `shard_size` records per split, one shard per chunk, in a pool of `workers` processes (so the output
does not depend on the worker count), train the BPE on the training split's texts, save the tokenizers
beside every split's shards (the same files and hashes) and, once every split is written, each split's
manifest (it records the fractions, the seed, its name and the counts of all splits). With
`tokenizer_from` nothing is fitted: that directory's tokenizers are used as they are (also for the
built-in dataset), image_size is theirs, and a tokenizer setting that contradicts them is an error.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer
from rich.console import Console

from mmar_cli.cli_common import CONFIG_HELP, OVERRIDES_HELP, command_line, handle_errors, single_command_app
from mmar_cli.config import TokenizeConfig, load_config, load_preset, to_container
from mmar_cli.data import shards, sources
from mmar_cli.data.augment import shifted_copies
from mmar_cli.errors import UserError, console
from mmar_cli.machine import usable_cores
from mmar_cli.metrics.judges import JUDGE_CACHE
from mmar_cli.progress import progress
from mmar_cli.tokenizers.image import IMAGE_TOKENIZER_FILE, AETokenizer, build_image_tokenizer, load_image_tokenizer
from mmar_cli.tokenizers.text import TEXT_TOKENIZER_FILE, build_text_tokenizer

SCHEMA = TokenizeConfig
FIT_IMAGES = 512  # training images that fit the pca basis / measure the vae scale (the ae: image_tokenizer.ae_images)
ENCODE_BATCH = 64
AE_KEYS = AETokenizer.ARCH_KEYS + AETokenizer.TRAIN_KEYS
SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)  # what a mirrored image contradicts
OUR_FILES = ("*.tar", "*.tar.tmp", shards.MANIFEST, shards.SIZES, f"{shards.MANIFEST}.tmp", f"{shards.SIZES}.tmp",
             TEXT_TOKENIZER_FILE, IMAGE_TOKENIZER_FILE, JUDGE_CACHE)  # what --overwrite may delete


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
    the shard entry (None when every record was bad), the skipped inputs, the chunk's texts (they train
    the BPE) and, with mirrored tokens, how many captions name a side."""
    tokenizer = _image_tokenizer(job["dir"], job["image_spec"])
    skipped, texts, sided = [], [], 0

    def encode(batch):
        images = np.stack([s["image"] for _, s in batch])
        tokens = tokenizer.encode(images).numpy()
        flips = tokenizer.encode(images[:, :, ::-1].copy()).numpy() if job["flip"] else [None] * len(batch)
        views = [None] * len(batch)
        if job["shifts"]:
            moved = shifted_copies(images, [record.key for record, _ in batch], job["shifts"], job["shift_px"],
                                   job["shift_deg"], job["shift_scale"], job["shift_warp"])
            views = tokenizer.encode(moved.reshape(-1, *images.shape[1:])).numpy()
            views = views.reshape(len(batch), job["shifts"], *views.shape[1:])
        nonlocal sided
        for (record, s), tok, flip, view in zip(batch, tokens, flips, views):
            texts.extend(t for t in (s["caption"], s["meta"]["question"], s["meta"]["answer"]) if t)
            sided += flip is not None and SIDE_WORDS.search(s["caption"]) is not None
            yield shards.encode_sample(record.key, tok, s["caption"], s["meta"], flip, view)

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
    return {"shard": shard, "skipped": skipped, "texts": texts, "sided": sided}


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
def _prepare_output(directory: Path, overwrite: bool, splits_too: bool = True) -> None:
    """Refuse an existing directory unless `overwrite`; even then delete only files tokenize writes (and,
    when `splits_too`, the train/val/test directories an earlier split run wrote there)."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {directory} already exists; pass --overwrite to replace it")
        ours = {p for pattern in OUR_FILES for p in directory.glob(pattern)}
        splits = {directory / s for s in SPLITS if (directory / s).is_dir()} if splits_too else set()
        foreign = [p for p in directory.iterdir() if p not in ours | splits]
        if foreign:
            raise UserError(f"refusing to overwrite {directory}: it holds files tokenize did not write "
                            f"(e.g. {foreign[0].name})")
        for split in splits:
            _prepare_output(split, overwrite, splits_too=False)  # only our files, or a one-line refusal
            split.rmdir()
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


def _fit_images(records: list, image_size: int, input: str, count: int = FIT_IMAGES) -> np.ndarray:
    images, skipped = [], []
    for record in records:
        if len(images) == count:
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
    with progress(label, total) as advance:
        if workers == 1:
            return [tokenize_chunk(job, progress=advance) for job in jobs]
        threads = max(1, usable_cores() // workers)
        results = []
        with _pool_context().Pool(workers, _init_worker, (threads,)) as pool:
            for result, job in zip(pool.imap(tokenize_chunk, jobs), jobs):
                results.append(result)
                advance(len(job["records"]))
        return results


# --------------------------------------------------------------------------------------------------
# Splits, given tokenizers
# --------------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")
SPLIT_RULE = ("u = int.from_bytes(sha256(f'{seed}:{key}'.encode()).digest()[:8], 'big') / 2**64; test if u < test, "
              "val if u < test + val, else train")


def _check_fractions(cfg) -> dict:
    """{'val': f, 'test': f} after checking each lies in [0, 1) and their sum stays below 1."""
    fractions = {"val": float(cfg.val_fraction), "test": float(cfg.test_fraction)}
    for name, value in fractions.items():
        if not 0 <= value < 1:
            raise UserError(f"{name}_fraction={value:g} is outside [0, 1): it is the share of the input's "
                            f"samples put in the {name} split")
    total = fractions["val"] + fractions["test"]
    if total >= 1:
        raise UserError(f"val_fraction={fractions['val']:g} + test_fraction={fractions['test']:g} = {total:g} "
                        "leaves nothing to train on; their sum must stay below 1")
    return fractions


def _split_records(cfg, records: list, skipped: list, fractions: dict) -> dict:
    """{'train': (records, skipped), 'val': ..., 'test': ...} (splits of fraction 0 left out), each
    record by `sources.assign_split` of its key. The inputs skipped while listing go with train."""
    parts = {name: [] for name in SPLITS if name == "train" or fractions[name] > 0}
    for record in records:
        parts[sources.assign_split(record.key, cfg.split_seed, fractions["val"], fractions["test"])].append(record)
    n = len(records)
    for name in ("val", "test"):
        if name in parts and not parts[name]:
            raise UserError(f"input {cfg.input}: the {name} split would be empty ({name}_fraction="
                            f"{fractions[name]:g} of {n} usable samples gave none); raise {name}_fraction, "
                            f"add samples or set {name}_fraction=0")
    if not parts["train"]:
        raise UserError(f"input {cfg.input}: the train split would be empty (val_fraction={fractions['val']:g}, "
                        f"test_fraction={fractions['test']:g} of {n} usable samples left none); lower "
                        "val_fraction or test_fraction")
    return {name: (part, skipped if name == "train" else []) for name, part in parts.items()}


def _settings(cfg) -> dict:
    """The settings that built the tokenizers, kept in the manifest (a later --tokenizer-from checks a
    setting against them where the tokenizer's spec does not hold it, e.g. the BPE's asked vocab_size)."""
    image, text = cfg.image_tokenizer, cfg.text_tokenizer
    return {"image_size": cfg.image_size,
            "image_tokenizer": {k: image[k] for k in ("kind", "patch_size", "pca_dim", "vae_path", "vae_scale",
                                                      *AE_KEYS)},
            "text_tokenizer": {k: text[k] for k in ("kind", "path", "vocab_size")}}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-6 * max(abs(float(b)), 1e-12)
    return a == b


def _check_given_settings(cfg, directory: str, text_tok, image_tok, recorded: dict, set_keys=()) -> None:
    """Every setting the user gave (one in `set_keys`, or any that differs from its default) must agree
    with the loaded tokenizers."""
    from omegaconf import OmegaConf

    default = OmegaConf.structured(SCHEMA)
    ispec, tspec = image_tok.spec(), text_tok.spec()
    r_text = recorded.get("text_tokenizer", {})  # image tokenizers: the spec holds every number
    missing = object()

    def text_path_ok(path) -> bool:
        if tspec["kind"] != "file":
            return False
        if path == r_text.get("path"):
            return True
        from mmar_cli.tokenizers.text import tokenizer_from_file
        return tokenizer_from_file(path).spec()["sha256"] == tspec["sha256"]

    # key -> (name, the loaded tokenizer's value or `missing` where it has none); `also`: other values accepted
    checks = {
        "image_size": ("image_size", ispec["image_size"]),
        "image_tokenizer.kind": ("kind", ispec["kind"]),
        "image_tokenizer.patch_size": ("patch_size", ispec["patch_size"]),
        "image_tokenizer.pca_dim": ("pca_dim", ispec.get("pca_dim", missing)),
        "image_tokenizer.vae_path": ("vae_path", ispec.get("vae_path", missing)),
        "image_tokenizer.vae_scale": ("vae_scale", ispec.get("vae_scale", missing)),
        **{f"image_tokenizer.{k}": (k, ispec.get(k, missing)) for k in AE_KEYS},
        "text_tokenizer.kind": ("kind", tspec["kind"]),
        "text_tokenizer.vocab_size": ("vocab_size", tspec["base_vocab_size"] if tspec["kind"] == "bpe" else missing),
        "text_tokenizer.path": ("text tokenizer sha256", (tspec["sha256"] or "")[:12] if tspec["kind"] == "file"
                                else missing),
    }
    also = {"image_tokenizer.vae_path": lambda v: str(Path(v).resolve()) == str(Path(ispec["vae_path"]).resolve()),
            "text_tokenizer.vocab_size": lambda v: v == r_text.get("vocab_size"),
            "text_tokenizer.path": text_path_ok}
    for key, (name, loaded) in checks.items():
        value = OmegaConf.select(cfg, key)
        if key not in set_keys and _same(value, OmegaConf.select(default, key)):
            continue  # not set by the user
        if loaded is not missing and (_same(value, loaded) or (key in also and also[key](value))):
            continue
        kind = ispec["kind"] if key.startswith("image") else tspec["kind"]
        has = f"{name} {loaded}" if loaded is not missing else f"a {kind} tokenizer, no {key.split('.')[-1]}"
        if key == "text_tokenizer.vocab_size" and r_text.get("vocab_size") not in (None, loaded):
            has += f", trained with vocab_size={r_text['vocab_size']}"
        raise UserError(f"{key}={value} disagrees with the tokenizer of {directory} ({has}); drop the setting "
                        "or tokenize without --tokenizer-from")


def _given_tokenizers(cfg, set_keys=()):
    """(text tokenizer, image tokenizer, their settings) of `cfg.tokenizer_from`, checked against the
    settings; sets cfg.image_size to the tokenizer's."""
    directory = Path(cfg.tokenizer_from)
    if not directory.is_dir():
        raise UserError(f"tokenizer_from: {directory} does not exist (expected a token shard directory written "
                        "by mmar tokenize, e.g. data/photos/train)")
    if not (directory / shards.MANIFEST).is_file():
        inside = [s for s in SPLITS if (directory / s / shards.MANIFEST).is_file()]
        hint = (f"; its splits are in {directory / inside[0]}" if inside
                else " (not written by mmar tokenize, or an interrupted run)")
        raise UserError(f"tokenizer_from: {directory} has no {shards.MANIFEST}{hint}")
    manifest = shards.tokenizer_manifest(directory)
    text_tok, image_tok = shards.load_tokenizers(directory)
    recorded = manifest.get("tokenizer_settings") or {}
    _check_given_settings(cfg, cfg.tokenizer_from, text_tok, image_tok, recorded, set_keys)
    cfg.image_size = image_tok.spec()["image_size"]
    settings = recorded or {"image_size": cfg.image_size}
    return text_tok, image_tok, settings


def _prepare_parent(directory: Path, overwrite: bool) -> None:
    """A split output's parent must not itself look like a shard directory (what an unsplit run left):
    refused, or with `overwrite` those files deleted (only names an unsplit run writes)."""
    patterns = ("shard-*.tar", "shard-*.tar.tmp", *(p for p in OUR_FILES if not p.startswith("*")))
    ours = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    if ours and not overwrite:
        raise UserError(f"output directory {directory} already holds token shards ({ours[0].name}); pass "
                        "--overwrite to replace them")
    for p in ours:
        p.unlink()


def _explicit_keys(config: Optional[Path], overrides: Optional[List[str]]) -> set:
    """The dotted keys a YAML preset (with its `base`) or a key=value override sets (even to their default
    value)."""
    keys = {item.split("=", 1)[0].strip().lstrip("+~") for item in overrides or [] if "=" in item}

    def walk(node, prefix=""):
        for k, v in node.items():
            keys.add(f"{prefix}{k}")
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    if config is not None:
        walk(to_container(load_preset(config)))
    return keys


def run(cfg, set_keys=()) -> List[dict]:
    """Tokenize `cfg.input` into `cfg.out` (one directory per split for the built-in dataset, and for a
    user input with val_fraction/test_fraction > 0). `set_keys`: config keys the user gave explicitly
    (with `tokenizer_from`, such a key is checked against the tokenizers even at its default value).
    Returns one summary per split: dir, samples, shards, skipped, seconds."""
    fmt = sources.detect_format(cfg.input, cfg.format)
    fractions = _check_fractions(cfg)
    split_by_key = fmt != "builtin" and any(fractions.values())
    given = _given_tokenizers(cfg, set(set_keys)) if cfg.tokenizer_from is not None else None
    out = Path(cfg.out)
    if fmt == "builtin":
        if any(fractions.values()):
            raise UserError(f"val_fraction={fractions['val']:g}, test_fraction={fractions['test']:g}: the built-in "
                            f"dataset has its own splits; set shapes.num_val (now {cfg.shapes.num_val}) and "
                            f"shapes.num_test (now {cfg.shapes.num_test}) instead")
        sizes = {"train": cfg.shapes.num_train, "val": cfg.shapes.num_val, "test": cfg.shapes.num_test}
        splits = {s: (sources.list_builtin(s, n, cfg.shapes), []) for s, n in sizes.items() if n > 0 or s == "train"}
    else:
        records, skipped = sources.list_records(fmt, cfg.input)
        # Written in an order set by a hash of the key: inputs sorted by class (a folder per class, a
        # dataset dumped in label order) would otherwise give shards of one class each, and the training
        # loader's shuffle buffer, the tokenizer fit and a look at the first held-out samples would see
        # one class at a time.
        records.sort(key=lambda r: sources.order_key(r.key, cfg.split_seed))
        if split_by_key:
            _fail_if_strict(skipped, cfg.strict)
            if not records:
                raise _no_usable_samples(cfg.input, None, skipped)
            splits = _split_records(cfg, records, skipped, fractions)
        else:
            splits = {None: (records, skipped)}
    dirs = {s: out / s if s is not None else out for s in splits}
    for split, (records, skipped) in splits.items():
        _fail_if_strict(skipped, cfg.strict)
        if not records:
            raise _no_usable_samples(cfg.input, split, skipped)
    if None not in splits and out.is_dir():
        _prepare_parent(out, cfg.overwrite)
        # a split this run does not write must not survive from an earlier one: its samples may now be
        # in another split (evaluating on training data), and its tokenizer hashes would still match
        for stale in (out / s for s in SPLITS if s not in splits):
            if stale.is_dir():
                _prepare_output(stale, cfg.overwrite, splits_too=False)
                stale.rmdir()
    for directory in dirs.values():
        _prepare_output(directory, cfg.overwrite)

    train = next(iter(splits))  # 'train' (first), or None: the tokenizers are fitted on it alone
    if given is not None:
        text_tok, image_tok, settings = given
    else:
        kind = cfg.image_tokenizer.kind
        fit = (None if kind == "patch" else
               _fit_images(splits[train][0], cfg.image_size, cfg.input,
                           cfg.image_tokenizer.ae_images if kind == "ae" else FIT_IMAGES))
        image_tok = build_image_tokenizer(cfg.image_tokenizer, cfg.image_size, fit,
                                          log=lambda line: print(line, file=console.file, flush=True))
        text_tok, settings = None, _settings(cfg)
    done, summaries = [], []
    # shifted copies and mirrored tokens only where training reads them
    shifts = {split: cfg.image_tokenizer.shifts if split in ("train", None) else 0 for split in splits}
    flips = {split: cfg.image_tokenizer.flip and split in ("train", None) for split in splits}
    for split, (records, skipped) in splits.items():
        start, directory = time.time(), dirs[split]
        image_tok.save(directory)
        image_spec, name = image_tok.spec(), split or "shard"
        jobs = [{"records": records[i:i + cfg.shard_size], "path": str(directory / shards.shard_name(name, k)),
                 "dir": str(directory), "image_spec": image_spec, "image_size": cfg.image_size,
                 "flip": flips[split], "strict": cfg.strict,
                 "shifts": shifts[split], "shift_px": cfg.image_tokenizer.shift_px,
                 "shift_deg": cfg.image_tokenizer.shift_deg, "shift_scale": cfg.image_tokenizer.shift_scale,
                 "shift_warp": cfg.image_tokenizer.shift_warp}
                for k, i in enumerate(range(0, len(records), cfg.shard_size))]
        results = _run_chunks(jobs, cfg.workers, len(records), f"tokenize {split or cfg.input}")
        skipped = skipped + [s for r in results for s in r["skipped"]]
        written = [r["shard"] for r in results if r["shard"] is not None]
        if not written:
            raise _no_usable_samples(cfg.input, split, skipped)
        sided = sum(r["sided"] for r in results)
        if sided:
            console.print(f"[yellow]warning:[/yellow] image_tokenizer.flip: {sided} of {len(records)} captions in "
                          f"{directory} say 'left' or 'right'; training reads their mirrored image half the time, "
                          "and those words then name the wrong side", highlight=False, soft_wrap=True)
        if text_tok is None:  # fitted on the training split's texts only, then reused as is
            assert split == train
            text_tok = build_text_tokenizer(cfg.text_tokenizer, (t for r in results for t in r["texts"]))
        shards.save_tokenizers(directory, text_tok, image_tok)
        done.append((split, written, skipped, time.time() - start))

    # the manifests last, once every split is written: each holds the counts of all of them
    counts = {split: sum(s["samples"] for s in written) for split, written, _, _ in done}
    for split, written, skipped, seconds in done:
        source = {"input": cfg.input, "format": fmt, "split": split}
        if cfg.tokenizer_from is not None:
            source["tokenizer_from"] = cfg.tokenizer_from
        extra = {"tokenizer_settings": settings}
        if split_by_key:
            extra["split"] = {"name": split, "seed": cfg.split_seed, "fractions": fractions, "counts": counts,
                              "rule": SPLIT_RULE}
        elif split is not None:
            extra["split"] = {"name": split, "counts": counts, "rule": "built-in: shapes.num_train/num_val/num_test"}
        manifest = shards.build_manifest(written, text_tok, image_tok, source, skipped, flips[split],
                                         command_line(), extra, views=shifts[split])
        shards.write_manifest(dirs[split], manifest)
        summaries.append({"dir": str(dirs[split]), "samples": manifest["samples"], "shards": len(written),
                          "skipped": len(skipped), "seconds": seconds})
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
                                      "dataset, or a user input with --val-fraction/--test-fraction, writes "
                                      "train/, val/ and test/ inside it [key: out]"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="worker processes; the output is "
                                          "the same for any number [key: workers]"),
    strict: Optional[bool] = typer.Option(None, "--strict", help="stop with an error at the first bad "
                                          "input instead of skipping and counting it [key: strict]"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="replace an existing output "
                                             "directory [key: overwrite]"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="share of a user input's "
                                                 "samples written to OUT/val (0: none); with this or "
                                                 "--test-fraction above 0 the output is OUT/train, OUT/val, "
                                                 "OUT/test, each sample's split fixed by its key and "
                                                 "--split-seed; the tokenizers are fitted on train only "
                                                 "[key: val_fraction]"),
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", help="share of a user input's "
                                                  "samples written to OUT/test, the held-out split (0: none) "
                                                  "[key: test_fraction]"),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help="seed of the split assignment; "
                                             "another seed draws other val/test samples [key: split_seed]"),
    tokenizer_from: Optional[str] = typer.Option(None, "--tokenizer-from", help="token shard directory "
                                                 "(e.g. data/photos/train) whose tokenizers are used as they "
                                                 "are: nothing is fitted, image_size comes from them and a "
                                                 "contradicting tokenizer setting is an error "
                                                 "[key: tokenizer_from]"),
):
    """Turn images and captions into token shards: the built-in shapes dataset by default, or an image
    folder, a JSONL or img2dataset shards, optionally split into train/val/test by sample key. Writes
    {name}-000000.tar shards, sizes.json, the tokenizers and manifest.json (last)."""
    cfg = load_config(SCHEMA, config, overrides, dict(
        input=input, out=out, workers=workers, strict=strict, overwrite=overwrite, val_fraction=val_fraction,
        test_fraction=test_fraction, split_seed=split_seed, tokenizer_from=tokenizer_from))
    _print_summary(run(cfg, _explicit_keys(config, overrides)))


def main() -> None:
    single_command_app(cli, SCHEMA)()
