"""The sbatch templates agree with the configs they run (nodes, GPUs per node, --resume auto), and the
requeue command a preempted run calls."""

import os
import re
from pathlib import Path

import pytest

from mmar_cli.config import STAGES, load_config

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "configs" / "slurm").glob("*.sbatch"))


def directives(text: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))


def run_line(text: str) -> tuple[str, Path]:
    m = re.search(r"^srun mmar (\w+) --config (\S+)", text, re.M)
    assert m, "no `srun mmar STAGE --config FILE` line"
    return m.group(1), ROOT / m.group(2)


def test_there_are_templates_for_the_gpu_stages():
    assert {p.stem for p in TEMPLATES} >= {"tokenize", "pretrain", "finetune"}


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_template_requeues_on_sigusr1_and_runs_an_existing_config(path):
    text = path.read_text()
    d = directives(text)
    assert d["signal"] == "SIGUSR1@90" and "requeue" in d
    stage, config = run_line(text)
    assert config.is_file(), config
    load_config(STAGES[stage], config)  # validates


@pytest.mark.parametrize("name", ["pretrain", "finetune"])
def test_training_template_layout_matches_its_config(name):
    text = (ROOT / "configs" / "slurm" / f"{name}.sbatch").read_text()
    d = directives(text)
    stage, config = run_line(text)
    cfg = load_config(STAGES[stage], config)
    assert int(d["nodes"]) == cfg.trainer.num_nodes
    assert int(d["ntasks-per-node"]) == cfg.trainer.devices  # one srun task per GPU
    assert d["gres"] == f"gpu:{cfg.trainer.devices}"
    assert "--resume auto" in text  # a requeued job continues


def test_tokenize_template_is_an_array_job():
    d = directives((ROOT / "configs" / "slurm" / "tokenize.sbatch").read_text())
    assert re.fullmatch(r"\d+-\d+", d["array"])


def test_requeue_names_an_array_task_by_its_own_id(monkeypatch):
    from mmar_cli.engine import slurm

    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm.job_id() is None  # not in a SLURM job: SIGUSR1 is left alone
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm.job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm.job_id() == "4240_2"


def test_a_failed_requeue_is_one_line_that_says_how_to_continue(tmp_path, monkeypatch):
    from mmar_cli.engine import slurm
    from mmar_cli.errors import UserError

    stub = tmp_path / "scontrol"
    stub.write_text('#!/bin/sh\necho "scontrol: error: Invalid job id specified" >&2\nexit 1\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(UserError) as e:
        slurm.requeue("4242", tmp_path / "step-00000005")
    assert str(e.value) == (f"preempted: {tmp_path / 'step-00000005'} is written, but `scontrol requeue 4242` failed "
                            "(exit 1: scontrol: error: Invalid job id specified); submit the job again, it continues "
                            "with --resume auto")
