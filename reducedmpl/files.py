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

from .errors import NotWritableError, UserError, writing


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


def file_kind(path: str | os.PathLike[str]) -> str:
    """What a file is by its first bytes, whatever its name says: ``hdf5`` (a targets store or shard), ``torch``
    (``torch.save``'s zip), ``safetensors``, ``pickle`` (a raw pickle stream), else ``unknown``."""
    head = file_head(path, 16)
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(ZIP_SIGNATURE):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        size = int.from_bytes(head[:8], "little")
        try:
            if 0 < size < os.path.getsize(path):
                return "safetensors"
        except OSError:
            pass
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def is_pickle_stream(path: str | os.PathLike[str], limit: int = 1 << 30) -> bool:
    """Whether the file is one whole pickle stream (read opcode by opcode; nothing is built or run): a raw
    ``pickle.dump``, as opposed to random or damaged bytes."""
    import pickletools

    head = file_head(path, 2)
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    try:
        if os.path.getsize(path) > limit:
            return True  # too big to scan; its header says pickle
        with open(path, "rb") as f:
            for op, _, _ in pickletools.genops(f):
                last = op.name
        return last == "STOP"
    except Exception:  # noqa: BLE001 - any opcode error: not a pickle
        return False


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (through links and ``..`` too); False where either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(inputs: dict[str, str | os.PathLike[str] | None], outputs: list[str | os.PathLike[str]],
                     fix: str = "choose another --out") -> None:
    """Refuse a command whose ``outputs`` include one of its ``inputs`` (``{flag: path}``): it would replace
    the file it reads."""
    for flag, given in inputs.items():
        if given is None:
            continue
        for out in outputs:
            if same_file(given, out):
                raise UserError(f"{flag} {given} would be overwritten by this command's output {out}", fix)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse at once, naming ``path``, when the folder it goes into cannot be written (permissions, a read-only
    file system, an immutable folder): an empty file is created and removed under :func:`temp_path` (the name a
    killed run's leftovers have, which the next run removes; a writer that may run beside another of the same
    ``path`` calls this only once it holds its lock)."""
    path = Path(path)
    probe = temp_path(path)
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise NotWritableError(path, e.strerror or str(e)) from None


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
