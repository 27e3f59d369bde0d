"""The token shard format: writer (tmp -> rename, manifest last), reader, manifest checks."""

import io
import json

import numpy as np
import pytest
import webdataset as wds

from mmar_cli.data import shards
from mmar_cli.errors import UserError
from mmar_cli.tokenizers.image import PatchTokenizer
from mmar_cli.tokenizers.text import byte_tokenizer


def samples(n, flip=False):
    rng = np.random.default_rng(0)
    for i in range(n):
        tokens = rng.standard_normal((16, 192)).astype(np.float32)
        yield shards.encode_sample(f"s-{i:04d}", tokens, f"caption {i}",
                                   {"source": f"img{i}.png", "question": "q?", "answer": f"a{i}"},
                                   flip=-tokens if flip else None)


def write_dir(directory, counts=(3, 2)):
    entries = [shards.write_shard(directory / shards.shard_name("train", k), samples(n, flip=True))
               for k, n in enumerate(counts)]
    manifest = shards.build_manifest(entries, byte_tokenizer(), PatchTokenizer(32, 8),
                                     {"input": "x", "format": "folder", "split": None},
                                     [("bad.png", "unreadable image")], True, "mmar tokenize")
    shards.write_manifest(directory, manifest)
    return manifest


def test_written_shards_read_back_through_webdataset(tmp_path):
    manifest = write_dir(tmp_path)
    assert shards.read_manifest(tmp_path, verify=True) == manifest
    paths = shards.shard_paths(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"train-000000.tar": 3, "train-000001.tar": 2}
    assert manifest["samples"] == 5 and manifest["tokens"] == {"shape": [16, 192], "dtype": "float16", "flip": True, "views": 0}
    assert manifest["skipped"] == {"count": 1, "reasons": {"bad.png": "unreadable image"}}
    assert all(s["sha256"] == shards.file_sha256(tmp_path / s["file"]) for s in manifest["shards"])

    raw = [shards.decode_sample(s) for s in wds.WebDataset(paths, shardshuffle=False)]
    decoded = [shards.decode_sample(s) for s in wds.WebDataset(paths, shardshuffle=False).decode()]
    expected = list(samples(3))
    for got in (raw, decoded):
        assert [s["key"] for s in got] == ["s-0000", "s-0001", "s-0002", "s-0000", "s-0001"]
        first = got[1]
        assert first["tokens"].dtype == np.float16 and first["tokens"].shape == (16, 192)
        assert np.array_equal(first["tokens"], np.load(io.BytesIO(expected[1]["tokens.npy"])))
        assert np.array_equal(first["flip"], -first["tokens"])
        assert (first["caption"], first["question"], first["answer"]) == ("caption 1", "q?", "a1")
        assert first["meta"]["source"] == "img1.png"


def test_shard_bytes_are_deterministic(tmp_path):
    a = shards.write_shard(tmp_path / "a.tar", samples(4))
    b = shards.write_shard(tmp_path / "b.tar", samples(4))
    assert a["sha256"] == b["sha256"] and a["samples"] == 4


def test_interrupted_shard_leaves_nothing_that_looks_complete(tmp_path):
    def broken():
        yield from samples(2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.write_shard(tmp_path / "train-000000.tar", broken())
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_missing_incomplete_and_tampered_dirs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        shards.read_manifest(tmp_path / "nope")
    shards.write_shard(tmp_path / "train-000000.tar", samples(2))
    with pytest.raises(UserError, match="not a token shard directory.*run mmar tokenize"):
        shards.read_manifest(tmp_path)

    write_dir(tmp_path)
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    shards.read_manifest(tmp_path)  # no verify: only presence is checked
    with pytest.raises(UserError, match="train-000001.tar: sha256 does not match"):
        shards.read_manifest(tmp_path, verify=True)
    path.unlink()
    with pytest.raises(UserError, match="train-000001.tar listed in the manifest is missing"):
        shards.read_manifest(tmp_path)


def test_iterate_samples_checks_each_shard_as_it_opens_it(tmp_path):
    write_dir(tmp_path, counts=(3, 2))
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    read = shards.iterate_samples(tmp_path)
    assert [next(read)["key"] for _ in range(3)] == ["s-0000", "s-0001", "s-0002"]  # the first shard is intact
    with pytest.raises(UserError, match=f"^{path}: sha256 does not match the manifest .*; tokenize again$"):
        next(read)


def test_check_compatible_names_both_hashes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_dir(tmp_path / "a")
    b = json.loads(json.dumps(a))
    shards.check_compatible(a, b)
    other = PatchTokenizer(32, 4).spec()
    b["image_tokenizer"] = {"spec": other, "hash": shards.tokenizer_hash(other)}
    with pytest.raises(UserError) as err:
        shards.check_compatible(a, b)
    message = str(err.value)
    assert a["image_tokenizer"]["hash"][:16] in message and b["image_tokenizer"]["hash"][:16] in message


def test_load_tokenizers_rebuilds_both(tmp_path):
    write_dir(tmp_path)
    text, image = shards.load_tokenizers(tmp_path)
    assert text.kind == "byte" and text.vocab_size == 264
    assert image.spec() == PatchTokenizer(32, 8).spec()


def _npy_bytes(array, version=None) -> bytes:
    f = io.BytesIO()
    if version is None:
        np.save(f, array)
    else:
        np.lib.format.write_array(f, array, version=version)
    return f.getvalue()


@pytest.mark.parametrize("array, version", [
    (np.arange(48, dtype=np.float16).reshape(16, 3), None),
    (np.arange(24, dtype=np.float32).reshape(2, 3, 4), None),
    (np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)), None),
    (np.arange(6, dtype=">f4").reshape(2, 3), (2, 0)),
    (np.float32(7.5), None),
])
def test_load_npy_reads_what_np_load_reads_and_parses_each_header_once(array, version):
    data = _npy_bytes(array, version)
    for _ in range(2):  # the second read takes the cached header
        got = shards.load_npy(data)
        ref = np.load(io.BytesIO(data))
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)
        assert got.flags.writeable
    other = shards.load_npy(_npy_bytes(np.asarray(array) + 1, version))  # same header, other values
    assert np.array_equal(other, np.asarray(array) + 1)


def test_load_npy_refuses_what_np_load_refuses():
    with pytest.raises(ValueError):
        shards.load_npy(b"not an npy file at all")
    with pytest.raises(ValueError, match="allow_pickle"):
        shards.load_npy(_npy_bytes(np.array([{"a": 1}], dtype=object)))
