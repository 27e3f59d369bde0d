"""`mmar tokenize` end to end: built-in splits, folder / JSONL / img2dataset inputs, bad inputs."""

import io
import json
import re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.cli_common import command_line
from mmar_cli.data import shards
from mmar_cli.data.shapes import make_sample

SMALL = ["shapes.num_train=30", "shapes.num_val=7", "shapes.num_test=5", "shard_size=16"]


def tokenize(*args):
    result = CliRunner().invoke(app, ["tokenize", *map(str, args)])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def ok(*args):
    result, output = tokenize(*args)
    assert result.exit_code == 0, output
    return output


def png_bytes(size=(40, 30), colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def decoded(directory):
    return [shards.decode_sample(s) for s in wds.WebDataset(shards.shard_paths(directory), shardshuffle=False)]


# --------------------------------------------------------------------------------------------------
# The built-in dataset
# --------------------------------------------------------------------------------------------------
def test_no_arguments_writes_train_val_test_with_shared_tokenizers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = ok(*SMALL)
    root = tmp_path / "data" / "shapes"
    manifests = {s: shards.read_manifest(root / s, verify=True) for s in ("train", "val", "test")}
    assert {s: m["samples"] for s, m in manifests.items()} == {"train": 30, "val": 7, "test": 5}
    assert [s["file"] for s in manifests["train"]["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((root / "train" / "sizes.json").read_text()) == {"train-000000.tar": 16, "train-000001.tar": 14}
    assert "30" in output and "images/s" in output

    train = manifests["train"]
    assert train["source"] == {"input": "builtin", "format": "builtin", "split": "train"}
    assert train["tokens"] == {"shape": [16, 24], "dtype": "float16", "flip": False, "views": 0}
    spec = train["image_tokenizer"]["spec"]
    assert (spec["kind"], spec["pca_dim"], train["text_tokenizer"]["spec"]["kind"]) == ("pca", 24, "bpe")
    assert train["command"] == command_line() and train["format_version"] == 1 and train["skipped"]["count"] == 0
    for m in manifests.values():  # one tokenizer, fitted on train, copied as is
        assert m["text_tokenizer"] == train["text_tokenizer"] and m["image_tokenizer"] == train["image_tokenizer"]
    tok_bytes = {(root / s / "text_tokenizer.json").read_bytes() for s in manifests}
    assert len(tok_bytes) == 1

    # the tokens decode to the images, up to the components left out; texts and attributes come through
    text_tok, image_tok = shards.load_tokenizers(root / "val")
    samples = decoded(root / "val")
    assert [s["key"] for s in samples] == [f"val-{i:06d}" for i in range(7)]
    for i, s in enumerate(samples):
        truth = make_sample("val", i)
        assert np.abs(image_tok.decode(s["tokens"][None])[0].astype(int) - truth["image"]).mean() < 20
        assert (s["caption"], s["question"], s["answer"]) == (truth["caption"], truth["question"], truth["answer"])
        assert s["meta"]["attributes"] == truth["attributes"]
        assert text_tok.decode(text_tok.encode(s["caption"])) == s["caption"]
    assert len(text_tok.encode("a large red circle")) == 4


def test_pca_state_is_saved_once_and_shared_by_every_split_and_mirrored_tokens_only_in_training(tmp_path):
    output = ok("--out", tmp_path / "o", *SMALL, "image_tokenizer.kind=pca", "image_tokenizer.pca_dim=16",
                "image_tokenizer.flip=true")
    hashes = set()
    for split in ("train", "val", "test"):
        m = shards.read_manifest(tmp_path / "o" / split)
        assert m["tokens"] == {"shape": [16, 16], "dtype": "float16", "flip": split == "train", "views": 0}
        assert (tmp_path / "o" / split / "image_tokenizer.safetensors").is_file()
        hashes.add(m["image_tokenizer"]["hash"])
    assert len(hashes) == 1
    train = decoded(tmp_path / "o" / "train")
    assert all(s["flip"].shape == (16, 16) and not np.array_equal(s["flip"], s["tokens"]) for s in train)
    sided = sum(re.search(r"\b(left|right)\b", make_sample("train", i)["caption"]) is not None for i in range(30))
    assert 0 < sided < 30 and f"warning: image_tokenizer.flip: {sided} of 30 captions" in " ".join(output.split())
    _, image_tok = shards.load_tokenizers(tmp_path / "o" / "test")
    s = decoded(tmp_path / "o" / "test")[0]
    assert s["flip"] is None
    truth = make_sample("test", 0)["image"]
    assert np.abs(image_tok.decode(s["tokens"][None])[0].astype(int) - truth).mean() < 20


@pytest.mark.slow  # two spawned worker processes start in a few seconds
def test_output_does_not_depend_on_worker_count(tmp_path):
    ok("--out", tmp_path / "one", *SMALL, "shapes.num_val=0", "shapes.num_test=0")
    ok("--out", tmp_path / "two", "--workers", 2, *SMALL, "shapes.num_val=0", "shapes.num_test=0")
    one, two = (shards.read_manifest(tmp_path / d / "train") for d in ("one", "two"))
    assert one["shards"] == two["shards"] and len(one["shards"]) == 2
    assert one["text_tokenizer"]["hash"] == two["text_tokenizer"]["hash"]


@pytest.mark.slow  # diffusers import + a small VAE on CPU
def test_vae_tokens_with_flip_in_two_workers(tmp_path):
    from test_tokenizers import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    ok("--out", tmp_path / "o", "--workers", 2, "shapes.num_train=24", "shapes.num_val=0", "shapes.num_test=0",
       "shard_size=10", "image_tokenizer.kind=vae", f"image_tokenizer.vae_path={vae}",
       "image_tokenizer.patch_size=2", "image_tokenizer.flip=true")
    m = shards.read_manifest(tmp_path / "o" / "train", verify=True)
    assert m["samples"] == 24 and len(m["shards"]) == 3
    assert m["tokens"] == {"shape": [64, 16], "dtype": "float16", "flip": True, "views": 0}
    spec = m["image_tokenizer"]["spec"]
    assert spec["vae_path"] == vae and spec["vae_scale"] > 0 and spec["downsample"] == 2
    got = decoded(tmp_path / "o" / "train")
    tokens = np.stack([s["tokens"] for s in got]).astype(np.float32)
    assert 0.8 < tokens.std() < 1.2  # the measured scale makes the latents unit-variance
    assert not np.array_equal(got[0]["flip"], got[0]["tokens"]) and got[0]["flip"].shape == (64, 16)
    _, image_tok = shards.load_tokenizers(tmp_path / "o" / "train")
    assert image_tok.decode(got[0]["tokens"][None]).shape == (1, 32, 32, 3)


# --------------------------------------------------------------------------------------------------
# User inputs
# --------------------------------------------------------------------------------------------------
def write_img2dataset_tar(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_img2dataset_shards_with_bad_samples_skipped_and_counted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_img2dataset_tar(src / "00000.tar", [
        {"__key__": "000000000", "jpg": np.full((48, 64, 3), 200, np.uint8), "txt": "a red wall",
         "json": {"key": "000000000", "url": "http://x", "question": "what is it?", "answer": "a wall"}},
        {"__key__": "000000001", "png": png_bytes(), "txt": "a red square"},
        {"__key__": "000000002", "txt": "caption without image", "json": {"key": "000000002"}},
    ])
    write_img2dataset_tar(src / "00001.tar", [
        {"__key__": "000010000", "webp": png_bytes()[:40], "txt": "broken image"},
        {"__key__": "000010001", "jpg": np.zeros((8, 8, 3), np.uint8), "json": {"caption": "caption from json"}},
        {"__key__": "000010002", "jpg": np.zeros((8, 8, 3), np.uint8), "json": {"status": "success"}},
    ])
    (src / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the tars

    ok("--input", f"{src}/{{00000..00001}}.tar", "--out", tmp_path / "out", "image_tokenizer.kind=patch")
    m = shards.read_manifest(tmp_path / "out", verify=True)
    assert m["samples"] == 3 and m["source"]["format"] == "wds" and m["source"]["split"] is None
    reasons = m["skipped"]["reasons"]
    assert m["skipped"]["count"] == 3
    assert "no image" in reasons[f"{src}/00000.tar:000000002"]
    assert "unreadable image" in reasons[f"{src}/00001.tar:000010000"]
    assert "missing caption" in reasons[f"{src}/00001.tar:000010002"]
    got = {s["caption"]: s for s in decoded(tmp_path / "out")}
    assert sorted(got) == ["a red square", "a red wall", "caption from json"]
    wall = got["a red wall"]
    assert (wall["question"], wall["answer"]) == ("what is it?", "a wall")
    assert wall["meta"]["size"] == [48, 64] and wall["tokens"].shape == (16, 192)

    ok("--input", src, "--out", tmp_path / "dir", "image_tokenizer.kind=patch")  # a directory of tars works the same
    assert shards.read_manifest(tmp_path / "dir")["shards"][0]["sha256"] == m["shards"][0]["sha256"]


def test_image_folder_with_sidecar_captions(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png_bytes((64, 32)))
    (src / "a.txt").write_text("a wide red thing\n")
    (src / "sub" / "b.jpg").write_bytes(png_bytes((20, 20), (0, 0, 255)))  # PIL reads by content
    (src / "sub" / "b.txt").write_text("a blue thing")
    (src / "sub" / "b.json").write_text(json.dumps({"question": "what colour?", "answer": "blue"}))
    (src / "no_caption.png").write_bytes(png_bytes())
    (src / "notes.pdf").write_bytes(b"%PDF")
    (src / "corrupt.png").write_bytes(b"not a png at all")
    (src / "corrupt.txt").write_text("never read")

    ok("--input", src, "--out", tmp_path / "out", "text_tokenizer.kind=byte", "image_size=16", "image_tokenizer.kind=patch")
    m = shards.read_manifest(tmp_path / "out")
    assert m["samples"] == 2 and m["tokens"]["shape"] == [4, 192] and m["text_tokenizer"]["spec"]["kind"] == "byte"
    reasons = m["skipped"]["reasons"]
    assert set(reasons) == {str(src / "no_caption.png"), str(src / "notes.pdf"), str(src / "corrupt.png")}
    assert "missing caption" in reasons[str(src / "no_caption.png")]
    assert "unsupported file type '.pdf'" in reasons[str(src / "notes.pdf")]
    assert "unreadable image" in reasons[str(src / "corrupt.png")]
    assert not (tmp_path / "out" / "text_tokenizer.json").exists()
    got = {s["caption"]: s for s in decoded(tmp_path / "out")}
    assert sorted(got) == ["a blue thing", "a wide red thing"]
    blue = got["a blue thing"]
    assert blue["answer"] == "blue" and blue["meta"]["source"] == str(src / "sub" / "b.jpg")
    _, image_tok = shards.load_tokenizers(tmp_path / "out")
    wide = image_tok.decode(got["a wide red thing"]["tokens"][None])[0]
    assert (wide == [200, 30, 30]).all()  # center crop of a flat image


def test_jsonl_paths_are_relative_to_its_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(png_bytes())
    rows = [{"image": "imgs/x.png", "caption": "a red box", "question": "colour?", "answer": "red"},
            {"image": "imgs/x.png"},
            {"image": "imgs/missing.png", "caption": "gone"}]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    output = ok("--input", tmp_path / "pairs.jsonl", "--out", tmp_path / "out", "image_tokenizer.flip=true")
    assert "warning" not in output  # no caption says left or right
    m = shards.read_manifest(tmp_path / "out")
    assert m["samples"] == 1 and m["source"]["format"] == "jsonl" and m["skipped"]["count"] == 3
    assert m["tokens"]["flip"] is True
    reasons = " | ".join(m["skipped"]["reasons"].values())
    assert "missing caption" in reasons and "image file not found" in reasons and "not a JSON object" in reasons
    s = decoded(tmp_path / "out")[0]
    assert (s["caption"], s["question"], s["answer"]) == ("a red box", "colour?", "red")


# --------------------------------------------------------------------------------------------------
# Bad input and refusals
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("missing_caption", "no_caption.png: missing caption"),
    ("corrupt", "corrupt.png: unreadable image"),
    ("unknown_type", "notes.pdf: unsupported file type"),
])
def test_strict_stops_at_the_bad_file(tmp_path, case, expected):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.png").write_bytes(png_bytes())
    (src / "good.txt").write_text("fine")
    if case == "missing_caption":
        (src / "no_caption.png").write_bytes(png_bytes())
    elif case == "corrupt":
        (src / "corrupt.png").write_bytes(b"garbage")
        (src / "corrupt.txt").write_text("caption")
    else:
        (src / "notes.pdf").write_bytes(b"%PDF")
    result, output = tokenize("--input", src, "--out", tmp_path / "out", "--strict")
    assert result.exit_code == 2 and expected in output and "Traceback" not in output
    assert not (tmp_path / "out" / "manifest.json").exists()
    ok("--input", src, "--out", tmp_path / "lenient")  # without --strict it is skipped and counted
    assert shards.read_manifest(tmp_path / "lenient")["skipped"]["count"] == 1


def test_empty_or_unusable_input_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result, output = tokenize("--input", tmp_path / "empty", "--out", tmp_path / "o1")
    assert result.exit_code == 2 and "no usable samples" in output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    (tmp_path / "bad" / "x.txt").write_text("caption")
    result, output = tokenize("--input", tmp_path / "bad", "--out", tmp_path / "o2")
    assert result.exit_code == 2 and "no usable samples" in output and "x.png" in output
    result, output = tokenize("--input", tmp_path / "nowhere", "--out", tmp_path / "o3")
    assert result.exit_code == 2 and "input not found" in output
    (tmp_path / "table.csv").write_text("a,b")
    result, output = tokenize("--input", tmp_path / "table.csv", "--out", tmp_path / "o4")
    assert result.exit_code == 2 and "cannot tell its format" in output


def test_existing_output_needs_overwrite(tmp_path):
    args = ["--out", tmp_path / "o", *SMALL, "shapes.num_val=0", "shapes.num_test=0"]
    ok(*args)
    result, output = tokenize(*args)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in output
    ok(*args, "--overwrite", "shapes.num_train=20")
    assert shards.read_manifest(tmp_path / "o" / "train")["samples"] == 20
    (tmp_path / "o" / "train" / "my_notes.md").write_text("keep me")
    result, output = tokenize(*args, "--overwrite")
    assert result.exit_code == 2 and "my_notes.md" in output
    assert (tmp_path / "o" / "train" / "my_notes.md").exists()


def test_interrupted_run_leaves_no_complete_looking_output(tmp_path, monkeypatch):
    real, calls = shards.encode_sample, []

    def interrupt_in_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "encode_sample", interrupt_in_second_shard)
    result, output = tokenize("--out", tmp_path / "o", *SMALL)
    assert result.exit_code == 130
    train = tmp_path / "o" / "train"
    # the finished shard only, beside the PCA basis (saved first)
    assert sorted(p.name for p in train.iterdir()) == ["image_tokenizer.safetensors", "train-000000.tar"]
    with pytest.raises(Exception, match="not a token shard directory"):
        shards.read_manifest(train)


def test_help_lists_every_option_and_key():
    result = CliRunner().invoke(app, ["tokenize", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--input", "--out", "--workers", "--strict", "--overwrite", "--config", "--val-fraction",
                   "--test-fraction", "--split-seed", "--tokenizer-from"):
        assert option in result.output
    for key in ("image_tokenizer.kind", "image_tokenizer.pca_dim", "text_tokenizer.vocab_size",
                "shapes.num_train", "shard_size", "val_fraction", "test_fraction", "split_seed", "tokenizer_from"):
        assert key in result.output
