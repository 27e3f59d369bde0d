"""Token shards: the contract between `mmar tokenize` and training.

A shard directory holds `{name}-{000000}.tar` (WebDataset tars), `sizes.json` ({shard file: samples},
open_clip's convention), the tokenizers' files and `manifest.json`. Each sample is

    {key}.tokens.npy   float16 [N, D] continuous image tokens
    {key}.flip.npy     float16 [N, D] tokens of the horizontally flipped image (optional)
    {key}.views.npy    float16 [K, N, D] tokens of K shifted copies of the image (optional, training)
    {key}.txt          caption, UTF-8
    {key}.json         {source, size, question, answer, attributes} + the input's own small JSON fields
                       (e.g. label; ours win on a clash)

`key` is the sample's identity in its input (see mmar_cli/data/sources.py), never a running number.
A shard is written under `<file>.tmp` and renamed once complete; the manifest is written last (also via a
temporary name), so an interrupted run never leaves a directory that looks finished. Its sha256 is in the
manifest, and a reader hashes each shard as it opens it (`verify_shard`): only the shards read are hashed.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np

from mmar_cli.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIZES = "sizes.json"
TOKEN_DTYPE = "float16"


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(spec: dict) -> str:
    """sha256 of the canonical JSON spec; the spec holds the sha256 of the tokenizer's file, so the
    hash covers the file contents too."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, tokens: np.ndarray, caption: str, meta: dict,
                  flip: Optional[np.ndarray] = None, views: Optional[np.ndarray] = None) -> dict:
    """One sample as the bytes TarWriter stores (float16 tokens, UTF-8 text and JSON)."""
    sample = {"__key__": key, "tokens.npy": _npy_bytes(tokens), "txt": caption.encode("utf-8"),
              "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    if flip is not None:
        sample["flip.npy"] = _npy_bytes(flip)
    if views is not None:
        sample["views.npy"] = _npy_bytes(views)
    return sample


def write_shard(path: str | Path, samples: Iterable[dict]) -> dict:
    """Write `samples` (from `encode_sample`) to `path` via `<path>.tmp`; returns {file, samples, sha256}.
    Headers carry no clock time, so the same samples always give the same bytes."""
    import webdataset as wds

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            # an integer mtime keeps plain ustar headers (a float one costs a pax header per file)
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            try:
                for sample in samples:
                    writer.write(sample)
                    count += 1
            finally:
                writer.close()
        sha = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "samples": count, "sha256": sha}


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_manifest(shards: List[dict], text_tokenizer, image_tokenizer, source: dict,
                   skipped: List[tuple], flip: bool, command: str, extra: Optional[dict] = None,
                   views: int = 0) -> dict:
    """`extra`: more top-level sections (tokenize adds `split` and `tokenizer_settings`)."""
    from mmar_cli import __version__

    text_spec, image_spec = text_tokenizer.spec(), image_tokenizer.spec()
    return {
        "format_version": FORMAT_VERSION,
        "mmar_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "source": source,
        "image_tokenizer": {"spec": image_spec, "hash": tokenizer_hash(image_spec)},
        "text_tokenizer": {"spec": text_spec, "hash": tokenizer_hash(text_spec)},
        "tokens": {"shape": [image_tokenizer.grid[0] * image_tokenizer.grid[1], image_tokenizer.token_dim],
                   "dtype": TOKEN_DTYPE, "flip": flip, "views": views},
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "skipped": {"count": len(skipped), "reasons": {file: reason for file, reason in skipped}},
        **(extra or {}),
    }


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """sizes.json, then manifest.json: the manifest's presence means the directory is complete."""
    directory = Path(directory)
    _write_json_atomic(directory / SIZES, {s["file"]: s["samples"] for s in manifest["shards"]})
    _write_json_atomic(directory / MANIFEST, manifest)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _load_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise UserError(f"token shard directory not found: {directory} (run `mmar tokenize` first)")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: not a token shard directory (no {MANIFEST}); run mmar tokenize "
                        "(an interrupted tokenize leaves no manifest)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {manifest.get('format_version')!r}, this mmar reads "
                        f"{FORMAT_VERSION}; tokenize again")
    return manifest


def read_manifest(directory: str | Path, verify: bool = False) -> dict:
    """The manifest of a complete shard directory; `verify` also checks every shard's sha256."""
    directory = Path(directory)
    manifest = _load_manifest(directory)
    for shard in manifest["shards"]:
        file = directory / shard["file"]
        if not file.is_file():
            raise UserError(f"{directory}: shard {shard['file']} listed in the manifest is missing")
        if verify:
            verify_shard(file, shard["sha256"])
    return manifest


def verify_shard(path: str | Path, sha256: str) -> None:
    """The shard's bytes are those its manifest recorded (a one-line UserError naming it otherwise)."""
    if file_sha256(path) != sha256:
        raise UserError(f"{path}: sha256 does not match the manifest (the shard changed or is truncated after "
                        "tokenize); tokenize again")


def tokenizer_manifest(directory: str | Path) -> dict:
    """The manifest of a directory read for its tokenizers only (its shards need not be there)."""
    return _load_manifest(Path(directory))


def shard_checksums(directory: str | Path) -> Dict[str, str]:
    """The shard files of a complete directory, in the manifest's order, each with its recorded sha256."""
    return {str(Path(directory, s["file"])): s["sha256"] for s in read_manifest(directory)["shards"]}


def shard_paths(directory: str | Path) -> List[str]:
    """The shard files of a complete directory, in the manifest's order."""
    return list(shard_checksums(directory))


def _value(sample: dict, *names: str):
    for name in names:
        if name in sample:
            return sample[name]
    return None


_NPY_HEADERS: dict = {}  # .npy header bytes -> (shape, fortran_order, dtype)


def load_npy(data: bytes) -> np.ndarray:
    """np.load of .npy bytes. Every sample's token array has the same header, which np.load would parse
    (with ast.literal_eval) again each time: a fifth of the training loader's time. Here a header is
    parsed once, and the data after it is read in place."""
    data = bytearray(data)  # a copy the array may own (writable)
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # not .npy 1.0/2.0: np.load reads or says why
    start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    header = bytes(data[:start])
    if header not in _NPY_HEADERS:
        f = io.BytesIO(data)
        read = np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f)[0] == 1 \
            else np.lib.format.read_array_header_2_0
        spec = read(f)  # (shape, fortran_order, dtype), as np.load reads it
        if spec[2].hasobject:
            return np.load(io.BytesIO(data), allow_pickle=False)  # refused, with np.load's own message
        if len(_NPY_HEADERS) >= 64:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = spec
    shape, fortran, dtype = _NPY_HEADERS[header]
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype, count, offset=start).reshape(shape, order="F" if fortran else "C")


def _array(value) -> Optional[np.ndarray]:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = load_npy(value)
    return np.asarray(value, dtype=np.float16)


def decode_sample(sample: dict) -> dict:
    """A sample as WebDataset yields it (raw bytes, or values its default decoder already decoded) ->
    {key, tokens float16 [N, D], flip (or None), views [K, N, D] (or None), caption, question, answer, meta}."""
    caption = _value(sample, "txt")
    meta = _value(sample, "json") or {}
    if isinstance(caption, (bytes, bytearray)):
        caption = caption.decode("utf-8")
    if isinstance(meta, (bytes, bytearray, str)):
        meta = json.loads(meta)
    return {"key": sample["__key__"], "tokens": _array(_value(sample, "tokens.npy")),
            "flip": _array(_value(sample, "flip.npy")), "views": _array(_value(sample, "views.npy")),
            "caption": caption,
            "question": meta.get("question"), "answer": meta.get("answer"), "meta": meta}


def iterate_samples(directory: str | Path) -> Iterator[dict]:
    """Every sample of a complete shard directory, decoded (`decode_sample`), in the manifest's order; each
    shard is checked against its sha256 when it is opened, so a reader that stops early hashes no more."""
    import webdataset as wds

    for path, sha256 in shard_checksums(directory).items():
        verify_shard(path, sha256)
        for raw in wds.WebDataset([path], shardshuffle=False, empty_check=False):
            yield decode_sample(raw)


def first_samples(directory: str | Path, n: int) -> List[dict]:
    """The first `n` samples of a shard directory, in the manifest's order (`decode_sample`'s dicts)."""
    samples = list(itertools.islice(iterate_samples(directory), n))
    if not samples:
        raise UserError(f"data: {directory} holds no samples")
    return samples


def check_compatible(a: dict, b: dict) -> None:
    """Two manifests (shards, or shards and a checkpoint) must use the same tokenizers."""
    for which in ("image_tokenizer", "text_tokenizer"):
        ha, hb = a[which]["hash"], b[which]["hash"]
        if ha != hb:
            raise UserError(f"{which.replace('_', ' ')} mismatch: {ha[:16]} ({a[which]['spec']['kind']}, "
                            f"source {a.get('source', {}).get('input')}) vs {hb[:16]} "
                            f"({b[which]['spec']['kind']}, source {b.get('source', {}).get('input')}); "
                            "tokenize both with the same tokenizers")


def save_tokenizers(directory: str | Path, text_tokenizer, image_tokenizer) -> None:
    text_tokenizer.save(directory)
    image_tokenizer.save(directory)


def load_tokenizers(directory: str | Path):
    """(TextTokenizer, ImageTokenizer) of a shard directory (or a checkpoint holding its manifest)."""
    from mmar_cli.tokenizers.image import load_image_tokenizer
    from mmar_cli.tokenizers.text import load_text_tokenizer

    manifest = _load_manifest(Path(directory))
    return (load_text_tokenizer(directory, manifest["text_tokenizer"]["spec"]),
            load_image_tokenizer(directory, manifest["image_tokenizer"]["spec"]))
