"""A store's folder: its files, leftovers of an interrupted or other run, and what a finished run left."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from ..errors import ArtifactError, UserError
from ..files import check_writable, temp_path
from .meta import StoreMeta
from .reader import TargetStore
from .writer import shard_is_complete


# ----------------------------------------------------------------------------- the store's folder


def store_files(out: Path) -> list[Path]:
    """The master, every shard named after it (whatever the shard count) and their temporary files."""
    pattern = f"{out.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{out.suffix}"
    files = [out, *sorted(out.parent.glob(pattern))]
    temps = [temp_path(out), *sorted(out.parent.glob(temp_path(out.with_name(pattern)).name))]
    return [p for p in files + temps if p.exists()]


def read_run_key(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            key = f.attrs["run_key"]
            return key.decode() if isinstance(key, bytes) else str(key)
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        return None


def _differences(path: Path, meta: StoreMeta) -> str:
    """What differs between the store at ``path`` and this job, for the error message."""
    try:
        with h5py.File(path, "r") as f:
            old = StoreMeta.from_attrs(f.attrs)
    except Exception:  # noqa: BLE001
        return "it cannot be read"
    diff = [k for k, v in meta.to_attrs().items() if k not in ("run_key", "tool_version", "config")
            and old.to_attrs().get(k) != v]
    for section, now in meta.config.items():
        before = old.config.get(section)
        if isinstance(now, dict) and isinstance(before, dict):
            diff += [f"{section}.{k}" for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)]
        elif now != before:
            diff.append(section)
    return "it differs in " + ", ".join(diff[:6]) if diff else "its row count or shard count differs"


def prepare_store(out: Path, meta: StoreMeta, shards: list[Path], overwrite: bool,
                  note: Callable[[str], Any] = print) -> bool:
    """Make ``out`` ready for writing the store ``meta`` in ``shards``; True when it already holds this exact store
    (nothing to do). Leftovers of an interrupted or other run are removed (``note`` says so); finished shards of
    this run are kept; another run's store is refused unless ``overwrite``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of {out} ({e.strerror or e})", "choose a writable --out") from None
    if out.exists() and out.is_dir():
        raise UserError(f"{out} is a folder", "choose another --out")
    if overwrite:
        for path in store_files(out):  # the master first: a half-removed store is never taken for complete
            path.unlink(missing_ok=True)
        return False
    if out.exists():
        if read_run_key(out) != meta.run_key:
            raise ArtifactError(f"{out} already holds a targets store from another precompute run "
                                f"({_differences(out, meta)})",
                                "pass --overwrite to replace it, or choose another --out")
        try:
            TargetStore.open(out, memory_budget_bytes=0).close()
            return True
        except ArtifactError as e:  # this job's master, but a shard is gone or broken: redo what is missing
            note(f"{out} is this job's store but is not sound ({e}); recomputing what is missing")
            out.unlink()
    stale = [p for p in store_files(out) if p.name.endswith(".tmp")]
    stale += [p for p in store_files(out) if p.suffix == out.suffix and p not in shards and p != out]
    stale += [p for p in shards if p.exists() and not shard_is_complete(p, meta)]
    if stale:
        note(f"removing {len(stale)} leftover file(s) of an interrupted or other precompute run")
    for path in stale:
        path.unlink(missing_ok=True)
    return False


def stored_predictions(path: Path, meta: StoreMeta) -> np.ndarray:
    """The top-1 class of every row of a finished shard (for the summary of the shards a resumed run skips)."""
    with h5py.File(path, "r") as f:
        if not f["id"].shape[0]:
            return np.zeros(0, np.int64)
        return f["topk_index"][:, 0].astype(np.int64) if meta.topk else f["logits"][...].argmax(axis=1)


class StoreLock:
    """An exclusive lock on writing the store at ``master``, held from when it is taken until :meth:`release` (or
    until the object is dropped: the lock goes with its open file, also when the process dies).

    The lock is ``fcntl.flock`` on the store's folder itself, so nothing is added to the folder (no lock file to
    leave behind or to race on when it is removed); two stores written into one folder at once also exclude each
    other. A second writer is refused at once.
    """

    def __init__(self, master: str | os.PathLike[str]):
        master = Path(master)
        self.path = master.parent
        self._fd: int | None = None  # set first: release() (and __del__) must work whatever failed below
        try:
            master.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise UserError(f"cannot create the folder of {master} ({e.strerror or e})",
                            "choose a writable --out") from None
        try:
            self._lock(master)
            check_writable(master)  # under the lock: its probe file is the master's temporary name
        except UserError:
            self.release()
            raise

    def _lock(self, master: Path) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this system: one writer at a time is up to the user
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another precompute is writing {master} right now (it holds a lock on {self.path})",
                            "wait for it to finish, or choose another --out") from None

    def release(self) -> None:
        """Drop the lock; never raises (it runs on cleanup paths, also from ``__del__``)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)  # closing the file drops the lock
            except OSError:
                pass

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
