"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class UserError(Exception):
    """Bad input, bad config or a missing artifact: the message says what and where."""
