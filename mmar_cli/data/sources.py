"""Readers of `mmar tokenize`'s inputs: the built-in dataset, an image folder with sidecar captions, a
JSONL of {image, caption[, question, answer]}, and WebDataset shards in img2dataset's layout.

Reading happens in two steps so the work can be spread over processes: `list_records` runs once in the
main process and returns small picklable `Record`s (where the pixels are, plus the texts) and the inputs
it had to skip; `load_record` runs in the workers and returns the pixels, center-cropped and resized.
A record that cannot be used raises `BadInput`, which the stage counts (or, with --strict, reports).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from mmar_cli.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FORMATS = ("builtin", "folder", "jsonl", "wds")


class BadInput(Exception):
    """One input that cannot be used: `file` and `reason` end up in the manifest's `skipped`."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


@dataclass
class Record:
    """Where one sample's image is, and its texts. `image` is ('builtin', split, index, seed, size,
    max_shapes), ('file', path) or ('tar', tar path, offset, size)."""

    key: str
    source: str
    image: tuple
    caption: Optional[str] = None
    question: Optional[str] = None
    answer: Optional[str] = None


Skipped = List[Tuple[str, str]]  # (file, reason)


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
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        skipped.append((str(path), f"unreadable JSON sidecar ({e}); its question/answer are ignored"))
        return {}


def list_folder(root: str) -> Tuple[List[Record], Skipped]:
    """Every image under `root` (recursively, sorted) with `<stem>.txt` beside it as its caption and an
    optional `<stem>.json` holding a question and answer."""
    records, skipped = [], []
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
        extra = _read_sidecar_json(path.with_suffix(".json"), skipped)
        records.append(Record(key=f"{len(records):08d}", source=str(path), image=("file", str(path)),
                              caption=caption, question=extra.get("question"), answer=extra.get("answer")))
    return records, skipped


def list_jsonl(path: str) -> Tuple[List[Record], Skipped]:
    """One JSON object per line; `image` is relative to the JSONL's folder (or absolute)."""
    records, skipped = [], []
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
            image = base / row["image"]
            if not str(row.get("caption") or "").strip():
                skipped.append((str(image), f"missing caption (line {lineno} has no 'caption')"))
                continue
            if not image.is_file():
                skipped.append((str(image), f"image file not found (line {lineno})"))
                continue
            records.append(Record(key=f"{len(records):08d}", source=str(image), image=("file", str(image)),
                                  caption=str(row["caption"]).strip(), question=row.get("question"),
                                  answer=row.get("answer")))
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
    """img2dataset's layout: per sample `<key>.jpg|png|webp`, `<key>.txt` (caption), `<key>.json`."""
    records, skipped = [], []
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
            caption = (entry.get("txt") or str(meta.get("caption") or "")).strip()
            if not caption:
                skipped.append((where, "missing caption (no .txt and no 'caption' in .json)"))
                continue
            offset, size = entry[image_ext]
            records.append(Record(key=f"{len(records):08d}", source=where, image=("tar", tar_path, offset, size),
                                  caption=caption, question=meta.get("question"), answer=meta.get("answer")))
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
                "answer": s["answer"], "attributes": s["attributes"], "background": s["background"]}
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
    meta = {"source": record.source, "size": original, "question": record.question,
            "answer": record.answer, "attributes": None}
    return {"image": image, "caption": record.caption, "meta": meta}
