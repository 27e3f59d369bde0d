"""The sbatch templates agree with the configs they run: nodes and GPUs per node."""

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
