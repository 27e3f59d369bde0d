"""Checkpoint directories: layout, atomic writes, COMPLETE marker, pruning, --resume auto, safe loading."""

import argparse
import json
import random

import numpy as np
import pytest
import torch

from mmar_cli.engine import checkpoint as ckpt
from mmar_cli.errors import UserError


def write(out, name, shard_dir, step=1):
    state = {"w": torch.full((2, 3), float(step)), "b": torch.zeros(3)}
    return ckpt.save_checkpoint(out / name, model_state=state, ema_state=state,
                                trainer_state={"step": step, "rng": ckpt.rng_state()}, config_yaml="a: 1\n",
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
    assert ckpt.load_weights(path)["w"].tolist() == [[1.0] * 3] * 2
    assert ckpt.load_trainer_state(path)["step"] == 1
    assert ckpt.load_manifest(path) == {"format_version": 1}
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_incomplete_directories_are_ignored(tmp_path, shard_dir):
    out = tmp_path / "run"
    write(out, "step-00000002", shard_dir, 2)
    write(out, "step-00000004", shard_dir, 4)
    (out / "step-00000004" / "COMPLETE").unlink()  # as if the process died before the marker
    (out / ".tmp-step-00000006").mkdir()  # a crash while writing
    assert [p.name for p in ckpt.step_dirs(out)] == ["step-00000002"]
    assert ckpt.find_resume(out, "auto").name == "step-00000002"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.find_resume(out, str(out / "step-00000004"))
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.load_weights(out / "step-00000004")


def test_resume_auto_prefers_final_and_none_when_empty(tmp_path, shard_dir):
    out = tmp_path / "run"
    assert ckpt.find_resume(out, "auto") is None
    write(out, "step-00000002", shard_dir, 2)
    write(out, "final", shard_dir, 3)
    assert ckpt.find_resume(out, "auto").name == "final"


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
    assert ckpt.load_trainer_state(out / "final")["step"] == 5
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
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_loading_refuses_pickled_objects(tmp_path, shard_dir):
    path = write(tmp_path / "run", "final", shard_dir)
    torch.save({"step": 1, "obj": argparse.Namespace(x=1)}, path / "trainer.pt")  # an arbitrary object
    with pytest.raises(Exception, match="[Ww]eights only"):
        ckpt.load_trainer_state(path)
