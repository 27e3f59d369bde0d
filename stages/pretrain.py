"""`mmar pretrain` (placeholder until the stage lands)."""

from pathlib import Path
from typing import List, Optional

import typer

from mmar_cli.cli_common import CONFIG_HELP, OVERRIDES_HELP, build_config, handle_errors, single_command_app
from mmar_cli.config import TrainConfig
from mmar_cli.errors import UserError

SCHEMA = TrainConfig


@handle_errors
def cli(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
):
    """Not implemented yet."""
    build_config(SCHEMA, config, overrides)
    raise UserError("mmar pretrain is not implemented yet")


def main() -> None:
    single_command_app(cli, SCHEMA)()
