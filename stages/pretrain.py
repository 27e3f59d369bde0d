"""`mmar pretrain`: image-expert pretraining of MMAR on token shards (mask ratio 0.7-1).

    mmar pretrain                                          # tiny preset on data/shapes/train, CPU-friendly
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
# Short enough that `mmar tokenize && mmar pretrain && mmar finetune` finishes on a laptop CPU.
DEFAULTS = {"out": "runs/pretrain", "model": {"mask_min": 0.7},
            "trainer": {"max_steps": 200, "batch_size": 32, "ckpt_every": 100, "sample_every": 100}}


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
    cli_run(SCHEMA, "pretrain", DEFAULTS, config, overrides, overwrite,
            data=data, out=out, resume=resume, max_steps=max_steps)


def main() -> None:
    single_command_app(cli, SCHEMA)()


if __name__ == "__main__":
    main()
