"""Training progress for a terminal and for a log file.

A Rich bar is redrawn in place, so a batch job's log (SLURM, `make demo > log`) shows nothing of it until
the run ends. Off a terminal, `LogLines` prints instead one plain line every `trainer.log_every` steps and
at the last step, flushed:

    step 20/3000  loss 0.8123  loss_img 0.7012  loss_txt 1.1023  loss_t2i 0.7012  loss_caption 1.1023  lr 3.00e-04  512.3 samples/s  elapsed 0:00:41  eta 1:40:10

The losses are those `TrainModule` logs for the step (rank 0's batch); samples/s (all ranks) and the ETA
are measured over the steps since the previous line.
"""

from __future__ import annotations

import time
from typing import TextIO

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from mmar_cli.data.sequence import TASK_NAMES
from mmar_cli.progress import hms


class StepProgressBar(RichProgressBar):
    """Lightning's Rich bar, described by step: training is step-based (max_epochs=-1), so its
    'Epoch 0/-2' says nothing."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"


class LogLines(L.Callback):
    """Plain progress lines on `file`. `start`: the step a resumed run starts at; `max_steps`: the step it
    ends at (both global steps, as the checkpoints count them)."""

    def __init__(self, every: int, start: int, max_steps: int, file: TextIO):
        self.every, self.start, self.max_steps, self.file = every, start, max_steps, file

    def on_train_start(self, trainer, module):
        self.t0 = self.last_time = time.perf_counter()
        self.last_step, self.samples = self.start, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.samples += batch["text_ids"].shape[0] * trainer.world_size
        step = self.start + trainer.global_step
        if not trainer.is_global_zero or (step % self.every and step < self.max_steps):
            return
        now = time.perf_counter()
        seconds = now - self.last_time
        per_step = seconds / max(1, step - self.last_step)
        metrics = trainer.callback_metrics
        # Lightning keeps the last value of a metric not logged this step: name only the tasks of this batch
        tasks = [f"train/loss_{TASK_NAMES[t]}" for t in sorted(set(batch["task"].tolist()))]
        names = ["loss", "train/loss_img", "train/loss_txt", "train/loss_mean"] + tasks
        parts = [f"step {step}/{self.max_steps}"]
        parts += [f"{name.removeprefix('train/')} {float(metrics[name]):.4f}" for name in names if name in metrics]
        if "lr" in metrics:  # the LR this step used (the scheduler has already stepped the optimizer's)
            parts.append(f"lr {float(metrics['lr']):.2e}")
        parts += [f"{self.samples / seconds:.1f} samples/s", f"elapsed {hms(now - self.t0)}",
                  f"eta {hms(per_step * (self.max_steps - step))}"]
        print("  ".join(parts), file=self.file, flush=True)
        self.last_time, self.last_step, self.samples = now, step, 0
