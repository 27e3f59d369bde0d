"""The config system: every preset loads and validates; bad keys and values are refused by name."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.config import STAGES, TokenizeConfig, TrainConfig, describe_fields, load_config
from mmar_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name in STAGES)


def test_every_stage_has_presets_including_the_demo_ones():
    assert {p.parent.name for p in PRESETS} == set(STAGES)
    names = {(p.parent.name, p.stem) for p in PRESETS}
    for stage in ("tokenize", "pretrain", "finetune", "sample", "evaluate"):
        assert (stage, "demo") in names, f"configs/{stage}/demo.yaml is what `make demo` runs"
    for stage in ("tokenize", "pretrain", "evaluate"):
        assert (stage, "eval") in names, f"configs/{stage}/eval.yaml is what `make eval` runs"


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(ROOT)) for p in PRESETS])
def test_every_preset_loads_and_validates(path):
    cfg = load_config(STAGES[path.parent.name], path)
    assert cfg is not None


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, overrides=["trainer.max_stepz=5"])
    msg = str(e.value)
    assert "trainer.max_stepz" in msg and "max_steps" in msg


def test_wrong_type_names_the_key():
    with pytest.raises(UserError, match="trainer.batch_size"):
        load_config(TrainConfig, overrides=["trainer.batch_size=lots"])


def test_choice_and_range_are_checked():
    with pytest.raises(UserError, match=r"model.diffusion.prediction.*'v', 'eps'"):
        load_config(TrainConfig, overrides=["model.diffusion.prediction=x0"])
    with pytest.raises(UserError, match="tasks.p_uncond.*maximum"):
        load_config(TrainConfig, overrides=["tasks.p_uncond=1.5"])


def test_override_without_equals_is_refused():
    with pytest.raises(UserError, match="key=value"):
        load_config(TokenizeConfig, overrides=["shard_size"])


def test_overrides_apply_in_order():
    cfg = load_config(TrainConfig, overrides=["model.depth=3", "model.depth=5", "optim.lr=0.5"])
    assert cfg.model.depth == 5 and cfg.optim.lr == 0.5


def test_every_field_is_documented():
    for schema in STAGES.values():
        for key, _, help_text in describe_fields(schema):
            assert help_text.strip(), f"{schema.__name__}.{key} has no help"


def test_cli_lists_subcommands_and_reports_user_errors_in_one_line():
    runner = CliRunner()
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for name in ["tokenize", "pretrain", "finetune", "sample", "evaluate", "config"]:
        assert name in out.output
    bad = runner.invoke(app, ["tokenize", "nonsense.key=1"])
    assert bad.exit_code == 2
    assert "nonsense" in bad.output and "Traceback" not in bad.output
