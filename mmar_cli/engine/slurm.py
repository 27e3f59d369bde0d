"""SLURM preemption: SIGUSR1 (`sbatch --signal=USR1@90`) asks a training run for a checkpoint and a requeue.

Lightning's own SLURM handler writes a pickled Lightning checkpoint from inside the signal handler, in the
middle of a step. Ours only sets a flag; `CheckpointWriter` writes an ordinary step directory at the next
step boundary, then calls `scontrol requeue`, and the requeued job continues with `--resume auto`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Optional

from mmar_cli.errors import UserError

REQUEUE_SIGNAL = signal.SIGUSR1


def job_id() -> Optional[str]:
    """The id `scontrol requeue` takes (an array task's own id), or None outside a SLURM job."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def cluster_plugins() -> list:
    """For the Trainer: Lightning reads the job layout from SLURM as usual, but leaves SIGUSR1 to us."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class PreemptionSignal:
    """In a SLURM job, `install()` makes REQUEUE_SIGNAL set `received` instead of ending the process."""

    def __init__(self):
        self.job = job_id()
        self.received = False
        self._previous = None

    def install(self) -> None:
        if self.job is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(REQUEUE_SIGNAL, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(REQUEUE_SIGNAL, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.received = True


def requeue(job: str, checkpoint: Path) -> None:
    """`scontrol requeue JOB`; a failure is a one-line error that says how to continue by hand."""
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        said = result.stderr.strip().splitlines()
        problem = f"exit {result.returncode}{': ' + said[0] if said else ''}" if result.returncode else None
    except OSError as e:
        problem = str(e)
    if problem:
        raise UserError(f"preempted: {checkpoint} is written, but `scontrol requeue {job}` failed ({problem}); "
                        "submit the job again, it continues with --resume auto")
