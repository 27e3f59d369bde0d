"""`mmar finetune`: continue a pretrained MMAR with mask ratios 0-1 and question/answer data.

    mmar finetune                                        # from runs/pretrain/final to runs/finetune
    mmar finetune --init runs/pretrain/step-00002000 --data data/vqa/train
    mmar finetune optim.freeze_backbone=true             # train only the heads and embedders
    mmar finetune optim.backbone_lr_mult=0.1             # or a lower LR for the backbone

The architecture comes from the `init` checkpoint (its config.yaml); of the model keys only the training
ones (mask_min, mask_std, known_noise, caption_noise, grad_checkpointing, split_tasks) are taken from this
run's config.
"""

from pathlib import Path
from typing import List, Optional

import typer

from mmar_cli.cli_common import handle_errors, single_command_app
from mmar_cli.config import FinetuneConfig
from stages.train_common import CONFIG, DATA, MAX_STEPS, OUT, OVERRIDES, OVERWRITE, RESUME, cli_run

SCHEMA = FinetuneConfig


@handle_errors
def cli(
    overrides: Optional[List[str]] = OVERRIDES,
    config: Optional[Path] = CONFIG,
    init: Optional[str] = typer.Option(None, "--init", help="checkpoint directory to start from "
                                       "(config key init; default runs/pretrain/final)"),
    data: Optional[str] = DATA,
    out: Optional[str] = OUT,
    resume: Optional[str] = RESUME,
    max_steps: Optional[int] = MAX_STEPS,
    overwrite: bool = OVERWRITE,
):
    """Finetune a pretrained MMAR checkpoint; writes OUT/step-XXXXXXXX/ checkpoints and OUT/final/."""
    cli_run(SCHEMA, "finetune", config, overrides, overwrite,
            init=init, data=data, out=out, resume=resume, max_steps=max_steps)


def main() -> None:
    single_command_app(cli, SCHEMA)()


if __name__ == "__main__":
    main()
