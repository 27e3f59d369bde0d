"""Pieces shared by every stage command: the help of --config and key=value overrides, the --help epilog
of config keys, the command line, one-line errors, the single-command app."""

from __future__ import annotations

import functools
import shlex
import sys
from typing import Callable

import typer

from mmar_cli.config import describe_fields
from mmar_cli.errors import UserError, console

CONFIG_HELP = "YAML preset to start from (see configs/); key=value arguments override it."
OVERRIDES_HELP = "config overrides as key=value, e.g. trainer.max_steps=100 model.depth=8 (keys listed below)"


def epilog(schema: type) -> str:
    """Every config key with its default and help, for the bottom of `--help`."""
    lines = ["[bold]Config keys[/bold] (override as key=value):\n"]
    for key, default, help_text in describe_fields(schema):
        lines.append(f"  [cyan]{key}[/cyan] = {default}: {help_text}\n")
    return "\n".join(lines)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in sys.argv)


def handle_errors(fn: Callable) -> Callable:
    """User errors: one line on stderr, exit 2, no traceback. Ctrl-C: exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def single_command_app(fn: Callable, schema: type) -> typer.Typer:
    """A Typer app holding one stage command: the stage's own executable (`mmar-tokenize`, ...)."""
    app = typer.Typer(add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)
    app.command(epilog=epilog(schema))(fn)
    return app
