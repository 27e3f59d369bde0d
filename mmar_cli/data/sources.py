"""Readers of `mmar tokenize`'s inputs: the built-in dataset, an image folder with sidecar captions, a
JSONL of {image, caption[, question, answer]}, and WebDataset shards in img2dataset's layout.

Reading happens in two steps so the work can be spread over processes: `list_records` runs once in the
main process and returns small picklable `Record`s (where the pixels are, plus the texts) and the inputs
it had to skip; `load_record` runs in the workers and returns the pixels, center-cropped and resized.
A record that cannot be used raises `BadInput`, which the stage counts (or, with --strict, reports).

Every record's key is the sample's own identity, so it does not change with the listing (and the split a
key falls in, `assign_split`, neither): img2dataset shards keep the key of the sample inside its tar; an
image folder uses the image's path relative to the folder without its extension (`sub/cat_01`); a JSONL
row its `key` (or `id`) field, else its image's path relative to the JSONL's folder without extension.
`safe_key` makes it a valid WebDataset `__key__` (no dots: WebDataset cuts a name at its first dot). A
second sample with a key already seen is skipped and counted. The user's own JSON fields (the tar's
.json, the folder's sidecar .json, a JSONL row's other fields) travel in `Record.extra` into the shard
sample's json, small values only (`carried_fields`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from mmar_cli.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FORMATS = ("builtin", "folder", "jsonl", "wds")
OUR_META = ("source", "size", "question", "answer", "attributes")  # the shard json's own keys win
NOT_CARRIED = ("caption", "image")  # stored elsewhere: the caption as .txt, the image path as `source`
MAX_META_FIELDS, MAX_META_STRING, MAX_META_LIST = 64, 512, 32


class BadInput(Exception):
    """One input that cannot be used: `file` and `reason` end up in the manifest's `skipped`."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


@dataclass
class Record:
    """Where one sample's image is, and its texts. `image` is ('builtin', split, index, seed, size,
    max_shapes), ('file', path) or ('tar', tar path, offset, size). `extra`: the user's own JSON fields
    carried into the shard's json."""

    key: str
    source: str
    image: tuple
    caption: Optional[str] = None
    question: Optional[str] = None
    answer: Optional[str] = None
    extra: dict = field(default_factory=dict)


Skipped = List[Tuple[str, str]]  # (file, reason)


# --------------------------------------------------------------------------------------------------
# Sample keys, splits and carried metadata
# --------------------------------------------------------------------------------------------------
def safe_key(name) -> str:
    """A sample's identity as a WebDataset `__key__`: '/'-separated parts (empty and '.' parts dropped,
    so no leading '/' or './'), every '.' replaced by '_', unprintable characters by '_'."""
    parts = [p for p in str(name).replace("\\", "/").split("/") if p.strip() not in ("", ".")]
    key = "/".join(p.strip() for p in parts).replace(".", "_")
    return "".join(c if c.isprintable() else "_" for c in key)


def key_hash(*parts) -> int:
    """A 64-bit number from a sample's key (and a seed or a purpose): the first 8 bytes, big-endian, of
    sha256 of the parts joined by ':'. Everything tokenize draws per sample comes from it, so nothing
    depends on the listing order, the workers or the shard size."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")


def assign_split(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test': a pure function of the key and the seed, so a sample stays in its split
    whatever the workers, shard sizes or input order. u = key_hash(seed, key) / 2^64 is uniform on [0, 1):
    test if u < test_fraction, val if u < test_fraction + val_fraction."""
    u = key_hash(seed, key) / 2 ** 64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def order_key(key: str, seed: int) -> int:
    """Where a sample goes in tokenize's output order: a hash of its key, so the order is shuffled, the
    same for any listing order, and independent of the split assignment's hash."""
    return key_hash("order", seed, key)


def _small_value(v, in_list: bool = False) -> bool:
    if v is None or isinstance(v, (bool, int)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, str):
        return len(v) <= MAX_META_STRING
    return (not in_list and isinstance(v, list) and len(v) <= MAX_META_LIST
            and all(_small_value(x, True) for x in v))


def carried_fields(row) -> dict:
    """The user's JSON fields worth carrying into the shard's json: JSON scalars (strings up to
    MAX_META_STRING characters, finite numbers, booleans, null) and short lists of them, at most
    MAX_META_FIELDS fields. Our own keys (OUR_META), the caption and the image path are left out."""
    if not isinstance(row, dict):
        return {}
    out = {}
    for k, v in row.items():
        if len(out) == MAX_META_FIELDS:
            break
        if isinstance(k, str) and k not in OUR_META and k not in NOT_CARRIED and _small_value(v):
            out[k] = v
    return out


def _text(value) -> Optional[str]:
    """A question/answer field as text (a number becomes its string), None when absent or empty."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


class _Keys:
    """Keys seen so far: a second sample with the same key is skipped, the first one kept."""

    def __init__(self):
        self.seen: dict = {}

    def claim(self, key: str, where: str, skipped: Skipped) -> bool:
        if not key:
            skipped.append((where, "empty sample key"))
            return False
        if key in self.seen:
            skipped.append((where, f"duplicate key '{key}' (already used by {self.seen[key]}; the first "
                                   "is kept)"))
            return False
        self.seen[key] = where
        return True


# --------------------------------------------------------------------------------------------------
# Format detection and listing
# --------------------------------------------------------------------------------------------------
def detect_format(input: str, format: str = "auto") -> str:
    if format != "auto":
        return format
    if input == "builtin":
        return "builtin"
    if "{" in input or input.endswith(".tar"):
        return "wds"
    path = Path(input)
    if path.is_file() and path.suffix == ".jsonl":
        return "jsonl"
    if path.is_dir():
        return "wds" if any(path.glob("*.tar")) else "folder"
    if not path.exists():
        raise UserError(f"input not found: {input} (expected 'builtin', an image folder, a .jsonl file "
                        "or img2dataset .tar shards)")
    raise UserError(f"input {input}: cannot tell its format; expected 'builtin', an image folder, a .jsonl "
                    "file or img2dataset .tar shards (or set format=...)")


def list_builtin(split: str, n: int, shapes_cfg) -> List[Record]:
    settings = (shapes_cfg.seed, shapes_cfg.image_size, shapes_cfg.max_shapes)
    return [Record(key=f"{split}-{i:06d}", source=f"builtin:{split}/{i}", image=("builtin", split, i, *settings))
            for i in range(n)]


def _read_sidecar_json(path: Path, skipped: Skipped) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        skipped.append((str(path), f"unreadable JSON sidecar ({e}); its fields are ignored"))
        return {}
    if not isinstance(value, dict):
        skipped.append((str(path), "JSON sidecar is not an object ({...}); its fields are ignored"))
        return {}
    return value


def list_folder(root: str) -> Tuple[List[Record], Skipped]:
    """Every image under `root` (recursively, sorted) with `<stem>.txt` beside it as its caption and an
    optional `<stem>.json` holding a question, an answer and any other fields (e.g. a label). Key: the
    image's path relative to `root` without its extension."""
    records, skipped, keys = [], [], _Keys()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in (".txt", ".json"):
            continue  # sidecars, read with their image
        if suffix not in IMAGE_EXTENSIONS:
            skipped.append((str(path), f"unsupported file type '{suffix}' (images: {', '.join(IMAGE_EXTENSIONS)})"))
            continue
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
        if not caption:
            skipped.append((str(path), f"missing caption ({txt.name} absent or empty)"))
            continue
        key = safe_key(path.relative_to(root).with_suffix("").as_posix())
        if not keys.claim(key, str(path), skipped):
            continue
        extra = _read_sidecar_json(path.with_suffix(".json"), skipped)
        records.append(Record(key=key, source=str(path), image=("file", str(path)), caption=caption,
                              question=_text(extra.get("question")), answer=_text(extra.get("answer")),
                              extra=carried_fields(extra)))
    return records, skipped


def list_jsonl(path: str) -> Tuple[List[Record], Skipped]:
    """One JSON object per line; `image` is relative to the JSONL's folder (or absolute). Key: the row's
    `key` (or `id`) field, else the image's path relative to the JSONL's folder without extension."""
    records, skipped, keys = [], [], _Keys()
    base = Path(path).parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                skipped.append((where, "not a JSON object"))
                continue
            if not isinstance(row, dict) or not row.get("image"):
                skipped.append((where, "no 'image' field"))
                continue
            if not isinstance(row["image"], str):
                skipped.append((where, "'image' is not a path (a string)"))
                continue
            image = base / row["image"]
            if not str(row.get("caption") or "").strip():
                skipped.append((str(image), f"missing caption (line {lineno} has no 'caption')"))
                continue
            if not image.is_file():
                skipped.append((str(image), f"image file not found (line {lineno})"))
                continue
            given = next((row[k] for k in ("key", "id") if row.get(k) not in (None, "")), None)
            if given is None:
                try:
                    given = image.relative_to(base).with_suffix("").as_posix()
                except ValueError:  # an absolute path outside the JSONL's folder
                    given = image.with_suffix("").as_posix()
            key = safe_key(given)
            if not keys.claim(key, where, skipped):
                continue
            records.append(Record(key=key, source=str(image), image=("file", str(image)),
                                  caption=str(row["caption"]).strip(), question=_text(row.get("question")),
                                  answer=_text(row.get("answer")), extra=carried_fields(row)))
    return records, skipped


def wds_paths(input: str) -> List[str]:
    """A directory of .tar shards, one .tar, or a brace pattern such as `shards/{00000..00009}.tar`."""
    if "{" in input:
        from braceexpand import braceexpand

        paths = list(braceexpand(input))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise UserError(f"input {input}: {len(missing)} shard(s) not found, e.g. {missing[0]}")
        return paths
    path = Path(input)
    return sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else [str(path)]


def _split_key(name: str) -> Tuple[str, str]:
    """WebDataset's convention: the key runs to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def list_wds(input: str) -> Tuple[List[Record], Skipped]:
    """img2dataset's layout: per sample `<key>.jpg|png|webp`, `<key>.txt` (caption), `<key>.json`. Key:
    the sample's key inside its tar (img2dataset's keys are unique across shards)."""
    records, skipped, keys = [], [], _Keys()
    for tar_path in wds_paths(input):
        groups: dict = {}
        try:
            with tarfile.open(tar_path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    entry = groups.setdefault(key, {})
                    if ext in ("txt", "json"):
                        entry[ext] = tar.extractfile(m).read().decode("utf-8", errors="replace")
                    else:
                        entry[ext] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            skipped.append((tar_path, f"unreadable tar ({e})"))
            continue
        for key, entry in groups.items():
            where = f"{tar_path}:{key}"
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in entry), None)
            if image_ext is None:
                skipped.append((where, f"no image (jpg/png/webp); found {', '.join(sorted(entry)) or 'nothing'}"))
                continue
            try:
                meta = json.loads(entry["json"]) if "json" in entry else {}
            except ValueError:
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
            caption = (entry.get("txt") or str(meta.get("caption") or "")).strip()
            if not caption:
                skipped.append((where, "missing caption (no .txt and no 'caption' in .json)"))
                continue
            if not keys.claim(safe_key(key), where, skipped):
                continue
            offset, size = entry[image_ext]
            records.append(Record(key=safe_key(key), source=where, image=("tar", tar_path, offset, size),
                                  caption=caption, question=_text(meta.get("question")),
                                  answer=_text(meta.get("answer")), extra=carried_fields(meta)))
    return records, skipped


def list_records(format: str, input: str) -> Tuple[List[Record], Skipped]:
    """Records and skipped inputs of a user input (the built-in dataset is listed by `list_builtin`)."""
    return {"folder": list_folder, "jsonl": list_jsonl, "wds": list_wds}[format](input)


# --------------------------------------------------------------------------------------------------
# Loading (in the workers)
# --------------------------------------------------------------------------------------------------
def center_square(image, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3]: RGB, center crop to a square, then resize."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def load_record(record: Record, image_size: int) -> dict:
    """The sample a record points at: image uint8 [S, S, 3], caption, question, answer, meta (the
    shard's json). Raises BadInput when the image cannot be decoded."""
    from PIL import Image

    kind = record.image[0]
    if kind == "builtin":
        from mmar_cli.data.shapes import make_sample

        _, split, index, seed, size, max_shapes = record.image
        s = make_sample(split, index, seed=seed, image_size=size, max_shapes=max_shapes)
        image = s["image"] if size == image_size else center_square(Image.fromarray(s["image"]), image_size)
        meta = {"source": record.source, "size": [size, size], "question": s["question"],
                "answer": s["answer"], "attributes": s["attributes"], "background": s["background"],
                "jitter": [list(j) for j in s["jitter"]]}
        return {"image": image, "caption": s["caption"], "meta": meta}
    try:
        if kind == "file":
            pil = Image.open(record.image[1])
        else:
            _, tar_path, offset, size = record.image
            with open(tar_path, "rb") as f:
                f.seek(offset)
                pil = Image.open(io.BytesIO(f.read(size)))
        pil.load()
        original = [pil.height, pil.width]
        image = center_square(pil, image_size)
    except Exception as e:  # PIL raises many kinds (OSError, UnidentifiedImageError, DecompressionBomb...)
        raise BadInput(record.source, f"unreadable image ({type(e).__name__}: {e})") from None
    meta = {**record.extra, "source": record.source, "size": original, "question": record.question,
            "answer": record.answer, "attributes": None}
    return {"image": image, "caption": record.caption, "meta": meta}
