"""Checkpoint directories: `{out}/step-00001000/` and `{out}/final/`.

Each holds

    model.safetensors   the trained weights
    ema.safetensors     their exponential moving average (absent when trainer.ema_decay = 0)
    trainer.pt          what resuming needs: optimizer and scheduler state, RNG states, global step, data
                        position. Tensors and plain types only, read back with torch.load(weights_only=True)
    config.yaml         the resolved run config
    manifest.json       the token shards' manifest (which tokenizers the model speaks)
    text_tokenizer.json / image_tokenizer.safetensors   copied from the shard directory when present
    command.txt         the command line that made it
    COMPLETE            written last

A checkpoint is written into a hidden temporary directory and renamed into place, and `COMPLETE` is its
last file, so a crash at any moment never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Optional

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmar_cli.errors import UserError

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d{8})$")
TOKENIZER_FILES = ("text_tokenizer.json", "image_tokenizer.safetensors")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: str | Path) -> bool:
    return Path(path, COMPLETE).is_file()


def step_dirs(out: str | Path) -> list[Path]:
    """Complete step directories of a run, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def run_in_use(out: str | Path) -> bool:
    """Another run has already written here (its config or any checkpoint)."""
    out = Path(out)
    if not out.is_dir():
        return False
    return (out / "config.yaml").exists() or (out / "final").exists() or any(
        STEP_RE.match(p.name) for p in out.iterdir())


def find_resume(out: str | Path, resume: str) -> Optional[Path]:
    """`resume='auto'`: `out/final` if the run finished, else its newest complete step directory (None if
    there is none yet); otherwise `resume` itself, which must be a complete checkpoint."""
    if resume == "auto":
        if is_complete(Path(out, "final")):
            return Path(out, "final")
        found = step_dirs(out)
        return found[-1] if found else None
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"resume: {path} is not a complete checkpoint directory (no {COMPLETE} file)")
    return path


def _state_to_cpu(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied embeddings); clone breaks the sharing.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def save_checkpoint(path: str | Path, *, model_state: Dict[str, torch.Tensor],
                    ema_state: Optional[Dict[str, torch.Tensor]], trainer_state: dict, config_yaml: str,
                    shard_dir: str | Path, command: str) -> Path:
    """Write one checkpoint atomically at `path` (replacing an older one of the same name)."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_state_to_cpu(model_state), str(tmp / "model.safetensors"))
    if ema_state is not None:
        save_file(_state_to_cpu(ema_state), str(tmp / "ema.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.copy2(Path(shard_dir, "manifest.json"), tmp / "manifest.json")
    for name in TOKENIZER_FILES:
        if Path(shard_dir, name).is_file():
            shutil.copy2(Path(shard_dir, name), tmp / name)
    (tmp / "command.txt").write_text(command + "\n")
    (tmp / COMPLETE).write_text("")
    _fsync_dir(tmp)
    if path.exists():
        old = path.parent / f".old-{path.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
    return path


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def prune(out: str | Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` step directories (final/ is never touched)."""
    for old in step_dirs(out)[:-keep_last]:
        shutil.rmtree(old)


def load_weights(path: str | Path, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model (or EMA) weights of a checkpoint directory."""
    name = "ema.safetensors" if ema else "model.safetensors"
    file = Path(path, name)
    if not is_complete(path):
        raise UserError(f"{path} is not a complete checkpoint directory (no {COMPLETE} file)")
    if not file.is_file():
        raise UserError(f"{path}: no {name}")
    return load_file(str(file))


def load_trainer_state(path: str | Path) -> dict:
    return torch.load(Path(path, "trainer.pt"), map_location="cpu", weights_only=True)


def load_manifest(path: str | Path) -> dict:
    file = Path(path, "manifest.json")
    if not file.is_file():
        raise UserError(f"{path}: no manifest.json")
    return json.loads(file.read_text())


# --------------------------------------------------------------------------------------------------
# RNG states as tensors and plain types (so trainer.pt loads with weights_only=True)
# --------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# --------------------------------------------------------------------------------------------------
# The Lightning callback that writes our layout
# --------------------------------------------------------------------------------------------------
class CheckpointWriter(L.Callback):
    """Writes `step-XXXXXXXX/` every `trainer.ckpt_every` steps (pruned to `keep_last`) and `final/` at the
    end. Weights and optimizer state are gathered through the strategy, so DDP and FSDP give one full
    checkpoint; rank 0 writes it and the others wait."""

    def __init__(self, out: str | Path, cfg, config_yaml: str, shard_dir: str | Path, command: str):
        self.out = Path(out)
        self.cfg = cfg
        self.config_yaml = config_yaml
        self.shard_dir = shard_dir
        self.command = command

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = module.step
        if step % self.cfg.trainer.ckpt_every == 0 and step < self.cfg.trainer.max_steps:
            self.save(trainer, module, self.out / step_name(step))
            if trainer.is_global_zero:
                prune(self.out, self.cfg.trainer.keep_last)

    def on_train_end(self, trainer, module):
        self.save(trainer, module, self.out / "final")

    def save(self, trainer, module, path: Path) -> None:
        model_state = {k.removeprefix("model."): v
                       for k, v in trainer.strategy.lightning_module_state_dict().items()}
        optimizer_state = trainer.strategy.optimizer_state(trainer.optimizers[0])
        counts = module.total_counts()
        if trainer.is_global_zero:
            state = {
                "step": module.step,
                "optimizer": optimizer_state,
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                "rng": rng_state(),
                # one batch per rank per step: the data position is the step (checked against these on resume)
                "data": {"batches_per_rank": module.step, "batch_size": self.cfg.trainer.batch_size,
                         "world_size": trainer.world_size},
                "counts": counts,
            }
            save_checkpoint(path, model_state=model_state, ema_state=module.ema_state(), trainer_state=state,
                            config_yaml=self.config_yaml, shard_dir=self.shard_dir, command=self.command)
        trainer.strategy.barrier()
