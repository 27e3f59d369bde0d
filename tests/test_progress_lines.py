"""Progress a log file can read: training's plain lines off a terminal (the Rich bar on one), and the
`mmar_cli.progress` helper the other stages use."""

import csv
import io
import math
import os
import re
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mmar_cli import progress as progress_mod
from mmar_cli.app import app
from mmar_cli.data.sequence import TASK_NAMES
from mmar_cli.progress import progress
from test_datamodule import make_shards
from test_train_stage import TINY, mmar

# one training line, e.g.
# step 4/6  loss 6.2173  loss_img 0.8639  loss_txt 5.3534  loss_t2i 0.8639  lr 8.68e-04  179.6 samples/s  elapsed 0:00:01  eta 0:00:00
NUMBER = r"[-+]?\d+\.\d+(?:e[-+]\d+)?"
HMS = r"(\d+):(\d\d):(\d\d)"
TRAIN_LINE = re.compile(rf"^step (\d+)/(\d+)  (.*)  lr ({NUMBER})  ({NUMBER}) samples/s  elapsed {HMS}  eta {HMS}$")
ANSI = "\x1b["


def seconds(h, m, s):
    return int(h) * 3600 + int(m) * 60 + int(s)


def plain_env(**extra):
    """The environment without the variables that make Rich treat a pipe as a terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards") / "train", num_shards=2, per_shard=16)


@pytest.fixture(scope="module")
def logged_run(shards, tmp_path_factory):
    """A 6-step pretrain whose stdout and stderr are pipes (as in a batch job), a line every 2 steps."""
    out = tmp_path_factory.mktemp("plain") / "run"
    proc = mmar("pretrain", "--data", str(shards), "--out", str(out), "--max-steps", "6", *TINY,
                "trainer.log_every=2", env=plain_env())
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_training_off_a_terminal_prints_a_plain_line_every_log_every_steps(logged_run):
    out, text = logged_run
    assert ANSI not in text and "0/-2" not in text and "Epoch" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    parsed = [TRAIN_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(int(m[1]), int(m[2])) for m in parsed] == [(2, 6), (4, 6), (6, 6)]

    # the losses are those of that very step: the CSV logger's row for it (the module logs `step` as
    # the index of the step before its optimizer update, 1 for the second step)
    with open(out / "logs" / "metrics.csv") as f:
        rows = {int(float(r["step"])): r for r in csv.DictReader(f)}
    task_losses = {f"loss_{name}" for name in TASK_NAMES.values()}
    elapsed = []
    for m in parsed:
        step = int(m[1])
        losses = dict((k, float(v)) for k, v in re.findall(rf"(loss\w*) ({NUMBER})", m[3]))
        assert {"loss", "loss_img", "loss_txt"} <= losses.keys() and losses.keys() & task_losses, losses
        assert all(math.isfinite(v) for v in losses.values())
        row = rows[step - 1]
        for name, value in losses.items():
            assert value == pytest.approx(float(row["loss" if name == "loss" else f"train/{name}"]), abs=1e-4)
        assert float(m[4]) == pytest.approx(float(row["lr"]), rel=1e-2) and float(m[4]) > 0
        assert float(m[5]) > 0  # samples/s
        elapsed.append(seconds(*m.group(6, 7, 8)))
    assert elapsed == sorted(elapsed)
    assert seconds(*parsed[-1].group(9, 10, 11)) == 0  # eta at the last step


@pytest.mark.slow
def test_training_on_a_terminal_keeps_the_rich_bar_described_by_step(shards, tmp_path):
    proc = mmar("pretrain", "--data", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "4", *TINY,
                "trainer.log_every=2", env=plain_env(TTY_COMPATIBLE="1"))
    text = proc.stdout + proc.stderr
    assert ANSI in text and "train" in text and "4/4" in text  # the bar was drawn
    assert "0/-2" not in text and "Epoch" not in text
    assert not re.search(r"^step \d+/\d+  loss", text, re.M)


@pytest.mark.slow
def test_sample_off_a_terminal_prints_a_line_per_batch_of_three(logged_run, tmp_path, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    out, _ = logged_run
    result = CliRunner().invoke(app, ["sample", "--ckpt", str(out / "final"), "-p", "a large red circle",
                                      "-n", "3", "--batch-size", "1", "--out", str(tmp_path / "s"),
                                      "gen.iterations=2", "gen.diffusion_steps=2"])
    assert result.exit_code == 0, result.stderr
    counts = re.findall(r"^sample images: (\d+)/3 \((\d+)%\)", result.stderr, re.M)
    assert counts == [("1", "33"), ("2", "66"), ("3", "100")]


# --------------------------------------------------------------------------------------------------
# The helper
# --------------------------------------------------------------------------------------------------
PLAIN = re.compile(rf"^tokenize train: (\d+)/(\d+) \((\d+)%\), (\d+(?:\.\d+)?)/s, elapsed {HMS}, eta {HMS}$")


def test_progress_off_a_terminal_prints_a_line_each_tenth_and_one_at_the_end():
    f = io.StringIO()
    with progress("tokenize train", 20000, Console(file=f, force_terminal=False)) as advance:
        for _ in range(13):
            advance(1500)  # 19500: crosses 2000, 4000, ... 18000; the last 500 come below
        advance(500)
    lines = f.getvalue().splitlines()
    parsed = [PLAIN.match(line) for line in lines]
    assert all(parsed), lines
    done = [int(m[1]) for m in parsed]
    assert done == [3000, 4500, 6000, 9000, 10500, 12000, 15000, 16500, 18000, 20000]
    assert [int(m[3]) for m in parsed] == [15, 22, 30, 45, 52, 60, 75, 82, 90, 100]
    assert all(int(m[2]) == 20000 and float(m[4]) > 0 for m in parsed)
    assert ANSI not in f.getvalue()


def test_progress_off_a_terminal_prints_the_end_once_and_a_line_after_30_s_of_silence(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    f = io.StringIO()
    with progress("sample images", 1000, Console(file=f, force_terminal=False)) as advance:
        advance(10)      # 1 %: no line
        clock[0] += 31   # half a minute without one: a line though under 10 %
        advance(10)
        clock[0] += 9
        advance(5)       # no line: 9 s since the last
    assert f.getvalue().splitlines() == [
        "sample images: 20/1000 (2%), 0.65/s, elapsed 0:00:31, eta 0:25:19",
        "sample images: 25/1000 (2%), 0.62/s, elapsed 0:00:40, eta 0:26:00",
    ]


def test_progress_on_a_terminal_draws_the_bar_and_no_plain_line():
    f = io.StringIO()
    with progress("tokenize train", 20, Console(file=f, force_terminal=True, width=100)) as advance:
        for _ in range(20):
            advance()
    text = f.getvalue()
    assert ANSI in text and "20/20" in text
    assert not re.search(r"\d+/20 \(\d+%\)", text)
