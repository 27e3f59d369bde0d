"""Checkpoint directories: layout, atomic writes, COMPLETE checksums, pruning, --resume auto, safe loading."""

import argparse
import json
import random

import numpy as np
import pytest
import torch

from mmar_cli.engine import checkpoint as ckpt
from mmar_cli.errors import UserError
from mmar_cli.seeding import rng_state, set_rng_state
from tiny_checkpoint import damage


def write(out, name, shard_dir, step=1):
    state = {"w": torch.full((2, 3), float(step)), "b": torch.zeros(3)}
    return ckpt.save(out / name, model_state=state, ema_state=state,
                     trainer_state={"step": step, "rng": rng_state()}, config_yaml="a: 1\n",
                     shard_dir=shard_dir, command="mmar pretrain")


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format_version": 1}))
    (d / "text_tokenizer.json").write_text("{}")
    return d


def test_layout(tmp_path, shard_dir):
    path = write(tmp_path / "run", ckpt.step_name(1000), shard_dir)
    assert path.name == "step-00001000"
    assert sorted(p.name for p in path.iterdir()) == sorted([
        "COMPLETE", "model.safetensors", "ema.safetensors", "trainer.pt", "config.yaml", "manifest.json",
        "text_tokenizer.json", "command.txt"])
    opened = ckpt.load(path)
    assert opened.weights()["w"].tolist() == [[1.0] * 3] * 2
    assert opened.trainer_state()["step"] == 1
    assert opened.manifest == {"format_version": 1} and opened.config == {"a": 1}
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_incomplete_directories_are_ignored(tmp_path, shard_dir):
    out = tmp_path / "run"
    write(out, "step-00000002", shard_dir, 2)
    write(out, "step-00000004", shard_dir, 4)
    (out / "step-00000004" / "COMPLETE").unlink()  # as if the process died before the marker
    (out / ".tmp-step-00000006").mkdir()  # a crash while writing
    assert [p.name for p in ckpt.step_dirs(out)] == ["step-00000002"]
    assert ckpt.find_resume(out, "auto").path.name == "step-00000002"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.find_resume(out, str(out / "step-00000004"))
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.load(out / "step-00000004")


def test_resume_auto_prefers_final_and_none_when_empty(tmp_path, shard_dir):
    out = tmp_path / "run"
    assert ckpt.find_resume(out, "auto") is None
    write(out, "step-00000002", shard_dir, 2)
    write(out, "final", shard_dir, 3)
    assert ckpt.find_resume(out, "auto").path.name == "final"


def test_prune_keeps_newest_and_final(tmp_path, shard_dir):
    out = tmp_path / "run"
    for s in (1, 2, 3, 4):
        write(out, ckpt.step_name(s), shard_dir, s)
    write(out, "final", shard_dir, 4)
    ckpt.prune(out, keep_last=2)
    assert sorted(p.name for p in out.iterdir()) == ["final", "step-00000003", "step-00000004"]


def test_rewriting_replaces_atomically(tmp_path, shard_dir):
    out = tmp_path / "run"
    write(out, "final", shard_dir, 1)
    write(out, "final", shard_dir, 5)
    assert ckpt.load(out / "final").trainer_state()["step"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["final"]


def test_run_in_use(tmp_path, shard_dir):
    out = tmp_path / "run"
    assert not ckpt.run_in_use(out)
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert not ckpt.run_in_use(out)
    write(out, "step-00000001", shard_dir)
    assert ckpt.run_in_use(out)


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_loading_refuses_pickled_objects(tmp_path, shard_dir):
    path = write(tmp_path / "run", "final", shard_dir)
    torch.save({"step": 1, "obj": argparse.Namespace(x=1)}, path / "trainer.pt")  # an arbitrary object
    record_checksums(path)  # as if written so: the refusal must come from the loader, not the checksum
    with pytest.raises(UserError, match="holds objects other than tensors and plain types"):
        ckpt.load(path).trainer_state()


# --------------------------------------------------------------------------------------------------
# Checksums: every reader checks what it reads
# --------------------------------------------------------------------------------------------------
def record_checksums(path):
    ckpt._write_checksums(path)


def test_complete_lists_size_and_sha256_of_every_other_file(tmp_path, shard_dir):
    import hashlib

    path = write(tmp_path / "run", "final", shard_dir)
    listing = json.loads((path / "COMPLETE").read_text())
    others = sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    assert listing["format"] == 1 and sorted(listing["files"]) == others
    for name, entry in listing["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_truncated_altered_and_missing_files_are_named(tmp_path, shard_dir):
    path = write(tmp_path / "run", "final", shard_dir)
    size = (path / "ema.safetensors").stat().st_size
    with open(path / "ema.safetensors", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(UserError, match=f"ema.safetensors is {size - 10} bytes, {size} when written"):
        ckpt.load(path)  # sizes are checked when the directory is opened

    path = write(tmp_path / "run", "final", shard_dir)
    damage(path / "ema.safetensors", "altered")
    opened = ckpt.load(path)  # the weights are hashed when they are read
    assert opened.weights()["w"].shape == (2, 3)
    with pytest.raises(UserError, match="ema.safetensors does not match its sha256 in COMPLETE") as e:
        opened.weights(ema=True)
    assert str(e.value).startswith(f"ckpt: {path}/ema.safetensors") and "use another checkpoint" in str(e.value)

    path = write(tmp_path / "run", "final", shard_dir)
    (path / "trainer.pt").unlink()
    with pytest.raises(UserError, match="has no trainer.pt, which its COMPLETE lists"):
        ckpt.load(path, "resume")

    path = write(tmp_path / "run", "final", shard_dir)
    (path / "config.yaml").write_text("a: 2\n")  # same size, other bytes
    with pytest.raises(UserError, match="init: .*config.yaml does not match its sha256"):
        ckpt.load(path, "init")


def test_resume_auto_passes_over_damaged_checkpoints_and_says_so(tmp_path, shard_dir, capsys):
    out = tmp_path / "run"
    for step in (2, 4, 6):
        write(out, ckpt.step_name(step), shard_dir, step)
    damage(out / "step-00000006" / "trainer.pt", "altered")
    (out / "step-00000004" / "model.safetensors").unlink()
    found = ckpt.find_resume(out, "auto")
    assert found.path.name == "step-00000002" and found.trainer_state()["step"] == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "passed over damaged checkpoints (step-00000006: trainer.pt altered; step-00000004: no " \
           "model.safetensors); resuming from" in lines[0] and lines[0].endswith("step-00000002, the newest intact one")

    with pytest.raises(UserError, match="trainer.pt does not match its sha256"):
        ckpt.find_resume(out, str(out / "step-00000006"))  # named explicitly: no fallback
    damage(out / "step-00000002" / "model.safetensors", "altered")
    with pytest.raises(UserError, match="no intact checkpoint in .*start afresh with --overwrite"):
        ckpt.find_resume(out, "auto")


def test_a_checkpoint_without_checksums_is_read_with_a_warning(tmp_path, shard_dir, capsys):
    path = write(tmp_path / "run", "final", shard_dir)
    (path / "COMPLETE").write_text("")  # as an mmar before checksums wrote it
    opened = ckpt.load(path)
    assert opened.checksums is None and opened.weights()["w"].tolist() == [[1.0] * 3] * 2
    assert "written without checksums (by an older mmar): its files are read unchecked" in capsys.readouterr().err
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(20)
    with pytest.raises(UserError, match="model.safetensors cannot be read"):  # one line, not SafetensorError
        opened.weights()
