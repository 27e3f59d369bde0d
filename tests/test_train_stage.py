"""`mmar pretrain` / `mmar finetune` end to end on tiny shards: checkpoints, exact resume after SIGKILL,
finetune from a pretrain checkpoint, DDP on 2 CPU processes, and every bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmar_cli.engine import checkpoint as ckpt
from test_datamodule import make_shards
from tiny_checkpoint import DAMAGES, assert_damage_reported, damage, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=64", "model.depth=2", "model.heads=2", "model.kv_heads=1", "model.mlp_hidden=128",
        "model.diffusion.width=64", "model.diffusion.depth=1", "trainer.accelerator=cpu",
        "trainer.precision=32", "trainer.batch_size=4", "trainer.sample_every=0", "trainer.log_every=1",
        "optim.warmup_steps=2", "val_data=null"]


def mmar(stage, *args, check=True, **kw):
    cmd = [sys.executable, "-m", f"stages.{stage}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "train", num_shards=2, per_shard=16)


def weights(path, name="model.safetensors"):
    """A checkpoint's weights, read the one way (so their checksums are checked too)."""
    return ckpt.load(path).weights(ema=name == "ema.safetensors")


def trainer_state(path):
    return ckpt.load(path).trainer_state()


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, worst


def assert_same_weights(a, b):
    """Checkpoints `a` and `b` hold the same weights and EMA, within 1e-6."""
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same(weights(a, name), weights(b, name))


def run_straight(shards, out, ckpt_every):
    """A 14-step pretraining run into `out`, uninterrupted; returns its arguments but --out."""
    args = ["--data", str(shards), "--max-steps", "14", f"trainer.ckpt_every={ckpt_every}", "trainer.keep_last=10",
            "trainer.num_workers=1", *TINY]
    mmar("pretrain", "--out", str(out), *args)
    return args


def signal_at_step(out, args, step, signum, env=None):
    """Start `mmar pretrain --out OUT ARGS`; once step-STEP is complete, send `signum` to its whole process
    group (as SLURM signals every process of a job step, loader workers too). Returns the process."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain", "--out", str(out), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    marker = out / ckpt.step_name(step) / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    return proc


@pytest.mark.slow
def test_pretrain_writes_the_checkpoint_layout(shards, tmp_path):
    out = tmp_path / "run"
    mmar("pretrain", "--data", str(shards), "--out", str(out), "--max-steps", "4", "trainer.ckpt_every=2",
         "trainer.keep_last=1", *TINY)
    assert sorted(p.name for p in out.iterdir()) >= ["config.yaml", "final", "logs", "samples", "step-00000002"]
    final = sorted(p.name for p in (out / "final").iterdir())
    assert final == ["COMPLETE", "command.txt", "config.yaml", "ema.safetensors", "manifest.json",
                     "model.safetensors", "trainer.pt"]
    state = trainer_state(out / "final")
    assert state["step"] == 4 and state["data"]["batches_per_rank"] == 4
    assert "vocab_size: 264" in (out / "final" / "config.yaml").read_text()  # filled from the shards
    assert (out / "samples" / "final.png").is_file() and "caption:" in (out / "samples" / "final.txt").read_text()
    assert "train/loss_img" in (out / "logs" / "metrics.csv").read_text()


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(shards, tmp_path):
    args = run_straight(shards, tmp_path / "straight", ckpt_every=2)

    out = tmp_path / "killed"
    signal_at_step(out, args, 4, signal.SIGKILL).communicate(timeout=240)
    assert (out / "step-00000004").is_dir() and not (out / "final").exists(), "the run was not killed mid-way"

    resumed = mmar("pretrain", "--out", str(out), "--resume", "auto", *args)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_weights(tmp_path / "straight" / "final", out / "final")


@pytest.mark.slow
def test_resume_auto_passes_over_damaged_checkpoints_and_still_ends_exactly(shards, tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--data", str(shards), "--max-steps", "6", "trainer.ckpt_every=2",
            "trainer.keep_last=10", "trainer.num_workers=1", *TINY]
    mmar("pretrain", *args)
    straight = shutil.copytree(out / "final", tmp_path / "straight")
    damage(out / "final" / "model.safetensors", "altered")
    damage(out / "step-00000004" / "trainer.pt", "truncated")

    resumed = mmar("pretrain", "--resume", "auto", *args)
    said = resumed.stdout + resumed.stderr
    assert "warning: --resume auto: passed over damaged checkpoints (final: model.safetensors altered; " \
           f"step-00000004: trainer.pt truncated); resuming from {out / 'step-00000002'}, the newest intact one" in said
    assert f"resuming from {out / 'step-00000002'} (step 2)" in said
    assert trainer_state(out / "final")["step"] == 6
    assert_same_weights(straight, out / "final")  # steps 3-6 trained again, exactly


@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_requeues_and_resumes_exactly(shards, tmp_path):
    args = run_straight(shards, tmp_path / "straight", ckpt_every=4)

    calls = tmp_path / "scontrol-calls.txt"
    stub = tmp_path / "bin" / "scontrol"  # records its arguments, as `scontrol requeue` would get them
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "mmar-pretrain", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0"}
    out = tmp_path / "preempted"
    proc = signal_at_step(out, args, 4, signal.SIGUSR1, env=env)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert calls.read_text() == "requeue 4242\n"
    steps = [int(p.name.removeprefix("step-")) for p in out.glob("step-*")]
    assert 4 < max(steps) < 14 and not (out / "final").exists(), steps
    last = out / f"step-{max(steps):08d}"
    assert f"preempted at step {max(steps)}: wrote {last} and requeued SLURM job 4242" in output
    assert trainer_state(last)["step"] == max(steps)

    requeued = mmar("pretrain", "--out", str(out), "--resume", "auto", *args, env=env)
    assert f"resuming from {last} (step {max(steps)})" in requeued.stdout + requeued.stderr
    assert calls.read_text() == "requeue 4242\n"  # the requeued run ran to the end: no second requeue
    assert_same_weights(tmp_path / "straight" / "final", out / "final")


@pytest.mark.slow
def test_finetune_from_pretrain_with_frozen_backbone(shards, tmp_path):
    pre = tmp_path / "pre"
    mmar("pretrain", "--data", str(shards), "--out", str(pre), "--max-steps", "2", *TINY)
    ft = tmp_path / "ft"
    mmar("finetune", "--init", str(pre / "final"), "--data", str(shards), "--out", str(ft), "--max-steps", "2",
         "optim.freeze_backbone=true", "model.width=999", *TINY)  # the architecture comes from init
    a, b = weights(pre / "final"), weights(ft / "final")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("head."))
    assert "mask_min: 0.0" in (ft / "final" / "config.yaml").read_text()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(shards, tmp_path):
    out = tmp_path / "ddp"
    mmar("pretrain", "--data", str(shards), "--out", str(out), "--max-steps", "3", "trainer.strategy=ddp",
         "trainer.devices=2", "trainer.log_keys=true", "trainer.num_workers=0", *TINY)
    seen = [set((out / f"keys-rank{r}.txt").read_text().split()) for r in range(2)]
    assert len(seen[0]) >= 4 and len(seen[1]) >= 4 and not seen[0] & seen[1]
    state = trainer_state(out / "final")
    assert state["step"] == 3 and state["data"]["world_size"] == 2
    assert len(weights(out / "final")) > 0 and not list(out.glob(".tmp-*"))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def run_in_process(*overrides, stage="pretrain", overwrite=False):
    from mmar_cli.config import STAGES, load_config
    from stages import train_common

    cfg = load_config(STAGES[stage], overrides=[*TINY, *overrides])
    return train_common.run(cfg, stage, overwrite=overwrite)


def test_missing_or_empty_data_is_refused(tmp_path):
    from mmar_cli.errors import UserError

    with pytest.raises(UserError, match="not found"):
        run_in_process(f"data={tmp_path / 'nope'}", f"out={tmp_path / 'o'}")
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        run_in_process(f"data={tmp_path / 'nomanifest'}", f"out={tmp_path / 'o'}")
    empty = make_shards(tmp_path / "empty", num_shards=0)
    with pytest.raises(UserError, match="lists no shards"):
        run_in_process(f"data={empty}", f"out={tmp_path / 'o'}")


def test_val_data_from_another_tokenizer_names_both_hashes(shards, tmp_path):
    from mmar_cli.errors import UserError

    other = make_shards(tmp_path / "other", num_shards=1, patch=2)  # 4x4 patches: another image tokenizer
    with pytest.raises(UserError) as e:
        run_in_process(f"data={shards}", f"val_data={other}", f"out={tmp_path / 'o'}")
    msg = str(e.value)
    assert "image tokenizer mismatch" in msg and str(shards) in msg and str(other) in msg
    assert msg.count("(patch") == 2  # both hashes with their kinds


@pytest.mark.slow
def test_finetune_init_from_another_tokenizer_is_refused(shards, tmp_path):
    from mmar_cli.errors import UserError

    pre = tmp_path / "pre"
    run_in_process(f"data={shards}", f"out={pre}", "trainer.max_steps=1")
    other = make_shards(tmp_path / "other", num_shards=1, patch=2)
    with pytest.raises(UserError, match="image tokenizer mismatch") as e:
        run_in_process(f"data={other}", f"init={pre / 'final'}", f"out={tmp_path / 'ft'}", stage="finetune")
    assert "init checkpoint" in str(e.value)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        run_in_process(f"data={shards}", f"init={tmp_path / 'none'}", f"out={tmp_path / 'ft'}", stage="finetune")


@pytest.mark.slow
def test_used_output_directory_is_refused_unless_resume_or_overwrite(shards, tmp_path):
    from mmar_cli.errors import UserError

    out = tmp_path / "run"
    run_in_process(f"data={shards}", f"out={out}", "trainer.max_steps=1")
    with pytest.raises(UserError, match="already holds a run"):
        run_in_process(f"data={shards}", f"out={out}", "trainer.max_steps=1")
    assert run_in_process(f"data={shards}", f"out={out}", "trainer.max_steps=1", "resume=auto") == out / "final"
    assert run_in_process(f"data={shards}", f"out={out}", "trainer.max_steps=2", overwrite=True) == out / "final"
    assert trainer_state(out / "final")["step"] == 2


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    from mmar_cli.errors import UserError
    from mmar_cli.model.mmar import MMAR

    forward = MMAR.forward
    calls = {"n": 0}

    def poisoned(self, batch, *a, **kw):
        out = forward(self, batch, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MMAR, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="non-finite at step 3") as e:
        run_in_process(f"data={shards}", f"out={out}", "trainer.max_steps=10", "trainer.ckpt_every=2")
    assert "step-00000002" in str(e.value)
    assert (out / "step-00000002" / "COMPLETE").exists() and not (out / "final").exists()


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("option", ["--init", "--resume"])
def test_a_damaged_init_or_resume_checkpoint_is_one_line(shards, tmp_path, option, how):
    from typer.testing import CliRunner

    from mmar_cli.app import app

    ckpt = make_checkpoint(shards.parent, tmp_path / "pre")
    damaged = ckpt / ("model.safetensors" if option == "--init" else "trainer.pt")
    damage(damaged, how)
    stage = "finetune" if option == "--init" else "pretrain"
    result = CliRunner().invoke(app, [stage, option, str(ckpt), "--data", str(shards), "--out", str(tmp_path / "o"),
                                      *TINY])
    assert_damage_reported(result.exit_code, result.stdout, result.stderr, option[2:], damaged, how)
    assert not (tmp_path / "o" / "final").exists()


def test_cli_error_is_one_line(tmp_path):
    proc = mmar("pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_fsdp_with_ema_or_compile_is_refused(shards, tmp_path):
    from mmar_cli.errors import UserError

    with pytest.raises(UserError, match="trainer.ema_decay=0"):
        run_in_process(f"data={shards}", f"out={tmp_path / 'o'}", "trainer.strategy=fsdp")
    with pytest.raises(UserError, match="trainer.compile=false with fsdp"):
        run_in_process(f"data={shards}", f"out={tmp_path / 'o'}", "trainer.strategy=fsdp", "trainer.ema_decay=0",
                       "trainer.compile=true")
    assert not (tmp_path / "o").exists()


def test_compile_without_a_cpp_compiler_is_refused_before_training(shards, tmp_path, monkeypatch):
    from torch._inductor import cpp_builder

    from mmar_cli.errors import UserError

    def no_compiler():
        raise RuntimeError("no C++ compiler on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(UserError, match=r"trainer.compile.*no C\+\+ compiler.*trainer.compile=false"):
        run_in_process(f"data={shards}", f"out={tmp_path / 'o'}", "trainer.compile=true")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_writes_the_same_checkpoint(shards, tmp_path):
    from mmar_cli.model.mmar import compile_unavailable

    if compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_in_process(f"data={shards}", f"out={eager}", "trainer.max_steps=3")
    run_in_process(f"data={shards}", f"out={compiled}", "trainer.max_steps=3", "trainer.compile=true")
    # the same keys and values: fused kernels round differently, nothing more
    assert_same(weights(eager / "final"), weights(compiled / "final"), tol=1e-4)
    assert_same(weights(eager / "final", "ema.safetensors"), weights(compiled / "final", "ema.safetensors"), tol=1e-4)
    assert "compile: true" in (compiled / "config.yaml").read_text()
