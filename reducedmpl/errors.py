"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, with a message that names the problem and the fix."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem} — {fix}"
        super().__init__(" ".join(message.split()))  # always one line


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(UserError):
    """Missing, malformed or unreadable data."""


class ArtifactError(UserError):
    """A checkpoint or targets store that is missing, incomplete, corrupt or made for other data."""
