"""What `mmar pretrain` and `mmar finetune` share: the CLI options and `run()`, one training run.

run(): read the shards' manifest and tokenizers -> fill the model's sizes from them -> pick up `init`
(finetune), `--resume` or a fresh start -> train with a plain Lightning Trainer whose callbacks write our
checkpoint layout (`mmar_cli.engine.checkpoint`) and the preview grids/captions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import lightning as L
import numpy as np
import torch
import typer
import webdataset as wds
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from PIL import Image

from mmar_cli.cli_common import CONFIG_HELP, OVERRIDES_HELP, build_config, command_line, console
from mmar_cli.config import to_yaml
from mmar_cli.data import shards as shard_io
from mmar_cli.data.datamodule import ShardDataModule, fits
from mmar_cli.data.sequence import CAPTION, T2I, build_batch, encode_prefix
from mmar_cli.engine import checkpoint as ckpt
from mmar_cli.engine import slurm
from mmar_cli.engine.log_lines import LogLines, StepProgressBar
from mmar_cli.engine.module import MODEL_KEYS, NonFiniteLoss, TrainModule
from mmar_cli.errors import UserError, warn

# Model keys a finetune may change; every other model key (the architecture) comes from `init`.
TRAINING_MODEL_KEYS = ("mask_min", "mask_std", "known_noise", "caption_noise", "grad_checkpointing")
PREVIEW_ROWS = 4

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
    """Build the config from the command line (shortcut options as overrides) and run."""
    names = {"max_steps": "trainer.max_steps"}
    cfg = build_config(schema, config, overrides, **{names.get(k, k): v for k, v in shortcuts.items()})
    return run(cfg, stage, overwrite=overwrite)


def _compatible(a: dict, b: dict, what: str) -> None:
    try:
        shard_io.check_compatible(a, b)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None


def model_config(cfg, tok, image_tok, init_cfg=None):
    """The model's config: sizes from the shards' tokenizers; architecture from `init_cfg` if given."""
    from mmar_cli.model.presets import resolve

    model = cfg.model
    if init_cfg is not None:
        model = OmegaConf.merge(init_cfg.model, {k: cfg.model[k] for k in TRAINING_MODEL_KEYS})
        model.init_from_qwen2 = None
    data_sizes = {"vocab_size": tok.vocab_size, "token_dim": image_tok.token_dim,
                  "image_grid": list(image_tok.grid), "token_bound": image_tok.value_bound}
    for key, value in data_sizes.items():
        if model[key] is not None and (list(model[key]) if key == "image_grid" else model[key]) != value:
            raise UserError(f"config key 'model.{key}': {model[key]} but the shards' tokenizer gives {value} "
                            "(leave it unset: it is read from the shards)")
        model[key] = value
    return resolve(model)


def _prepare_out(out: Path, resume: Optional[str], overwrite: bool) -> Optional[ckpt.Checkpoint]:
    """The checkpoint to resume from (or None), after refusing to mix two runs in one directory.
    Only rank 0 checks and cleans: the other ranks start once it has begun writing there."""
    if resume:
        found = ckpt.find_resume(out, resume)
        if found is not None:
            return found
    if rank_zero_only.rank == 0 and ckpt.run_in_use(out) and not resume:
        if not overwrite:
            raise UserError(f"{out} already holds a run (config.yaml or checkpoints); pass --resume auto to "
                            "continue it, --overwrite to replace it, or another --out")
        for p in out.iterdir():
            if p.name in ("config.yaml", "command.txt", "final", "logs", "samples") or ckpt.STEP_RE.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def run(cfg, stage: str, overwrite: bool = False) -> Path:
    """Train as `cfg` (a validated TrainConfig) says; returns the final checkpoint directory."""
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.ema_decay > 0:
        raise UserError("trainer.strategy=fsdp shards the weights and the EMA is kept whole: set "
                        "trainer.ema_decay=0 with fsdp, or use trainer.strategy=ddp")
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
    resume = _prepare_out(out, cfg.resume, overwrite)
    if resume:
        _compatible(resume.manifest, manifest, f"resume checkpoint {resume.path} vs data {cfg.data}")

    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    model = build_model(cfg, init=None if resume else init)
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


def lightning_strategy(name: str):
    """trainer.strategy as Lightning takes it. 'fsdp' makes each transformer block and each block of the
    diffusion head a unit of its own, so a GPU gathers one block's weights at a time: wrapped whole (what
    the bare name does), the model is one unit and every GPU gathers all of it for every forward pass."""
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from mmar_cli.model.backbone import Block
        from mmar_cli.model.diffusion_head import ResBlock

        return FSDPStrategy(auto_wrap_policy={Block, ResBlock}, sharding_strategy="FULL_SHARD")
    return "ddp_find_unused_parameters_true" if name == "ddp" else name


def build_model(cfg, init: Optional[ckpt.Checkpoint] = None):
    """MMAR from the resolved config, with Qwen2 backbone weights or an `init` checkpoint's weights."""
    from mmar_cli.model.mmar import MMAR

    model = MMAR(cfg.model)
    model.w_img, model.w_txt = cfg.tasks.w_img, cfg.tasks.w_txt
    if init is not None:
        model.load_state_dict(init.weights())
    elif cfg.model.init_from_qwen2:
        from mmar_cli.model.qwen2_adapter import load_qwen2_into

        load_qwen2_into(model.backbone, cfg.model.init_from_qwen2)
    return model


# --------------------------------------------------------------------------------------------------
# Previews: a grid of generated images, a few captions and a validation loss
# --------------------------------------------------------------------------------------------------
class Previews(L.Callback):
    """Every `trainer.sample_every` steps and at the end, rank 0 writes `{out}/samples/step-XXXXXXXX.png`
    (images generated from the captions of a few held-out samples) and `.txt` (those captions, and the
    captions the model writes for the held-out images), and logs the loss on those samples."""

    def __init__(self, out: Path, cfg, tok, image_tok, shards: List[str]):
        from mmar_cli.config import GenerationConfig

        self.dir = out / "samples"
        self.cfg, self.tok, self.image_tok = cfg, tok, image_tok
        self.shards = shards
        self.gen = OmegaConf.structured(GenerationConfig(iterations=4, diffusion_steps=10, max_new_tokens=16))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        every = self.cfg.trainer.sample_every
        if every and module.step % every == 0 and module.step < self.cfg.trainer.max_steps:
            val_loss = self.write(trainer, module, ckpt.step_name(module.step))
            if val_loss is not None:
                module.log("val/loss", val_loss)

    def on_train_end(self, trainer, module):
        self.write(trainer, module, "final")

    def _samples(self, layout) -> list:
        decoded = []
        for raw in wds.tariterators.tarfile_samples([{"url": self.shards[0]}], handler=wds.warn_and_continue):
            s = shard_io.decode_sample(raw)
            if fits(self.tok, layout, T2I, s["caption"], None) and fits(self.tok, layout, CAPTION, "", s["caption"]):
                decoded.append(s)
            if len(decoded) == PREVIEW_ROWS:
                break
        return decoded

    def write(self, trainer, module, name: str) -> Optional[float]:
        if not trainer.is_global_zero or self.cfg.trainer.strategy == "fsdp":  # FSDP: weights are sharded
            return None
        model, dev = module.model, module.device
        samples = self._samples(model.layout)
        if not samples:
            return None
        s, lay = self.tok.specials, model.layout
        captions = [x["caption"] for x in samples]
        images = torch.stack([torch.as_tensor(x["tokens"]).float() for x in samples]).to(dev)
        model.eval()
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            tasks = [T2I] * len(samples) + [CAPTION] * len(samples)
            batch = build_batch(self.tok, lay, tasks, captions * 2, [None] * len(samples) + captions,
                                torch.cat([images, images]))
            torch.manual_seed(self.cfg.trainer.seed)
            val_loss = float(model({k: batch[k].to(dev) for k in MODEL_KEYS})["loss"])
            prompts = torch.stack([encode_prefix(self.tok, T2I, c, lay) for c in captions]).to(dev)
            gen = torch.Generator().manual_seed(self.cfg.trainer.seed)
            made = model.generate_images(prompts, None, self.gen, s.boi, gen, pad_id=s.pad)
            cap_prefix = torch.stack([encode_prefix(self.tok, CAPTION, "", lay)] * len(samples)).to(dev)
            written = model.generate_text(images, cap_prefix, self.gen, s.boi, s.eoi, s.eos, pad_id=s.pad)
        model.train()
        self.dir.mkdir(parents=True, exist_ok=True)
        truth = self.image_tok.decode(images.float().cpu())
        fake = self.image_tok.decode(made.float().cpu())
        grid = np.concatenate([np.concatenate(list(truth), axis=1), np.concatenate(list(fake), axis=1)], axis=0)
        Image.fromarray(grid).save(self.dir / f"{name}.png")
        lines = [f"step {module.step}  val loss {val_loss:.4f}",
                 "top row: held-out images; bottom row: generated from their captions"]
        lines += [f"caption: {c!r}  ->  written: {self.tok.decode(w)!r}" for c, w in zip(captions, written)]
        (self.dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
        return val_loss
