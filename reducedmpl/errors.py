"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator


# Every message is one line of at most MESSAGE_MAX_BYTES (with "error: "), and quotes at most VALUE_MAX_CHARS of any
# run of text without spaces (a value, a path, a key): longer ones are cut in the middle, so a message never grows
# with the input that caused it.
MESSAGE_MAX_BYTES = 300
VALUE_MAX_CHARS = 200
FIX_MAX_BYTES = 110
MIN_RUN_CHARS = 32  # a long run is cut down to no less than this while the message is too long
_CUT = "…"


def clip(text: str, max_bytes: int, mark: str = _CUT) -> str:
    """``text`` cut in the middle to at most ``max_bytes`` of UTF-8, ``mark`` in the cut (start and end kept)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    room = max(0, max_bytes - len(mark.encode()))
    head, tail = room * 2 // 3, room - room * 2 // 3
    return (raw[:head].decode("utf-8", "ignore") + mark
            + (raw[len(raw) - tail:].decode("utf-8", "ignore") if tail else ""))


def shorten(text: str, max_bytes: int) -> str:
    """One line of at most ``max_bytes``: whitespace collapsed; every run without spaces (a value, a path, a key)
    cut to VALUE_MAX_CHARS; then, while the line is too long, its longest run cut (down to MIN_RUN_CHARS: a
    path keeps its start and its file name); the middle of the line cut last."""
    text = str(text)
    if len(text) > 64 * max_bytes:  # a huge value: cut before anything walks over all of it
        text = text[:32 * max_bytes] + _CUT + text[-32 * max_bytes:]
    words = [clip(w, VALUE_MAX_CHARS) for w in text.split()]
    excess = len(" ".join(words).encode()) - max_bytes
    while excess > 0:
        i = max(range(len(words)), key=lambda k: len(words[k].encode()))
        size = len(words[i].encode())
        if size <= MIN_RUN_CHARS:
            break
        words[i] = clip(words[i], max(MIN_RUN_CHARS, size - excess))
        excess -= size - len(words[i].encode())
    return clip(" ".join(words), max_bytes, " … ")


def one_line(problem: str, fix: str | None = None, prefix: str = "error: ") -> str:
    """The message of ``problem`` and ``fix`` that, after ``prefix``, fits MESSAGE_MAX_BYTES on one line."""
    room = MESSAGE_MAX_BYTES - len(prefix.encode())
    if fix is None:
        return shorten(problem, room)
    room -= len(" — ".encode())
    short = shorten(problem, room)
    fix = shorten(fix, max(FIX_MAX_BYTES, room - len(short.encode())))  # the fix may use what the problem leaves
    return f"{shorten(problem, room - len(fix.encode()))} — {fix}"


class UserError(Exception):
    """A problem with the user's input, with a message that names the problem and the fix (one short line)."""

    same_on_every_rank = False  # under torchrun: every rank meets it alike, so only rank 0 prints it

    def __init__(self, problem: str, fix: str | None = None):
        if fix is None and problem.startswith("Caught ") and "\nOriginal Traceback" in problem:
            # raised in a DataLoader worker: torch rebuilds the error from the worker's traceback text, whose last
            # line is "module.ErrorType: <our one-line message>"; keep that message alone
            problem = problem.rstrip().splitlines()[-1].partition(": ")[2] or problem
        super().__init__(one_line(problem, fix))


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


class NotWritableError(UserError):
    """Writing a file was refused: no permission, a read-only file system, an immutable file or folder."""

    def __init__(self, path: str | os.PathLike[str], reason: str,
                 fix: str = "choose another --out, or make its folder writable"):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot write {path}: {reason}", fix)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C honoured at a step boundary, after the checkpoint was written; its message says how to go on."""


# errno of "no room": ENOSPC (disk full), EFBIG (file size limit, e.g. ``ulimit -f``), EDQUOT (quota)
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e)
# errno of "not allowed": no permission, a read-only file system, an immutable (chattr +i) file or folder
NOT_WRITABLE_ERRNOS = frozenset((errno.EACCES, errno.EPERM, errno.EROFS))
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)")  # how HDF5 reports a failed write inside its own message


def os_error_behind(exc: BaseException | None, errnos: frozenset[int]) -> OSError | None:
    """The OSError with one of ``errnos`` behind ``exc`` (itself, its cause or context), else None.

    Libraries wrap it: ``torch.save`` raises a RuntimeError whose context is the OSError (or that only quotes its
    strerror); HDF5 puts ``errno = 28`` in its message."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in errnos:
            return exc
        if isinstance(exc, (OSError, RuntimeError)):
            text = str(exc)
            match = _ERRNO_IN_TEXT.search(text)
            codes = [int(match.group(1))] if match else []
            codes += [c for c in errnos if f"strerror: {os.strerror(c)}" in text]
            for code in codes:
                if code in errnos:
                    return OSError(code, os.strerror(code))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def disk_full(exc: BaseException | None) -> OSError | None:
    """The "no room" OSError behind ``exc``, else None."""
    return os_error_behind(exc, DISK_FULL_ERRNOS)


def write_refused(exc: BaseException | None) -> UserError | None:
    """The one-line error for a file operation that failed for lack of room or of permission, naming the
    OSError's file, else None (the last resort of the command line, for what no writer named itself)."""
    full = disk_full(exc)
    if full is not None:
        return DiskFullError(full.filename or "a file", full.strerror or str(full))
    denied = os_error_behind(exc, NOT_WRITABLE_ERRNOS)
    if denied is not None:
        return UserError(f"access to {denied.filename or 'a file'} was refused: {denied.strerror or denied}",
                         "check its permissions, and that its file system is writable")
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], fix: str | None = None) -> Iterator[None]:
    """Turn a "no room" error raised while writing ``path`` into a :class:`DiskFullError`, and a "not allowed"
    one into a :class:`NotWritableError`, that name ``path``."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        full = disk_full(e)
        if full is not None:
            reason = full.strerror or str(full)
            raise (DiskFullError(path, reason) if fix is None else DiskFullError(path, reason, fix)) from e
        denied = os_error_behind(e, NOT_WRITABLE_ERRNOS)
        if denied is None:
            raise
        raise NotWritableError(path, denied.strerror or str(denied)) from e
