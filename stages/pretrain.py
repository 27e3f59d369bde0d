"""`mmar pretrain`: pretraining of MMAR on token shards, every task and every mask ratio.

    mmar pretrain                                          # the demo's model on data/shapes/train, on a CPU
    mmar pretrain --config configs/pretrain/small.yaml --max-steps 5000
    mmar pretrain --resume auto                            # continue runs/pretrain after a crash
    mmar pretrain trainer.strategy=ddp trainer.devices=8   # several GPUs (one process each)

On SLURM, `configs/slurm/pretrain.sbatch` runs one srun task per GPU; Lightning reads the job's layout.
"""

from pathlib import Path
from typing import List, Optional

from mmar_cli.cli_common import handle_errors, single_command_app
from mmar_cli.config import TrainConfig
from stages.train_common import CONFIG, DATA, MAX_STEPS, OUT, OVERRIDES, OVERWRITE, RESUME, cli_run

SCHEMA = TrainConfig


@handle_errors
def cli(
    overrides: Optional[List[str]] = OVERRIDES,
    config: Optional[Path] = CONFIG,
    data: Optional[str] = DATA,
    out: Optional[str] = OUT,
    resume: Optional[str] = RESUME,
    max_steps: Optional[int] = MAX_STEPS,
    overwrite: bool = OVERWRITE,
):
    """Pretrain an MMAR model on token shards; writes OUT/step-XXXXXXXX/ checkpoints and OUT/final/."""
    cli_run(SCHEMA, "pretrain", config, overrides, overwrite,
            data=data, out=out, resume=resume, max_steps=max_steps)


def main() -> None:
    single_command_app(cli, SCHEMA)()


if __name__ == "__main__":
    main()
