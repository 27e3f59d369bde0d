"""`mmar tokenize` on a user's own data: train/val/test splits by sample key, tokenizers fitted on train
only, `--tokenizer-from`, the user's metadata carried into the shards, and the refusals."""

import hashlib
import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmar_cli.data import shards, sources
from mmar_cli.tokenizers.image import PCATokenizer
from test_tokenize_stage import ok, tokenize

SMALL_IMAGES = ["image_size=16", "image_tokenizer.kind=pca", "image_tokenizer.pca_dim=8"]


def refused(*args) -> str:
    """The one-line message of a refused run (exit 2, no traceback, nothing written)."""
    result, output = tokenize(*args)
    assert result.exit_code == 2, output
    message = (result.stderr if result.stderr_bytes is not None else result.output).strip()
    assert "Traceback" not in output and len(message.splitlines()) == 1 and message.startswith("error:"), output
    return message


def png_bytes(rng, size=(16, 16)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def reference_split(key, seed, val, test):
    """The documented rule, written out again."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2 ** 64
    return "test" if u < test else "val" if u < test + val else "train"


def make_samples(n, caption=lambda key: f"a photo number {key[-3:]}", seed=0):
    """img2dataset-style samples: 9-digit keys, png, txt and img2dataset's own bookkeeping json."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        key = f"{i // 100:05d}{i % 100:04d}"
        samples.append({"__key__": key, "png": png_bytes(rng), "txt": caption(key),
                        "json": {"key": key, "url": f"http://example.com/{i}.png", "status": "success",
                                 "width": 16, "height": 16, "original_width": 640, "error_message": None,
                                 "label": f"class{i % 5}"}})
    return samples


def write_tars(directory, groups):
    directory.mkdir(parents=True, exist_ok=True)
    for k, group in enumerate(groups):
        with wds.TarWriter(str(directory / f"{k:05d}.tar")) as sink:
            for s in group:
                sink.write(s)
    return directory


def keys_by_split(root, splits=("train", "val", "test")):
    out = {}
    for split in splits:
        paths = shards.shard_paths(root / split)
        out[split] = [s["__key__"] for s in wds.WebDataset(paths, shardshuffle=False)]
    return out


def decoded(directory):
    return [shards.decode_sample(s) for s in wds.WebDataset(shards.shard_paths(directory), shardshuffle=False)]


# --------------------------------------------------------------------------------------------------
# Split assignment
# --------------------------------------------------------------------------------------------------
def test_split_depends_on_the_key_only_not_on_shards_workers_or_order(tmp_path):
    samples = make_samples(200)
    one = write_tars(tmp_path / "one", [samples])
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    three = write_tars(tmp_path / "three", [shuffled[:50], shuffled[50:120], shuffled[120:]])
    fractions = ["--val-fraction", 0.2, "--test-fraction", 0.1]
    ok("--input", one, "--out", tmp_path / "a", *fractions, "image_size=16")
    ok("--input", three, "--out", tmp_path / "b", *fractions, "image_size=16", "shard_size=7", "--workers", 2)

    a, b = keys_by_split(tmp_path / "a"), keys_by_split(tmp_path / "b")
    assert {s: sorted(k) for s, k in a.items()} == {s: sorted(k) for s, k in b.items()}
    everything = sorted(s["__key__"] for s in samples)
    assert sorted(k for keys in a.values() for k in keys) == everything  # union = all, no key twice
    for split, keys in a.items():
        assert all(reference_split(k, 0, 0.2, 0.1) == split for k in keys)
    assert 25 <= len(a["val"]) <= 55 and 8 <= len(a["test"]) <= 35  # 40 and 20 expected

    m = shards.read_manifest(tmp_path / "b" / "val", verify=True)
    counts = {s: len(k) for s, k in a.items()}
    assert m["split"] == {"name": "val", "seed": 0, "fractions": {"val": 0.2, "test": 0.1}, "counts": counts,
                          "rule": m["split"]["rule"]}
    assert m["source"] == {"input": str(three), "format": "wds", "split": "val"}
    assert len(shards.read_manifest(tmp_path / "b" / "train")["shards"]) > 1

    ok("--input", one, "--out", tmp_path / "c", *fractions, "image_size=16", "--split-seed", 7)
    assert sorted(keys_by_split(tmp_path / "c")["test"]) != sorted(a["test"])  # another seed, other samples


def test_zero_fractions_write_one_directory_and_a_zero_split_is_not_written(tmp_path):
    src = write_tars(tmp_path / "in", [make_samples(30)])
    ok("--input", src, "--out", tmp_path / "flat", "image_size=16")
    m = shards.read_manifest(tmp_path / "flat")
    assert m["samples"] == 30 and m["source"]["split"] is None and "split" not in m
    keys = [s["key"] for s in decoded(tmp_path / "flat")]
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]
    assert keys == sorted(keys, key=lambda k: sources.order_key(k, 0)) != sorted(keys)  # shuffled by key hash

    ok("--input", src, "--out", tmp_path / "split", "--test-fraction", 0.3, "image_size=16")
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["test", "train"]
    m = shards.read_manifest(tmp_path / "split" / "test")
    assert set(m["split"]["counts"]) == {"train", "test"} and sum(m["split"]["counts"].values()) == 30


def test_keys_of_folder_and_jsonl_inputs_and_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "sub.dir").mkdir(parents=True)
    for rel in ("a.png", "a.jpg", "sub.dir/b.v2.png"):
        (folder / rel).write_bytes(png_bytes(rng))
        (folder / rel).with_suffix(".txt").write_text("a caption")
    records, skipped = sources.list_records("folder", str(folder))
    assert [r.key for r in records] == ["a", "sub_dir/b_v2"]  # sorted listing: a.jpg comes first
    assert skipped == [(str(folder / "a.png"), f"duplicate key 'a' (already used by {folder / 'a.jpg'}; "
                                               "the first is kept)")]

    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "photos/a.jpg", "caption": "one", "id": 17},
        {"image": "photos/sub.dir/b.v2.png", "caption": "two"},
        {"image": "photos/a.jpg", "caption": "three", "key": "x.y"},
        {"image": "photos/a.jpg", "caption": "again", "id": "17"},
    ]) + "\n")
    records, skipped = sources.list_records("jsonl", str(tmp_path / "pairs.jsonl"))
    assert [r.key for r in records] == ["17", "photos/sub_dir/b_v2", "x_y"]
    assert len(skipped) == 1 and "duplicate key '17'" in skipped[0][1]

    src = write_tars(tmp_path / "tars", [make_samples(3), make_samples(2)])  # keys 000000000, 000000001 twice
    ok("--input", src, "--out", tmp_path / "out", "image_size=16")
    m = shards.read_manifest(tmp_path / "out")
    assert m["samples"] == 3 and m["skipped"]["count"] == 2
    assert "duplicate key '000000001'" in m["skipped"]["reasons"][f"{src}/00001.tar:000000001"]


# --------------------------------------------------------------------------------------------------
# Tokenizers: fitted on train only, shared by every split
# --------------------------------------------------------------------------------------------------
def test_tokenizers_are_fitted_on_the_training_split_only(tmp_path):
    def caption(key):  # a word only the test split's captions use
        return "a quokka on the grass" if reference_split(key, 0, 0.2, 0.2) == "test" else "a cat on the grass"

    src = write_tars(tmp_path / "in", [make_samples(120, caption)])
    ok("--input", src, "--out", tmp_path / "out", "--val-fraction", 0.2, "--test-fraction", 0.2, *SMALL_IMAGES)
    root = tmp_path / "out"
    manifests = {s: shards.read_manifest(root / s, verify=True) for s in ("train", "val", "test")}
    for which in ("image_tokenizer", "text_tokenizer"):
        assert len({m[which]["hash"] for m in manifests.values()}) == 1
    for file in ("image_tokenizer.safetensors", "text_tokenizer.json"):
        assert len({(root / s / file).read_bytes() for s in manifests}) == 1

    records, _ = sources.list_records("wds", str(src))
    images = {r.key: sources.load_record(r, 16)["image"] for r in records}
    train = np.stack([images[r.key] for r in records if reference_split(r.key, 0, 0.2, 0.2) == "train"])
    text_tok, image_tok = shards.load_tokenizers(root / "test")
    expected = PCATokenizer.fit(train, 16, 8, 8)
    assert torch.allclose(image_tok.basis, expected.basis, atol=1e-6)
    assert torch.allclose(image_tok.mean, expected.mean, atol=1e-6)
    everything = PCATokenizer.fit(np.stack(list(images.values())), 16, 8, 8)
    assert not torch.allclose(everything.mean, expected.mean, atol=1e-6)  # the check can tell them apart

    assert "▁quokka" not in text_tok.hf.get_vocab() and "▁cat" in text_tok.hf.get_vocab()
    ok("--input", src, "--out", tmp_path / "all", *SMALL_IMAGES)  # the control: unsplit, quokka is learnt
    assert "▁quokka" in shards.load_tokenizers(tmp_path / "all")[0].hf.get_vocab()


def test_tokenizer_from_reuses_the_tokenizers_as_they_are(tmp_path):
    src = write_tars(tmp_path / "in", [make_samples(60)])
    ok("--input", src, "--out", tmp_path / "d", "--test-fraction", 0.2, *SMALL_IMAGES,
       "text_tokenizer.vocab_size=100")
    d = shards.read_manifest(tmp_path / "d" / "train")
    held_out = write_tars(tmp_path / "held", [make_samples(20, lambda key: "a completely new caption", seed=5)])

    # image_size (16) comes from the tokenizer; a setting equal to the loaded one is fine
    ok("--input", held_out, "--out", tmp_path / "e", "--tokenizer-from", tmp_path / "d" / "train",
       "image_tokenizer.pca_dim=8", "text_tokenizer.vocab_size=100")
    e = shards.read_manifest(tmp_path / "e", verify=True)
    for which in ("image_tokenizer", "text_tokenizer"):
        assert e[which]["hash"] == d[which]["hash"]
    assert e["tokens"] == d["tokens"] and e["samples"] == 20
    assert e["source"]["tokenizer_from"] == str(tmp_path / "d" / "train")
    assert e["tokenizer_settings"] == d["tokenizer_settings"]
    for file in ("image_tokenizer.safetensors", "text_tokenizer.json"):
        assert (tmp_path / "e" / file).read_bytes() == (tmp_path / "d" / "train" / file).read_bytes()

    # with fractions: every split gets the given tokenizers
    ok("--input", held_out, "--out", tmp_path / "f", "--tokenizer-from", tmp_path / "d" / "train",
       "--val-fraction", 0.3)
    for split in ("train", "val"):
        assert shards.read_manifest(tmp_path / "f" / split)["image_tokenizer"]["hash"] == d["image_tokenizer"]["hash"]

    # the built-in dataset can be tokenized with them too (its 32 px images resized to the tokenizer's 16)
    ok("--out", tmp_path / "g", "--tokenizer-from", tmp_path / "d" / "train", "shapes.num_train=8",
       "shapes.num_val=0", "shapes.num_test=0")
    assert shards.read_manifest(tmp_path / "g" / "train")["text_tokenizer"]["hash"] == d["text_tokenizer"]["hash"]


@pytest.mark.parametrize("setting, loaded", [
    ("image_tokenizer.pca_dim=4", "pca_dim 8"),
    ("image_size=24", "image_size 16"),
    ("image_size=32", "image_size 16"),  # the default value, but given explicitly
    ("image_tokenizer.kind=patch", "kind pca"),
    ("text_tokenizer.kind=byte", "kind bpe"),
    ("image_tokenizer.vae_scale=0.5", "a pca tokenizer, no vae_scale"),
])
def test_tokenizer_from_refuses_a_contradicting_setting(tmp_path, setting, loaded):
    src = write_tars(tmp_path / "in", [make_samples(20)])
    ok("--input", src, "--out", tmp_path / "d", *SMALL_IMAGES)
    message = refused("--input", src, "--out", tmp_path / "e", "--tokenizer-from", tmp_path / "d", setting)
    assert f"{setting} disagrees with the tokenizer of {tmp_path / 'd'} ({loaded})" in message
    assert "without --tokenizer-from" in message and not (tmp_path / "e").exists()


def test_tokenizer_from_checks_the_settings_of_a_config_file(tmp_path):
    src = write_tars(tmp_path / "in", [make_samples(20)])
    ok("--input", src, "--out", tmp_path / "d", *SMALL_IMAGES)
    (tmp_path / "preset.yaml").write_text("image_tokenizer:\n  kind: pca\n  pca_dim: 32\n")
    message = refused("--config", tmp_path / "preset.yaml", "--input", src, "--out", tmp_path / "e",
                      "--tokenizer-from", tmp_path / "d")
    assert "image_tokenizer.pca_dim=32 disagrees" in message and "(pca_dim 8)" in message


# --------------------------------------------------------------------------------------------------
# The user's metadata
# --------------------------------------------------------------------------------------------------
def test_the_inputs_own_fields_reach_the_shard_json(tmp_path):
    rng = np.random.default_rng(0)
    sample = make_samples(1)[0]
    sample["json"].update({"exif": "x" * 5000, "nested": {"a": 1}, "tags": ["red", "round"], "size": "big",
                           "source": "not ours", "question": 3, "answer": 4})
    src = write_tars(tmp_path / "in", [[sample, {"__key__": "000000009", "png": png_bytes(rng), "txt": "t",
                                                 "json": ["not", "an", "object"]}]])
    ok("--input", src, "--out", tmp_path / "wds", "image_size=16")
    first, second = decoded(tmp_path / "wds")
    meta = first["meta"]
    assert meta["label"] == "class0" and meta["status"] == "success" and meta["url"].startswith("http")
    assert meta["tags"] == ["red", "round"] and meta["width"] == 16 and meta["key"] == "000000000"
    assert meta["size"] == [16, 16] and meta["source"] == f"{src}/00000.tar:000000000"  # ours win
    assert (first["question"], first["answer"]) == ("3", "4")
    assert "exif" not in meta and "nested" not in meta and "caption" not in meta
    assert second["meta"]["attributes"] is None and "label" not in second["meta"]

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "x.png").write_bytes(png_bytes(rng))
    (folder / "x.txt").write_text("a thing")
    (folder / "x.json").write_text(json.dumps({"label": 3, "answer": "yes", "question": "is it?"}))
    ok("--input", folder, "--out", tmp_path / "folder", "image_size=16")
    s = decoded(tmp_path / "folder")[0]
    assert s["meta"]["label"] == 3 and s["answer"] == "yes" and s["key"] == "x"

    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "photos/x.png", "caption": "c", "label": "dog",
                                                     "score": 0.5}) + "\n")
    ok("--input", tmp_path / "rows.jsonl", "--out", tmp_path / "jsonl", "image_size=16")
    s = decoded(tmp_path / "jsonl")[0]
    assert (s["meta"]["label"], s["meta"]["score"], s["key"]) == ("dog", 0.5, "photos/x")
    assert "image" not in s["meta"] and s["meta"]["source"] == str(tmp_path / "photos" / "x.png")


# --------------------------------------------------------------------------------------------------
# Refusals: exit 2, one line
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--val-fraction", -0.1], "val_fraction=-0.1 is outside [0, 1)"),
    (["--test-fraction", 1], "test_fraction=1 is outside [0, 1)"),
    (["--val-fraction", 0.5, "--test-fraction", 0.5], "val_fraction=0.5 + test_fraction=0.5 = 1"),
    (["--val-fraction", 0.001], "the val split would be empty (val_fraction=0.001 of 40 usable samples"),
    (["--test-fraction", 0.001], "raise test_fraction"),
    (["--val-fraction", 0.7, "--test-fraction", 0.29], "40 usable samples left none); lower val_fraction"),
    (["--tokenizer-from", "{tmp}/nowhere"], "tokenizer_from: {tmp}/nowhere does not exist"),
    (["--tokenizer-from", "{tmp}/in"], "tokenizer_from: {tmp}/in has no manifest.json"),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, expected):
    src = write_tars(tmp_path / "in", [make_samples(40)])
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    message = refused("--input", src, "--out", tmp_path / "o", *args)
    assert expected.replace("{tmp}", str(tmp_path)) in message
    assert not (tmp_path / "o").exists()


def test_builtin_refuses_fractions_and_a_split_parent_hints_at_train(tmp_path):
    message = refused("--out", tmp_path / "o", "--val-fraction", 0.1, "shapes.num_train=4")
    assert "built-in dataset has its own splits; set shapes.num_val" in message
    src = write_tars(tmp_path / "in", [make_samples(20)])
    ok("--input", src, "--out", tmp_path / "d", "--test-fraction", 0.4, "image_size=16")
    message = refused("--input", src, "--out", tmp_path / "e", "--tokenizer-from", tmp_path / "d")
    assert f"its splits are in {tmp_path / 'd' / 'train'}" in message


def test_split_output_over_an_unsplit_one_needs_overwrite(tmp_path):
    src = write_tars(tmp_path / "in", [make_samples(20)])
    ok("--input", src, "--out", tmp_path / "o", "image_size=16")
    message = refused("--input", src, "--out", tmp_path / "o", "--test-fraction", 0.4, "image_size=16")
    assert "already holds token shards" in message
    ok("--input", src, "--out", tmp_path / "o", "--test-fraction", 0.4, "image_size=16", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["test", "train"]


def test_an_input_sorted_by_class_gives_shards_that_mix_the_classes(tmp_path):
    """A folder per class, or a dataset dumped in label order, must not give one class per shard: the
    loader's shuffle buffer would then see one class at a time."""
    samples = sorted(make_samples(100), key=lambda s: s["json"]["label"])  # class0 x 20, then class1 ...
    src = write_tars(tmp_path / "in", [samples])
    ok("--input", src, "--out", tmp_path / "out", "image_size=16", "shard_size=20")
    first_shard = decoded(tmp_path / "out")[:20]
    assert len({s["meta"]["label"] for s in first_shard}) == 5


def test_a_split_not_written_again_does_not_survive_overwrite(tmp_path):
    """Re-splitting with other fractions must not leave the old test/ beside the new train/: its samples
    may now be training samples, and its tokenizer hashes would still match."""
    src = write_tars(tmp_path / "in", [make_samples(60)])
    ok("--input", src, "--out", tmp_path / "out", "--test-fraction", 0.3, "image_size=16")
    result, output = tokenize("--input", src, "--out", tmp_path / "out", "--val-fraction", 0.3, "image_size=16")
    assert result.exit_code == 2 and "--overwrite" in output and (tmp_path / "out" / "test").is_dir()
    ok("--input", src, "--out", tmp_path / "out", "--val-fraction", 0.3, "image_size=16", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train", "val"]


def test_shifted_copies_move_the_image_by_a_key_seeded_offset_with_repeated_edges():
    from mmar_cli.data.augment import shifted_copies

    image = np.zeros((1, 8, 8, 3), np.uint8)
    image[0, 4, 4] = 255
    copies = shifted_copies(image, ["k1"], copies=6, max_px=2)
    assert copies.shape == (1, 6, 8, 8, 3)
    for copy in copies[0]:
        (y,), (x,) = np.nonzero(copy[..., 0])[:2]
        assert abs(y - 4) <= 2 and abs(x - 4) <= 2 and copy.sum() == 255 * 3
    assert np.array_equal(copies, shifted_copies(image, ["k1"], 6, 2))  # the same key, the same moves
    assert not np.array_equal(copies, shifted_copies(image, ["k2"], 6, 2))


def test_warped_copies_bend_the_image_by_a_smooth_field_of_the_asked_size():
    from mmar_cli.data.augment import _smooth_field, shifted_copies

    field = _smooth_field(torch.randn(8, 2, 32, 32, generator=torch.Generator().manual_seed(0)), 1.5)
    assert field.shape == (8, 32, 32, 2)
    pixels = field * 16  # [-1, 1] units -> pixels of a 32 px side
    assert abs(float(pixels.std()) - 1.5) < 0.05
    # smooth: neighbouring pixels move almost alike (white noise would differ by ~sqrt(2) x its std)
    assert float((pixels[:, 1:] - pixels[:, :-1]).abs().mean()) < 0.2 * float(pixels.abs().mean())
    image = np.zeros((2, 32, 32, 3), np.uint8)
    image[:, 8:24, 14:18] = 255  # a bar
    plain = shifted_copies(image, ["a", "b"], 3, 0)
    warped = shifted_copies(image, ["a", "b"], 3, 0, warp_px=1.5)
    assert np.array_equal(plain, np.repeat(image[:, None], 3, 1))  # no move, no warp: the image itself
    assert np.abs(warped.astype(int) - plain).mean() > 1  # the bar's edges moved
    assert np.array_equal(warped, shifted_copies(image, ["a", "b"], 3, 0, warp_px=1.5))  # seeded by the key
    assert not np.array_equal(warped[0], warped[1])


def test_shifted_views_are_stored_for_the_training_split_alone_whatever_the_workers(tmp_path):
    src = write_tars(tmp_path / "in", [make_samples(40)])
    settings = ["image_size=16", "--test-fraction", 0.25, "image_tokenizer.shifts=3"]
    ok("--input", src, "--out", tmp_path / "a", *settings)
    ok("--input", src, "--out", tmp_path / "b", *settings, "--workers", 2, "shard_size=7")
    a = {s["key"]: s for s in decoded(tmp_path / "a" / "train")}
    b = {s["key"]: s for s in decoded(tmp_path / "b" / "train")}
    assert a.keys() == b.keys()
    for key, s in a.items():
        assert s["views"].shape == (3, *s["tokens"].shape) and np.array_equal(s["views"], b[key]["views"])
    assert any(not np.array_equal(v, s["tokens"]) for s in a.values() for v in s["views"])
    assert all(s["views"] is None for s in decoded(tmp_path / "a" / "test"))
    assert shards.read_manifest(tmp_path / "a" / "train")["tokens"]["views"] == 3
    assert shards.read_manifest(tmp_path / "a" / "test")["tokens"]["views"] == 0


def test_an_unsplit_run_replaces_an_earlier_split_output_with_overwrite(tmp_path):
    src = write_tars(tmp_path / "in", [make_samples(30)])
    ok("--input", src, "--out", tmp_path / "out", "--test-fraction", 0.3, "image_size=16")
    result, output = tokenize("--input", src, "--out", tmp_path / "out", "image_size=16")
    assert result.exit_code == 2 and "--overwrite" in output
    ok("--input", src, "--out", tmp_path / "out", "image_size=16", "--overwrite")
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "test").exists()
    assert shards.read_manifest(tmp_path / "out")["samples"] == 30
    (tmp_path / "out2" / "train").mkdir(parents=True)
    (tmp_path / "out2" / "train" / "my_photo.png").write_bytes(b"x")  # not ours: never deleted
    result, output = tokenize("--input", src, "--out", tmp_path / "out2", "image_size=16", "--overwrite")
    assert result.exit_code == 2 and "my_photo.png" in output and (tmp_path / "out2" / "train" / "my_photo.png").exists()


def test_turned_and_scaled_copies_keep_the_centre_and_turn_by_at_most_the_angle():
    from mmar_cli.data.augment import shifted_copies

    bar = np.zeros((1, 32, 32, 3), np.uint8)
    bar[0, 15:17, 6:26] = 255  # a horizontal bar through the centre
    copies = shifted_copies(bar, ["k"], copies=8, max_px=0, max_deg=20.0, max_scale=0.2)
    angles, lengths = [], []
    for copy in copies[0].astype(np.float32)[..., 0]:
        ys, xs = np.nonzero(copy > 127)
        assert abs(ys.mean() - 15.5) < 1.0 and abs(xs.mean() - 15.5) < 1.0  # turned about the centre
        angles.append(np.degrees(np.arctan(np.polyfit(xs, ys, 1)[0])))  # slope of the bar
        lengths.append(xs.max() - xs.min() + 1)
    assert max(abs(a) for a in angles) <= 21 and max(abs(a) for a in angles) > 3  # turned, within the limit
    assert 14 <= min(lengths) and max(lengths) <= 25 and max(lengths) - min(lengths) >= 2  # scaled by <= 20 %
    assert np.array_equal(copies, shifted_copies(bar, ["k"], 8, 0, 20.0, 0.2))
