"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input, with a message that names the problem and the fix."""

    same_on_every_rank = False  # under torchrun: every rank meets it alike, so only rank 0 prints it

    def __init__(self, problem: str, fix: str | None = None):
        if fix is None and problem.startswith("Caught ") and "\nOriginal Traceback" in problem:
            # raised in a DataLoader worker: torch rebuilds the error from the worker's traceback text, whose last
            # line is "module.ErrorType: <our one-line message>"; keep that message alone
            problem = problem.rstrip().splitlines()[-1].partition(": ")[2] or problem
        message = problem if fix is None else f"{problem} — {fix}"
        super().__init__(" ".join(message.split()))  # always one line


class ConfigError(UserError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(UserError):
    """Missing, malformed or unreadable data."""


class ArtifactError(UserError):
    """A checkpoint or targets store that is missing, incomplete, corrupt or made for other data."""


class DiskFullError(UserError):
    """Writing a file failed for lack of room: the disk or a quota is full, or a file size limit was reached.

    ``fix`` says how to go on; the stages that can resume say so (the file being replaced is left as it was)."""

    def __init__(self, path: str | os.PathLike[str], reason: str,
                 fix: str = "free some space, then continue with --resume (the last checkpoint is kept)"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"could not write {path}: {reason} (the disk is full or a file size limit was reached)", fix)

    def with_fix(self, fix: str) -> DiskFullError:
        """The same error with another way to go on (e.g. ``reducedmpl run``, which resumes by itself)."""
        return DiskFullError(self.path, self.reason, fix)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C honoured at a step boundary, after the checkpoint was written; its message says how to go on."""


# errno of "no room": ENOSPC (disk full), EFBIG (file size limit, e.g. ``ulimit -f``), EDQUOT (quota)
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e)
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")  # how HDF5 reports a failed write inside its own message


def disk_full(exc: BaseException | None) -> OSError | None:
    """The "no room" OSError behind ``exc`` (itself, its cause or context), else None.

    Libraries wrap it: ``torch.save`` raises a RuntimeError whose context is the OSError; HDF5 puts
    ``errno = 28`` in its message."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        match = _ERRNO_IN_TEXT.search(str(exc)) if isinstance(exc, (OSError, RuntimeError)) else None
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], fix: str | None = None) -> Iterator[None]:
    """Turn a "no room" error raised while writing ``path`` into a :class:`DiskFullError` that names it."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        reason = full.strerror or str(full)
        raise (DiskFullError(path, reason) if fix is None else DiskFullError(path, reason, fix)) from e
