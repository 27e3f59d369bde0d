"""Errors a user can fix (the CLI prints them as one line on stderr and exits with code 2), and warnings."""


class UserError(Exception):
    """Bad input, bad config or a missing artifact: the message says what and where."""


def warn(message: str) -> None:
    """One line on stderr, as the CLI prints errors."""
    from mmar_cli.cli_common import console

    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
