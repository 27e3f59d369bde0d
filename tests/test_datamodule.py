"""The training data pipeline: shard split, task mixture, skip counters, resumable order.

`make_shards` builds a tiny shard directory (8x8 images as 2x2 patch tokens, byte text tokenizer) with
webdataset's TarWriter; the other training tests use it too.
"""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from mmar_cli.config import TaskMixConfig
from mmar_cli.data import datamodule
from mmar_cli.data import shards as shard_io
from mmar_cli.data.datamodule import TokenBatches, assign_task, batches_before, shards_for
from mmar_cli.data.sequence import CAPTION, QA, T2I, UNCOND, Layout, fits
from mmar_cli.errors import UserError
from mmar_cli.tokenizers.image import PatchTokenizer
from mmar_cli.tokenizers.text import byte_tokenizer

COLOURS = ["red", "green", "blue", "yellow"]


def make_shards(directory, num_shards=2, per_shard=16, seed=0, long_every=0, patch=4, source="test", views=0,
                flip=False):
    """A complete shard directory; every `long_every`-th caption is too long for a 24-token suffix. The
    mirrored tokens (`flip`) and shifted copies (`views`) are told apart from the image's by their values."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok, image_tok = byte_tokenizer(), PatchTokenizer(8, patch)
    rng = np.random.default_rng(seed)
    written = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            colour = COLOURS[n % len(COLOURS)]
            image = np.zeros((1, 8, 8, 3), np.uint8)
            image[..., n % 3] = 200
            image += rng.integers(0, 40, image.shape, dtype=np.uint8)
            tokens = image_tok.encode(image)[0].numpy()
            caption = f"a {colour} square"
            if long_every and n % long_every == 0:
                caption = "a very long caption that will not fit the layout " * 2
            meta = {"source": source, "question": "what colour?", "answer": colour} if n % 2 else {"source": source}
            copies = np.stack([tokens + k + 1 for k in range(views)]) if views else None
            mirrored = tokens - 10 if flip else None
            samples.append(shard_io.encode_sample(f"s{n:05d}", tokens, caption, meta, mirrored, copies))
        written.append(shard_io.write_shard(directory / shard_io.shard_name("train", s), samples))
    manifest = shard_io.build_manifest(written, tok, image_tok, {"input": source}, [], flip, "test")
    shard_io.save_tokenizers(directory, tok, image_tok)
    shard_io.write_manifest(directory, manifest)
    return directory


def mix(**kw):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskMixConfig), kw))


LAYOUT = Layout(prefix_len=24, num_image_tokens=4, suffix_len=24)


def stream(directory, batch_size=4, seed=0, **kw):
    tok, _ = shard_io.load_tokenizers(directory)
    return TokenBatches(shard_io.shard_paths(directory), tok, LAYOUT, mix(), batch_size, seed, **kw)


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def test_mixture_ratios_within_tolerance():
    m = mix(t2i=0.5, i2t=0.3, image_only=0.2, qa_share=0.5, p_uncond=0.1)
    rng = random.Random(0)
    with_qa = {"caption": "a red square", "question": "what colour?", "answer": "red"}
    counts = {T2I: 0, UNCOND: 0, CAPTION: 0, QA: 0}
    n = 20000
    for _ in range(n):
        counts[assign_task(rng, with_qa, m)[0]] += 1
    expected = {T2I: 0.5 * 0.9, UNCOND: 0.5 * 0.1 + 0.2, CAPTION: 0.3 * 0.5, QA: 0.3 * 0.5}
    for task, share in expected.items():
        assert abs(counts[task] / n - share) < 0.015, (task, counts[task] / n, share)
    # without a question/answer, all image->text samples are captions
    no_qa = {"caption": "a red square"}
    tasks = [assign_task(rng, no_qa, m)[0] for _ in range(2000)]
    assert QA not in tasks and abs(tasks.count(CAPTION) / 2000 - 0.3) < 0.04


def test_assign_task_texts():
    sample = {"caption": "a red square", "question": "what colour?", "answer": "red"}
    rng = random.Random(1)
    seen = {}
    for _ in range(200):
        task, text, answer = assign_task(rng, sample, mix(qa_share=0.5))
        seen[task] = (text, answer)
    assert seen[T2I] == ("a red square", None)
    assert seen[CAPTION] == ("", "a red square")
    assert seen[QA] == ("what colour?", "red")
    assert seen[UNCOND] == ("", None)


def test_fits_checks_prefix_and_suffix():
    tok = byte_tokenizer()
    lay = Layout(prefix_len=10, num_image_tokens=4, suffix_len=6)
    assert fits(tok, lay, T2I, "12345678", None) and not fits(tok, lay, T2I, "123456789", None)
    assert fits(tok, lay, CAPTION, "", "12345") and not fits(tok, lay, CAPTION, "", "123456")
    assert not fits(tok, lay, QA, "what?", "123456")
    assert fits(tok, lay, UNCOND, "x" * 100, None)


def test_shards_split_by_rank_then_worker_and_resample():
    shards = [f"s{i}" for i in range(8)]
    parts = [shards_for(shards, 0, 0, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == shards and all(len(p) == 2 for p in parts)
    assert shards_for(shards, 0, 0, 0, 2, 0, 2) == shards_for(shards, 0, 0, 0, 2, 0, 2)
    assert shards_for(shards, 0, 1, 0, 1, 0, 1) != shards_for(shards, 0, 0, 0, 1, 0, 1)  # epoch reshuffles
    few = ["a", "b"]  # 2 shards for 2 ranks x 2 workers: each worker draws one
    drawn = [shards_for(few, 0, 0, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert all(len(d) == 1 and d[0] in few for d in drawn)


def test_batches_before_round_robin():
    assert [batches_before(5, w, 2) for w in range(2)] == [3, 2]
    assert batches_before(5, 0, 1) == 5 and batches_before(0, 0, 3) == 0


def test_batches_are_collated_in_the_fixed_frame(tmp_path):
    d = make_shards(tmp_path / "d")
    batch = take(stream(d), 1)[0]
    assert batch["text_ids"].shape == (4, LAYOUT.length)
    assert batch["image_tokens"].shape == (4, 4, 48) and batch["image_tokens"].dtype == torch.float32
    assert len(batch["keys"]) == 4 and all(k.startswith("s") for k in batch["keys"])
    assert int(batch["skipped_long"]) == 0 and int(batch["corrupt"]) == 0


def test_stream_resumes_at_a_batch(tmp_path):
    d = make_shards(tmp_path / "d")
    full = take(stream(d, seed=3), 12)  # 12 batches of 4 > 32 samples: crosses an epoch
    resumed = take(stream(d, seed=3, start_batch=7), 5)
    assert [b["keys"] for b in full[7:]] == [b["keys"] for b in resumed]
    assert torch.equal(full[9]["text_ids"], resumed[2]["text_ids"])
    other_seed = take(stream(d, seed=4), 2)
    assert [b["keys"] for b in other_seed] != [b["keys"] for b in full[:2]]


def test_ranks_read_different_samples(tmp_path):
    d = make_shards(tmp_path / "d", num_shards=4)
    keys = [{k for b in take(stream(d, rank=r, world=2), 3) for k in b["keys"]} for r in range(2)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_too_long_samples_are_skipped_and_counted(tmp_path):
    d = make_shards(tmp_path / "d", long_every=4)
    s = stream(d)
    s.mix = mix(t2i=0.0, i2t=1.0, image_only=0.0, qa_share=0.0)  # all captions: every long one is skipped
    batches = take(s, 4)
    assert sum(int(b["skipped_long"]) for b in batches) >= 4
    assert not any("very long" in k for b in batches for k in b["keys"])


def test_corrupt_tar_and_sample_are_skipped_and_counted(tmp_path):
    d = make_shards(tmp_path / "d", num_shards=2)
    paths = shard_io.shard_paths(d)
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:3000])  # truncated tar
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:  # a sample whose tokens are not an array
        w.write({"__key__": "bad", "tokens.npy": b"not numpy", "txt": b"a red square", "json": b"{}"})
        w.write({"__key__": "good", "tokens.npy": np.zeros((4, 48), np.float16), "txt": b"a red square",
                 "json": b"{}"})
    tok, _ = shard_io.load_tokenizers(d)
    with pytest.warns(UserWarning):
        s = TokenBatches(paths + [str(tmp_path / "bad.tar")], tok, LAYOUT, mix(), 4, 0)
        batches = take(s, 6)
    assert sum(int(b["corrupt"]) for b in batches) >= 2
    assert all("bad" not in b["keys"] for b in batches)


def alter_first_tokens(shard):
    """Change the last bytes of the shard's first token array: the tar and the .npy still parse, only the
    manifest's sha256 can tell."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".tokens.npy"))
    data = bytearray(Path(shard).read_bytes())
    end = member.offset_data + member.size
    data[end - 8:end] = bytes(255 - b for b in data[end - 8:end])
    Path(shard).write_bytes(bytes(data))


@pytest.mark.parametrize("cache_mb", [datamodule.CACHE_MB, 0], ids=["cached", "streamed"])
def test_a_shard_changed_after_tokenize_is_skipped_and_counted(tmp_path, monkeypatch, cache_mb):
    monkeypatch.setattr(datamodule, "CACHE_MB", cache_mb)
    d = make_shards(tmp_path / "d", num_shards=2)
    checksums = shard_io.shard_checksums(d)
    changed, intact = list(checksums)
    alter_first_tokens(changed)
    changed_keys = {f"s{n:05d}" for n in range(16)}  # the first shard's

    unchecked = {k for b in take(stream(d), 4) for k in b["keys"]}
    assert unchecked & changed_keys, "the changed shard must still parse, or this test proves nothing"
    hashed = []
    monkeypatch.setattr(shard_io, "file_sha256", lambda path, real=shard_io.file_sha256: hashed.append(path)
                        or real(path))
    with pytest.warns(UserWarning, match=f"{changed}: sha256 does not match the manifest"):
        batches = take(stream(d, checksums=checksums), 8)  # two epochs of the intact shard's 16 samples
    assert not {k for b in batches for k in b["keys"]} & changed_keys
    assert sum(int(b["corrupt"]) for b in batches) == 2  # met once per epoch, as an unreadable tar is
    assert hashed.count(intact) == 1  # an intact shard is hashed once per worker, not once per epoch


def test_no_usable_sample_is_a_user_error(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    tok = byte_tokenizer()
    with pytest.raises(UserError, match="no usable sample"):
        take(TokenBatches([str(tmp_path / "empty.tar")], tok, LAYOUT, mix(), 4, 0), 1)


def test_cached_shards_replay_the_stream_read_from_disk(tmp_path, monkeypatch):
    d = make_shards(tmp_path / "d", num_shards=2)
    paths = shard_io.shard_paths(d)
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:3000])  # a truncated tar: its error replays too
    tok, _ = shard_io.load_tokenizers(d)
    runs, original, read = {}, wds.tariterators.tarfile_samples, {}

    def counting(src, **kw):  # counts the times each shard is read from disk
        read[src[0]["url"]] = read.get(src[0]["url"], 0) + 1
        return original(src, **kw)

    monkeypatch.setattr(wds.tariterators, "tarfile_samples", counting)
    for name, limit in (("cached", datamodule.CACHE_MB), ("streamed", 0)):
        monkeypatch.setattr(datamodule, "CACHE_MB", limit)
        read = {}
        with pytest.warns(UserWarning):
            s = TokenBatches(paths, tok, LAYOUT, mix(), 4, 0)
            batches = take(s, 30)  # several epochs of these few samples
        assert (s._cache is not None) == (limit > 0)
        runs[name] = ([b["keys"] for b in batches], [int(b["corrupt"]) for b in batches], read)
    cached, streamed = runs["cached"], runs["streamed"]
    assert cached[:2] == streamed[:2] and sum(cached[1]) >= 3  # the same batches, the error counted each epoch
    assert set(cached[2].values()) == {1} and min(streamed[2].values()) >= 3  # each shard read once vs per epoch


def test_understanding_rows_read_the_image_or_one_shifted_copy_and_generation_rows_the_image(tmp_path):
    directory = make_shards(tmp_path / "d", views=2)
    originals = {s["key"]: s["tokens"].astype(np.float32) for s in shard_io.iterate_samples(directory)}
    seen = {"understanding": [0, 0, 0], "generation": [0, 0, 0]}  # rows read as the image, copy 1, copy 2
    for batch in take(stream(directory, batch_size=8), 20):
        for key, tokens, task in zip(batch["keys"], batch["image_tokens"], batch["task"].tolist()):
            offset = float((tokens - torch.from_numpy(originals[key])).mean())
            assert round(offset) in (0, 1, 2) and abs(offset - round(offset)) < 0.01, offset  # float16 round-off
            seen["understanding" if task in (CAPTION, QA) else "generation"][round(offset)] += 1
    assert seen["generation"][1:] == [0, 0] and seen["generation"][0] > 40
    assert min(seen["understanding"]) >= 10, seen


def test_every_task_reads_the_mirrored_image_or_the_image_at_random(tmp_path):
    directory = make_shards(tmp_path / "d", flip=True)
    originals = {s["key"]: torch.from_numpy(s["tokens"].astype(np.float32)) for s in shard_io.iterate_samples(directory)}
    seen = {"understanding": [0, 0], "generation": [0, 0]}  # rows read as the image, as its mirror
    for batch in take(stream(directory, batch_size=8), 20):
        for key, tokens, task in zip(batch["keys"], batch["image_tokens"], batch["task"].tolist()):
            offset = (tokens - originals[key]).abs().max()  # 0, or 10 within float16 round-off
            mirrored = bool(offset > 5)
            assert float(offset) < 0.01 or abs(float(offset) - 10) < 0.01, offset
            seen["understanding" if task in (CAPTION, QA) else "generation"][mirrored] += 1
    for rows in seen.values():  # about half of each
        assert min(rows) >= 0.3 * sum(rows), seen
