"""What `mmar pretrain` and `mmar finetune` share: the CLI options and `run()`, one training run.

run(): read the shards' manifest and tokenizers -> fill the model's sizes from them -> pick up `init`
(finetune), `--resume` or a fresh start -> train with a plain Lightning Trainer whose callbacks write our
checkpoint layout (`mmar_cli.engine.checkpoint`) and the previews (`mmar_cli.engine.previews`); the model
comes from `mmar_cli.model.factory`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import lightning as L
import torch
import typer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from mmar_cli.cli_common import CONFIG_HELP, OVERRIDES_HELP, command_line
from mmar_cli.config import load_config, to_yaml
from mmar_cli.data import shards as shard_io
from mmar_cli.data.datamodule import ShardDataModule
from mmar_cli.engine import checkpoint as ckpt
from mmar_cli.engine import slurm
from mmar_cli.engine.log_lines import LogLines, StepProgressBar
from mmar_cli.engine.module import NonFiniteLoss, TrainModule
from mmar_cli.engine.previews import Previews
from mmar_cli.engine.strategy import lightning_strategy
from mmar_cli.errors import UserError, console, warn
from mmar_cli.model.factory import build_model, model_config
from mmar_cli.model.mmar import compile_unavailable
from mmar_cli.seeding import seed_run

# The options both commands take (Typer option markers can be shared between commands).
OVERRIDES = typer.Argument(None, help=OVERRIDES_HELP)
CONFIG = typer.Option(None, "--config", "-c", help=CONFIG_HELP)
DATA = typer.Option(None, "--data", help="token shard directory (config key data)")
OUT = typer.Option(None, "--out", help="run directory for step-XXXXXXXX/ and final/ (config key out)")
RESUME = typer.Option(None, "--resume", help="'auto' (newest complete checkpoint in --out, or a fresh start) "
                      "or a checkpoint directory (config key resume)")
MAX_STEPS = typer.Option(None, "--max-steps", help="optimizer steps (config key trainer.max_steps)")
OVERWRITE = typer.Option(False, "--overwrite", help="reuse an --out directory that holds another run "
                         "(its checkpoints are deleted)")


def cli_run(schema, stage: str, config: Optional[Path], overrides: Optional[List[str]],
            overwrite: bool, **shortcuts) -> Path:
    """Build the config from the command line (the shortcut options by their config keys) and run."""
    names = {"max_steps": "trainer.max_steps"}
    cfg = load_config(schema, config, overrides, {names.get(k, k): v for k, v in shortcuts.items()})
    return run(cfg, stage, overwrite=overwrite)


def _compatible(a: dict, b: dict, what: str) -> None:
    try:
        shard_io.check_compatible(a, b)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


def run(cfg, stage: str, overwrite: bool = False) -> Path:
    """Train as `cfg` (a validated TrainConfig) says; returns the final checkpoint directory."""
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.ema_decay > 0:
        raise UserError("trainer.strategy=fsdp shards the weights and the EMA is kept whole: set "
                        "trainer.ema_decay=0 with fsdp, or use trainer.strategy=ddp")
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.compile:
        raise UserError("trainer.compile compiles the blocks that trainer.strategy=fsdp wraps and shards: set "
                        "trainer.compile=false with fsdp, or use trainer.strategy=ddp")
    if cfg.trainer.compile:
        reason = compile_unavailable("cpu" if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
                                     else "cuda")
        if reason:
            raise UserError(f"config key 'trainer.compile': {reason}; install one (e.g. g++) or set "
                            "trainer.compile=false")
    manifest = shard_io.read_manifest(cfg.data)
    shards = shard_io.shard_checksums(cfg.data)  # each checked by the loader as it opens it
    if not shards:
        raise UserError(f"{cfg.data}: the manifest lists no shards")
    val_dir = cfg.val_data
    if val_dir is not None:
        _compatible(manifest, shard_io.read_manifest(val_dir), f"data {cfg.data} vs val_data {val_dir}")
    tok, image_tok = shard_io.load_tokenizers(cfg.data)

    init = None
    if cfg.init is not None:
        init = ckpt.load(cfg.init, "init")
        _compatible(init.manifest, manifest, f"init checkpoint {cfg.init} vs data {cfg.data}")
    elif stage == "finetune":
        raise UserError("finetune needs init: a pretrain checkpoint directory (--init runs/pretrain/final)")
    cfg.model = model_config(cfg, tok, image_tok, init.config if init else None)

    out = Path(cfg.out)
    resume = ckpt.prepare_out(out, cfg.resume, overwrite)
    if resume:
        _compatible(resume.manifest, manifest, f"resume checkpoint {resume.path} vs data {cfg.data}")

    seed_run(cfg.trainer.seed)
    model = build_model(cfg, tok.specials, init=None if resume else init)
    if cfg.trainer.compile:
        model.compile_training()
    keys_log = str(out / "keys") if cfg.trainer.log_keys else None
    module = TrainModule(cfg, model, keys_log=keys_log)
    data = ShardDataModule(shards, tok, model.layout, cfg)
    if resume:
        state = ckpt.restore(resume, module, data)
        console.print(f"resuming from {resume.path} (step {state['step']})", soft_wrap=True, highlight=False)
        if state["step"] >= cfg.trainer.max_steps:
            console.print(f"{resume.path} is already at step {state['step']} >= trainer.max_steps; nothing to do")
            return resume.path
        if state["data"]["batch_size"] != cfg.trainer.batch_size or \
                state["data"]["world_size"] != cfg.trainer.devices * cfg.trainer.num_nodes:
            warn("batch size or world size changed since the checkpoint; the data order will not continue exactly")
    start = module.start_step

    config_yaml = to_yaml(cfg)
    if rank_zero_only.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
    # a terminal gets the Rich bar; a log file (batch job, pipe) plain lines, as a bar drawn in place shows
    # nothing there until the end
    on_terminal = console.is_terminal
    progress = (StepProgressBar() if on_terminal
                else LogLines(cfg.trainer.log_every, start, cfg.trainer.max_steps, console.file))
    callbacks = [
        progress,
        ckpt.CheckpointWriter(out, cfg, config_yaml, cfg.data, command_line()),
        Previews(out, cfg, tok, image_tok, shard_io.shard_paths(val_dir) if val_dir else list(shards)),
    ]
    trainer = L.Trainer(
        max_steps=cfg.trainer.max_steps - start,
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=lightning_strategy(cfg.trainer.strategy),
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.optim.grad_clip or None,
        logger=[CSVLogger(out, name="logs", version=""), TensorBoardLogger(out, name="logs", version="")],
        log_every_n_steps=cfg.trainer.log_every,
        callbacks=callbacks, plugins=slurm.cluster_plugins(),
        enable_progress_bar=on_terminal, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    try:
        trainer.fit(module, datamodule=data)
    except NonFiniteLoss as e:
        last = ckpt.step_dirs(out)[-1] if ckpt.step_dirs(out) else "none"
        raise UserError(f"{e}; training stopped. Last good checkpoint: {last}. Try a lower "
                        "optim.lr, a stronger optim.grad_clip or trainer.precision=32") from None
    except ckpt.Preempted as e:
        console.print(f"preempted at step {e.step}: wrote {e.path} and requeued SLURM job {e.job}, which "
                      "continues with --resume auto", soft_wrap=True, highlight=False)
        return e.path
    if trainer.is_global_zero:
        counts = module.counts
        console.print(f"done: {out / 'final'} (step {module.step}); samples skipped: {counts['skipped_long']} "
                      f"with text longer than the layout, {counts['corrupt']} corrupt")
    return out / "final"
