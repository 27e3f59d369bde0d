"""The `mmar` command: a thin Typer app over the stage modules in `stages/`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from mmar_cli.cli_common import epilog, handle_errors
from mmar_cli.config import STAGES, describe_fields, load_config, to_yaml
from mmar_cli.errors import UserError
from stages import evaluate, finetune, pretrain, sample, tokenize

app = typer.Typer(
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help="Train and run MMAR models: tokenize -> pretrain -> finetune -> sample / evaluate.",
    no_args_is_help=True,
)
for _name, _module in [("tokenize", tokenize), ("pretrain", pretrain), ("finetune", finetune),
                       ("sample", sample), ("evaluate", evaluate)]:
    app.command(_name, epilog=epilog(_module.SCHEMA))(_module.cli)

config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
@handle_errors
def config_show(
    stage: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}"),
    config: str = typer.Option(None, "--config", "-c", help="YAML preset to resolve"),
    overrides: list[str] = typer.Argument(None, help="key=value overrides"),
    keys: bool = typer.Option(False, "--keys", help="list every key with its help instead"),
):
    """Print the resolved config of STAGE (and, for training stages, the parameter count of every
    model preset)."""
    if stage not in STAGES:
        raise UserError(f"unknown stage '{stage}'; choose one of {', '.join(STAGES)}")
    schema = STAGES[stage]
    out = Console()
    if keys:
        table = Table("key", "default", "help")
        for row in describe_fields(schema):
            table.add_row(*row)
        out.print(table)
        return
    cfg = load_config(schema, config, overrides)
    out.print(to_yaml(cfg), highlight=False, markup=False)
    if stage in ("pretrain", "finetune"):
        from mmar_cli.model.presets import preset_param_table

        out.print(preset_param_table(cfg.model))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
