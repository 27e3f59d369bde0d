"""Checkpoint directories, `{out}/step-00001000/` and `{out}/final/`: the one way to write them (`save`,
`CheckpointWriter`), open them (`load`) and resume from them (`prepare_out`, `find_resume`, `restore`).

Each holds

    model.safetensors   the trained weights
    ema.safetensors     their exponential moving average (absent when trainer.ema_decay = 0)
    trainer.pt          what resuming needs: optimizer and scheduler state, RNG states, global step, data
                        position. Tensors and plain types only, read back with torch.load(weights_only=True)
    config.yaml         the resolved run config
    manifest.json       the token shards' manifest (which tokenizers the model speaks)
    text_tokenizer.json / image_tokenizer.safetensors   copied from the shard directory when present
    command.txt         the command line that made it
    COMPLETE            written last: the size and sha256 of every other file (JSON)

A checkpoint is written into a hidden temporary directory and renamed into place, and `COMPLETE` is its
last file (itself written under a temporary name), so a crash at any moment never leaves a directory that
looks complete. Every reader checks each file against `COMPLETE` before it reads it: a truncated, altered
or missing file stops the run with one line that names it, never a traceback or a model built from
damaged weights, and `--resume auto` passes over a damaged checkpoint to the newest intact one. A
checkpoint written before the checksums existed has an empty `COMPLETE`; it is read unchecked, with a
warning.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmar_cli.data.shards import file_sha256
from mmar_cli.engine import slurm
from mmar_cli.errors import UserError, warn
from mmar_cli.seeding import rng_state, set_rng_state

COMPLETE = "COMPLETE"
CHECKSUMS_FORMAT = 1
MODEL, EMA, TRAINER = "model.safetensors", "ema.safetensors", "trainer.pt"
STEP_RE = re.compile(r"^step-(\d{8})$")
TOKENIZER_FILES = ("text_tokenizer.json", "image_tokenizer.safetensors")
ADVICE = "use another checkpoint (an earlier step-XXXXXXXX/ of the run) or train it again"


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


def newest_final(root: str | Path) -> Optional[Path]:
    """The most recently completed `final/` anywhere under `root` (by the time its COMPLETE was written)."""
    root = Path(root)
    finals = [p.parent for p in root.glob(f"**/final/{COMPLETE}")] if root.is_dir() else []
    return max(finals, key=lambda p: (p / COMPLETE).stat().st_mtime) if finals else None


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _state_to_cpu(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied embeddings); clone breaks the sharing.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def save(path: str | Path, *, model_state: Dict[str, torch.Tensor], ema_state: Optional[Dict[str, torch.Tensor]],
         trainer_state: dict, config_yaml: str, shard_dir: str | Path, command: str) -> Path:
    """Write one checkpoint atomically at `path` (replacing an older one of the same name)."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_state_to_cpu(model_state), str(tmp / MODEL))
    if ema_state is not None:
        save_file(_state_to_cpu(ema_state), str(tmp / EMA))
    torch.save(trainer_state, tmp / TRAINER)
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.copy2(Path(shard_dir, "manifest.json"), tmp / "manifest.json")
    for name in TOKENIZER_FILES:
        if Path(shard_dir, name).is_file():
            shutil.copy2(Path(shard_dir, name), tmp / name)
    (tmp / "command.txt").write_text(command + "\n")
    _write_checksums(tmp)
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


def _write_checksums(directory: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMPLETE}
    tmp = directory / f"{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"format": CHECKSUMS_FORMAT, "files": files}, indent=2) + "\n")
    os.replace(tmp, directory / COMPLETE)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def prune(out: str | Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` step directories (final/ is never touched)."""
    for old in step_dirs(out)[:-keep_last]:
        shutil.rmtree(old)


# --------------------------------------------------------------------------------------------------
# Reading: every file is checked against COMPLETE before it is read
# --------------------------------------------------------------------------------------------------
class DamagedCheckpoint(UserError):
    """A file of a complete checkpoint is missing, truncated, altered or unreadable; `short` says which
    and how in a few words."""

    def __init__(self, message: str, short: str):
        self.short = short
        super().__init__(f"{message}; the checkpoint is damaged: {ADVICE}")


class Checkpoint:
    """An opened checkpoint directory (from `load`): `config` and `manifest` are read; the weights and the
    trainer state are read by `weights()` and `trainer_state()`. `checksums`: COMPLETE's listing, None
    for a checkpoint written before checksums. `key`: the config key it came from, for messages."""

    def __init__(self, path: Path, key: str, checksums: Optional[dict]):
        self.path, self.key, self.checksums = path, key, checksums
        self._hashed: set = set()
        for name in self.files:  # cheap: a missing or truncated file is found now, whatever is read later
            self._check_size(name)
        self.config = self._read("config.yaml", OmegaConf.load)
        self.manifest = self._read("manifest.json", lambda f: json.loads(f.read_text()))

    @property
    def files(self) -> List[str]:
        if self.checksums is not None:
            return sorted(self.checksums)
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and p.name != COMPLETE)

    def has(self, name: str) -> bool:
        return name in self.checksums if self.checksums is not None else Path(self.path, name).is_file()

    def _check_size(self, name: str) -> None:
        file = self.path / name
        if not self.has(name):
            raise UserError(f"{self.key}: {self.path} has no {name}; expected a checkpoint written by "
                            "mmar pretrain/finetune")
        if not file.is_file():
            raise DamagedCheckpoint(f"{self.key}: {self.path} has no {name}, which its {COMPLETE} lists",
                                    f"{self.path.name}: no {name}")
        if self.checksums is not None and file.stat().st_size != self.checksums[name]["bytes"]:
            raise DamagedCheckpoint(f"{self.key}: {file} is {file.stat().st_size} bytes, "
                                    f"{self.checksums[name]['bytes']} when written (truncated or overwritten)",
                                    f"{self.path.name}: {name} truncated")

    def verify(self, *names: str) -> None:
        """Each file exists with the size and sha256 that COMPLETE records (each is hashed once)."""
        for name in names:
            self._check_size(name)
            if self.checksums is None or name in self._hashed:
                continue
            if file_sha256(self.path / name) != self.checksums[name]["sha256"]:
                raise DamagedCheckpoint(f"{self.key}: {self.path / name} does not match its sha256 in {COMPLETE} "
                                        "(its bytes changed after it was written)", f"{self.path.name}: {name} altered")
            self._hashed.add(name)

    def sha256(self, name: str) -> str:
        return self.checksums[name]["sha256"] if self.checksums is not None else file_sha256(self.path / name)

    def weights(self, ema: bool = False) -> Dict[str, torch.Tensor]:
        """The model (or EMA) weights, checked, read with safetensors."""
        return self._read(EMA if ema else MODEL, lambda f: load_file(str(f)))

    def trainer_state(self) -> dict:
        """trainer.pt, checked; tensors and plain types only (nothing else is unpickled)."""
        try:
            return self._read(TRAINER, lambda f: torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:
            raise UserError(f"{self.key}: {self.path / TRAINER} holds objects other than tensors and plain "
                            "types, which mmar does not unpickle; it was not written by mmar") from None

    def _read(self, name: str, read):
        self.verify(name)
        try:
            return read(self.path / name)
        except (SafetensorError, OSError, EOFError, RuntimeError, ValueError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DamagedCheckpoint(f"{self.key}: {self.path / name} cannot be read ({first})",
                                    f"{self.path.name}: {name} unreadable") from None


def load(path: str | Path, key: str = "ckpt") -> Checkpoint:
    """Open checkpoint directory `path`: refuse an incomplete one, check every file's size, the small
    files' sha256 (the weights' and trainer.pt's when they are read), and read config.yaml and
    manifest.json. `key` (ckpt, init, resume) starts every message."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a directory, hence not a complete checkpoint (expected one "
                        "such as runs/pretrain/final)")
    if not is_complete(path):
        raise UserError(f"{key}: {path} is not a complete checkpoint (no {COMPLETE} file: the run was "
                        "interrupted while writing it, or this is not a checkpoint directory)")
    text = (path / COMPLETE).read_text()
    checksums = None
    if text.strip():
        try:
            checksums = json.loads(text)["files"]
        except (ValueError, KeyError, TypeError):
            raise DamagedCheckpoint(f"{key}: {path / COMPLETE} is not the checksum listing mmar writes",
                                    f"{path.name}: {COMPLETE} unreadable") from None
    else:
        warn(f"{key}: {path} was written without checksums (by an older mmar): its files are read unchecked")
    checkpoint = Checkpoint(path, key, checksums)
    checkpoint.verify(*[n for n in checkpoint.files if n not in (MODEL, EMA, TRAINER)])
    checkpoint._check_size(MODEL)  # every checkpoint has model weights (an EMA is optional)
    return checkpoint


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------
def find_resume(out: str | Path, resume: str) -> Optional[Checkpoint]:
    """The checkpoint a run resumes from, every file checked. `resume='auto'`: `out/final` if the run
    finished, else its newest step directory; a damaged one is passed over for the next (with a warning),
    and None means there is none yet. Otherwise `resume` itself, which must be intact."""
    if resume != "auto":
        checkpoint = load(resume, "resume")
        checkpoint.verify(*checkpoint.files)
        return checkpoint
    final = Path(out, "final")
    damaged: List[DamagedCheckpoint] = []
    for path in ([final] if is_complete(final) else []) + step_dirs(out)[::-1]:
        try:
            checkpoint = load(path, "resume")
            checkpoint.verify(*checkpoint.files)
        except DamagedCheckpoint as e:
            damaged.append(e)
            continue
        if damaged:
            skipped = "; ".join(e.short for e in damaged)
            warn(f"--resume auto: passed over damaged checkpoints ({skipped}); resuming from {path}, the newest "
                 "intact one")
        return checkpoint
    if damaged:
        raise UserError(f"--resume auto: no intact checkpoint in {out} ({'; '.join(e.short for e in damaged)}); "
                        "start afresh with --overwrite instead of --resume")
    return None


def prepare_out(out: Path, resume: Optional[str], overwrite: bool) -> Optional[Checkpoint]:
    """The checkpoint a run in `out` resumes from (or None), after refusing to mix two runs in one directory
    (`--overwrite`: the other run's checkpoints, config, logs and previews are deleted). Only rank 0 checks
    and cleans: the other ranks start once it has begun writing there."""
    if resume:
        found = find_resume(out, resume)
        if found is not None:
            return found
    if rank_zero_only.rank == 0 and run_in_use(out) and not resume:
        if not overwrite:
            raise UserError(f"{out} already holds a run (config.yaml or checkpoints); pass --resume auto to "
                            "continue it, --overwrite to replace it, or another --out")
        for p in out.iterdir():
            if p.name in ("config.yaml", "command.txt", "final", "logs", "samples") or STEP_RE.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def restore(checkpoint: Checkpoint, module, data) -> dict:
    """Put a resumed run back where `checkpoint` left it: weights, EMA, global step, skip counters, data
    position (`data.start_batch`) and RNG states now; the optimizer and LR scheduler states go to
    `module.optimizer_state`, which the module loads once the trainer has built them. Returns trainer.pt."""
    state = checkpoint.trainer_state()
    module.model.load_state_dict(checkpoint.weights())
    if module.ema is not None and checkpoint.has(EMA):
        module.ema.load_state_dict(checkpoint.weights(ema=True))
    module.start_step = state["step"]
    module.counts = dict(state["counts"])
    module.optimizer_state = {"optimizer": state["optimizer"], "scheduler": state["scheduler"]}
    data.start_batch = state["data"]["batches_per_rank"]
    set_rng_state(state["rng"])
    return state


# --------------------------------------------------------------------------------------------------
# The Lightning callback that writes our layout
# --------------------------------------------------------------------------------------------------
class Preempted(Exception):
    """Training stopped for a SLURM preemption after writing `path` and requeueing the job."""

    def __init__(self, step: int, path: Path, job: str):
        self.step, self.path, self.job = step, path, job
        super().__init__(f"preempted at step {step}")


class CheckpointWriter(L.Callback):
    """Writes `step-XXXXXXXX/` every `trainer.ckpt_every` steps (pruned to `keep_last`) and `final/` at the
    end. Weights and optimizer state are gathered through the strategy, so DDP and FSDP give one full
    checkpoint; rank 0 writes it and the others wait.

    In a SLURM job, SIGUSR1 (`sbatch --signal=USR1@90`) only sets a flag; at the next step boundary every
    rank agrees on it, the step directory is written, rank 0 runs `scontrol requeue` and training stops
    with `Preempted`. The requeued job continues with `--resume auto`."""

    def __init__(self, out: str | Path, cfg, config_yaml: str, shard_dir: str | Path, command: str):
        self.out = Path(out)
        self.cfg = cfg
        self.config_yaml = config_yaml
        self.shard_dir = shard_dir
        self.command = command
        self.preemption = slurm.PreemptionSignal()

    def setup(self, trainer, module, stage):
        self.preemption.install()  # before the loader's workers fork: they inherit the flag-only handler

    def teardown(self, trainer, module, stage):
        self.preemption.uninstall()

    def on_exception(self, trainer, module, exception):
        self.preemption.uninstall()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = module.step
        if step >= self.cfg.trainer.max_steps:
            return  # on_train_end writes final/
        preempted = self.preemption.job is not None and \
            trainer.strategy.reduce_boolean_decision(self.preemption.received, all=False)
        if preempted or step % self.cfg.trainer.ckpt_every == 0:
            path = self.out / step_name(step)
            self.save(trainer, module, path)
            if trainer.is_global_zero:
                prune(self.out, self.cfg.trainer.keep_last)
        if preempted:
            if trainer.is_global_zero:
                slurm.requeue(self.preemption.job, path)
            raise Preempted(step, path, self.preemption.job)

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
            save(path, model_state=model_state, ema_state=module.ema_state(), trainer_state=state,
                 config_yaml=self.config_yaml, shard_dir=self.shard_dir, command=self.command)
        trainer.strategy.barrier()
