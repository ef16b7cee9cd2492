"""Every file the tool writes is written whole or not at all.

One mechanism serves checkpoints, JSON, YAML, text and the HDF5 shards of a targets store: the bytes go to
``.NAME.tmp`` beside the final path, are fsynced, and the temporary file is renamed onto ``NAME``
(``os.replace``, atomic within a folder), after which the folder itself is fsynced so that the rename survives
a power cut. A reader therefore sees the previous file or the new one, never a torn one, and temporary files
are never read (a later run removes them).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import writing


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save's format


def file_head(path: str | os.PathLike[str], size: int = len(HDF5_SIGNATURE)) -> bytes:
    """The first ``size`` bytes of a file (empty when it cannot be read): enough to tell an HDF5 file from a
    torch checkpoint without opening either."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def temp_path(path: str | os.PathLike[str]) -> Path:
    """Where ``path`` is written before it is complete (hidden, in the same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable; file systems that cannot fsync a folder are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str], sync: bool = False) -> None:
    """Move the complete ``tmp`` onto ``final``; ``sync`` fsyncs it first (for files another library wrote)."""
    if sync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open :func:`temp_path` of ``path`` for writing; on a clean exit fsync it and :func:`publish` it.

    When writing fails (a full disk raises :class:`~reducedmpl.errors.DiskFullError` naming ``path``) the
    temporary file is removed and the file already at ``path`` (e.g. the previous checkpoint) is kept."""
    path = Path(path)
    tmp = temp_path(path)
    with writing(path):
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_file`."""
    import torch

    with atomic_file(path) as f:
        torch.save(obj, f)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """JSON of ``obj``; values JSON has no type for (paths, say) are written as their text."""
    write_text(path, json.dumps(obj, indent=indent, default=str))
