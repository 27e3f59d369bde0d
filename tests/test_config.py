"""The config system: every preset loads with its stage's schema and sets only keys the stage reads;
bad keys and values are refused by name; each stage has its own defaults."""

from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from typer.testing import CliRunner

from mmar_cli.app import app
from mmar_cli.config import (STAGES, FinetuneConfig, SampleConfig, TokenizeConfig, TrainConfig, describe_fields,
                              load_config, load_preset)
from mmar_cli.errors import UserError
from mmar_cli.model.factory import TRAINING_MODEL_KEYS
from mmar_cli.model.presets import resolve

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name in STAGES)

# Keys a stage accepts but does not read under some configs: (stage, key or key prefix, ignored when, why).
TOKENIZER_ONLY = [("image_tokenizer.pca_dim", "pca"), ("image_tokenizer.vae_path", "vae"),
                  ("image_tokenizer.vae_scale", "vae")]
IGNORED = [("tokenize", "shapes.", lambda c, k: c.input != "builtin", "only the built-in dataset reads it"),
           ("tokenize", "image_tokenizer.shift_px", lambda c, k: c.image_tokenizer.shifts == 0, "no shifted copies"),
           ("tokenize", "text_tokenizer.vocab_size", lambda c, k: c.text_tokenizer.kind != "bpe", "read by 'bpe' alone"),
           ("tokenize", "text_tokenizer.path", lambda c, k: c.text_tokenizer.kind != "file", "read by 'file' alone"),
           *[("tokenize", key, lambda c, k, kind=kind: c.image_tokenizer.kind != kind, f"read by '{kind}' alone")
             for key, kind in TOKENIZER_ONLY],
           ("finetune", "model.", lambda c, k: k.split(".")[1] not in TRAINING_MODEL_KEYS,
            "the architecture comes from `init`"),
           *[(stage, "optim.min_lr_ratio", lambda c, k: c.optim.schedule != "cosine", "the cosine schedule's floor")
             for stage in ("pretrain", "finetune")]]


def set_keys(node: DictConfig, prefix: str = "") -> list:
    """The dotted keys of every value a YAML file sets."""
    keys = []
    for key, value in node.items():
        if isinstance(value, DictConfig):
            keys += set_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def unread_keys(stage: str, path: Path) -> list:
    """The keys a preset sets that its stage never reads (loading it refuses unknown keys and bad values)."""
    cfg = load_config(STAGES[stage], path)
    if stage in ("pretrain", "finetune"):
        resolve(cfg.model)  # the sizes fit together
    return [f"{key}: {why}" for key in set_keys(load_preset(path))
            for s, prefix, ignored, why in IGNORED if s == stage and key.startswith(prefix) and ignored(cfg, key)]


def test_every_stage_has_presets_including_the_demo_ones():
    assert {p.parent.name for p in PRESETS} == set(STAGES)
    names = {(p.parent.name, p.stem) for p in PRESETS}
    for stage in ("tokenize", "pretrain", "finetune", "sample", "evaluate"):
        assert (stage, "demo") in names, f"configs/{stage}/demo.yaml is what `make demo` runs"
    for stage in ("tokenize", "pretrain", "evaluate"):
        assert (stage, "eval") in names, f"configs/{stage}/eval.yaml is what `make eval` runs"


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(ROOT)) for p in PRESETS])
def test_every_preset_loads_with_its_stage_schema_and_sets_only_keys_it_reads(path):
    assert unread_keys(path.parent.name, path) == []


def test_a_preset_key_the_stage_never_reads_is_found(tmp_path):
    preset = tmp_path / "ft.yaml"
    preset.write_text("model:\n  width: 512\n  mask_min: 0.5\noptim:\n  schedule: constant\n  min_lr_ratio: 0.2\n")
    assert unread_keys("finetune", preset) == ["model.width: the architecture comes from `init`",
                                               "optim.min_lr_ratio: the cosine schedule's floor"]
    preset.write_text("input: photos.jsonl\nshapes:\n  num_train: 10\nimage_tokenizer:\n  kind: patch\n  pca_dim: 8\n")
    assert unread_keys("tokenize", preset) == ["shapes.num_train: only the built-in dataset reads it",
                                               "image_tokenizer.pca_dim: read by 'pca' alone"]
    preset.write_text("model:\n  widht: 512\n")
    with pytest.raises(UserError, match="model.widht"):
        unread_keys("pretrain", preset)


def test_pretrain_and_finetune_have_their_own_defaults():
    pre, fine = load_config(TrainConfig), load_config(FinetuneConfig)
    assert (pre.out, pre.init, fine.out, fine.init) == ("runs/pretrain", None, "runs/finetune", "runs/pretrain/final")
    assert (pre.tasks.i2t, pre.optim.lr, pre.trainer.max_steps) == (0.45, 2e-3, 3000)
    assert (fine.tasks.i2t, fine.optim.lr, fine.trainer.max_steps) == (0.4, 1e-3, 1120)
    assert pre.model == fine.model  # the model keys finetune reads default as in pretraining
    shown = {key: default for key, default, _ in describe_fields(FinetuneConfig)}
    assert (shown["tasks.i2t"], shown["optim.lr"], shown["init"]) == ("0.4", "0.001", "'runs/pretrain/final'")


def changed_keys(a: DictConfig, b: DictConfig) -> set:
    return {k for k in set_keys(b) if OmegaConf.select(a, k) != OmegaConf.select(b, k)}


def test_the_demo_presets_change_only_the_frame_the_width_the_batch_and_the_length():
    """`mmar pretrain` with no preset trains the demo's model 256 wide at batch 64: the demo's presets cut the
    frame to the built-in captions, train with no loader process, narrow the model to 192 and pretrain at batch
    128 with its warmup and EMA (what measured best in the demo's time)."""
    default, demo = load_config(TrainConfig), load_config(TrainConfig, ROOT / "configs" / "pretrain" / "demo.yaml")
    assert changed_keys(default, demo) == {"model.max_prefix_len", "model.max_suffix_len", "trainer.num_workers",
                                           "model.width", "model.mlp_hidden", "optim.warmup_steps",
                                           "trainer.batch_size", "trainer.ema_decay", "trainer.max_steps"}
    assert (demo.model.width, demo.model.mlp_hidden, demo.optim.lr) == (192, 512, 2e-3)
    assert (demo.trainer.batch_size, demo.trainer.max_steps) == (128, 2100)
    # warmup and EMA span as many samples as the defaults do at batch 64
    assert demo.optim.warmup_steps * demo.trainer.batch_size == default.optim.warmup_steps * 64
    assert default.trainer.batch_size == 64
    assert abs(default.trainer.ema_decay ** 2 - demo.trainer.ema_decay) < 1e-4


def test_the_demo_finetunes_at_the_pretrainings_batch_on_as_many_samples_as_the_default():
    default = load_config(STAGES["finetune"])
    demo = load_config(STAGES["finetune"], ROOT / "configs" / "finetune" / "demo.yaml")
    pretrain = load_config(TrainConfig, ROOT / "configs" / "pretrain" / "demo.yaml")
    assert changed_keys(default, demo) == {"optim.lr", "optim.warmup_steps", "trainer.batch_size",
                                           "trainer.max_steps", "trainer.ema_decay", "trainer.num_workers"}
    assert demo.trainer.batch_size == pretrain.trainer.batch_size == 128
    assert demo.trainer.max_steps * 128 == 1280 * 64  # the samples of the 1280 steps at 64 it replaced
    assert (demo.optim.lr, demo.optim.warmup_steps * 128) == (1.4e-3, default.optim.warmup_steps * 64)
    assert demo.trainer.ema_decay == pretrain.trainer.ema_decay == 0.99


def test_the_demo_samples_as_it_is_evaluated():
    """`make demo`'s pictures (configs/sample/demo.yaml) are drawn as its figures were (configs/evaluate/demo.yaml),
    at the settings measured on its models, not the defaults."""
    sample = load_config(SampleConfig, ROOT / "configs" / "sample" / "demo.yaml").gen
    evaluate = load_config(STAGES["evaluate"], ROOT / "configs" / "evaluate" / "demo.yaml").gen
    assert OmegaConf.to_container(sample) == OmegaConf.to_container(evaluate)
    assert (sample.candidates, sample.temperature_end, sample.noise_share) == (4, 0.1, 0.15)


def test_a_preset_starts_from_its_base_and_overrides_it(tmp_path):
    demo, short = (load_config(TrainConfig, ROOT / "configs" / "pretrain" / f"{name}.yaml") for name in ("demo", "eval"))
    assert changed_keys(demo, short) == {"trainer.max_steps", "trainer.ckpt_every", "model.width",
                                         "model.mlp_hidden", "optim.warmup_steps", "trainer.batch_size",
                                         "trainer.ema_decay"}
    assert (short.model.max_prefix_len, short.trainer.num_workers, short.trainer.max_steps) == (12, 0, 800)
    default = load_config(TrainConfig)  # make eval keeps the model, batch and rate its thresholds were set on
    assert (short.model.width, short.model.mlp_hidden, short.optim.lr) == (256, 704, default.optim.lr)
    assert (short.trainer.batch_size, short.optim.warmup_steps, short.trainer.ema_decay) == (
        default.trainer.batch_size, default.optim.warmup_steps, default.trainer.ema_decay)
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrainer:\n  max_steps: 5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="leads back to itself"):
        load_config(TrainConfig, tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(UserError, match="gone.yaml"):
        load_config(TrainConfig, tmp_path / "a.yaml")


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


def test_options_are_merged_as_typed_values_after_the_overrides():
    # a value no YAML parser must see: brackets, a colon, an equals sign
    cfg = load_config(SampleConfig, overrides=["gen.cfg=2", "seed=4"],
                      options={"out": Path("runs/[a]: b=c"), "gen.cfg": 3.5, "seed": None, "ema": False})
    assert cfg.out == "runs/[a]: b=c" and cfg.gen.cfg == 3.5 and cfg.seed == 4 and cfg.ema is False
    with pytest.raises(UserError, match=r"config key 'gen.sampler': 'foo' is not allowed; choose one of 'ddpm'"):
        load_config(SampleConfig, options={"gen.sampler": "foo"})
    with pytest.raises(UserError, match=r"config key 'num_images': 0 is below the minimum 1"):
        load_config(SampleConfig, options={"num_images": 0})


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
