"""Errors a user can fix (the CLI prints them as one line on stderr and exits with code 2), warnings, and
`console`: the stderr console both are printed on, as are progress bars and the stages' messages."""

from rich.console import Console

console = Console(stderr=True)


class UserError(Exception):
    """Bad input, bad config or a missing artifact: the message says what and where."""


def warn(message: str) -> None:
    """One line on stderr, as the CLI prints errors."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
