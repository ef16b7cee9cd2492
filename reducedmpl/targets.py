"""Teacher-target store: the teacher's logits, written once by ``precompute``, read by ``distill``.

Layout
------
A store is a master file ``targets.h5`` plus shard files beside it
(``targets-00000-of-00004.h5`` ...). Every shard holds a contiguous range of rows; the master
joins them with HDF5 virtual datasets whose source file names are *relative* (bare file names in
the master's folder), so h5py/h5dump see one table and the folder can be moved as a whole.

Per row (schema version 1): ``logits`` (N, C) in dense mode, or ``topk_logits`` (N, K),
``topk_index`` (N, K) and ``logsumexp`` (N,) in top-k mode; plus ``id``, ``label`` (-1 = none)
and ``split`` (uint8 code into ``SPLIT_NAMES``). Logits are stored raw (not divided by the
temperature, not converted to probabilities: float16 probabilities underflow); the temperature is
metadata that the reader applies. ``logsumexp`` is over all C raw logits, so top-k probabilities
are exact at temperature 1 and the remainder mass ``1 - sum(p_topk)`` is known. The reader spreads
that mass evenly over the other C-K classes; at a temperature other than 1 the top-k classes keep
their exact relative odds but the remainder is approximated (as C-K equal logits).

Storage choices
---------------
* Logits are chunked (chunks of roughly 256 KiB, within 64 KiB-1 MiB unless the whole shard is
  smaller) and **not compressed**: training reads rows in random order, and a compressed chunk must be decompressed
  whole to get one row of it (measured: ~130 rows/s compressed vs 4.7k-12k rows/s uncompressed);
  float logits also compress poorly.
* ``id``/``label``/``split`` are small, read whole once at open, and compress well, so they use
  gzip+shuffle (gzip rather than lzf because every HDF5 tool, h5dump included, can decode it).
* Files are written under a temporary name (``.NAME.tmp``), fsynced and renamed, and carry
  ``complete=True`` only once fully written, so an interrupted run never leaves a file that
  looks finished.

Reading
-------
Reading rows one at a time in random order is slow, so :class:`TargetStore` never does it. If the
table fits ``memory_budget_bytes`` it is loaded once and batches are gathered by fancy indexing
(``in_memory=True``; top-k makes ImageNet-scale tables ~50 MB). Otherwise (out-of-core) the rows a
batch needs are sorted and de-duplicated, rows separated by a small gap are merged into contiguous
blocks, each block is fetched with one slice read, and the result is un-sorted to the caller's
order (for random ids over a large table most blocks are single rows, but they are read in file
order and never twice). The file is opened with HDF5's chunk cache disabled (``rdcc_nbytes=0``, which also applies
to the shards behind the virtual datasets): uncompressed chunks are then read only where selected
instead of whole into the cache. Measured on a 2-core machine with a page-cached 200k x 1000
float16 table, reading random 256-row batches ran at ~90k-130k rows/s this way, versus ~15k-20k
rows/s with the default cache and ~7k rows/s with one union-of-hyperslabs read per batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from reducedmpl.errors import ArtifactError, UserError, writing

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")
LOGIT_DTYPES = ("float16", "float32")
MASTER_NAME = "targets.h5"

ROW_FIELDS = ("id", "label", "split")
DENSE_FIELDS = ("logits",)
TOPK_FIELDS = ("topk_logits", "topk_index", "logsumexp")

_LIBVER = ("v110", "latest")  # VDS and large (dense-stored) attributes need the 1.10 format
_CHUNK_TARGET = 256 * 1024
_CHUNK_MAX = 1024 * 1024
_COLUMN_CHUNK_ROWS = 65536
_MERGE_GAP_BYTES = 32 * 1024  # rows closer than this are read as one block
_MIN_REMAINDER = 1e-12  # floor on top-k remainder mass (absorbs float16 rounding)
_REGENERATE = "rerun `reducedmpl precompute` to rebuild the targets store"


# ----------------------------------------------------------------------------- metadata


@dataclass
class StoreMeta:
    """Everything a store's root attributes record, except per-shard ones and ``complete``."""

    teacher_arch: str
    teacher_sha256: str
    class_names: list[str]
    data_spec: str
    split_seed: int
    fingerprints: dict[str, str]
    temperature: float = 1.0
    dtype: str = "float16"
    topk: int = 0
    tool_version: str = ""
    config: dict = field(default_factory=dict)
    run_key: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    def validate(self) -> None:
        """Raise ValueError if the fields are inconsistent."""
        if self.num_classes < 1:
            raise ValueError("class_names is empty")
        if self.dtype not in LOGIT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {LOGIT_DTYPES}")
        if not 0 <= self.topk < self.num_classes:
            raise ValueError(f"topk={self.topk} must be 0 (dense) or in 1..{self.num_classes - 1}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature {self.temperature} must be a positive number")

    def to_attrs(self) -> dict[str, Any]:
        """Root attributes (schema version and split code table included)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "teacher_arch": self.teacher_arch,
            "teacher_sha256": self.teacher_sha256,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "data_spec": self.data_spec,
            "split_seed": int(self.split_seed),
            "fingerprints": json.dumps(self.fingerprints, sort_keys=True),
            "temperature": float(self.temperature),
            "dtype": self.dtype,
            "topk": int(self.topk),
            "tool_version": self.tool_version,
            "config": json.dumps(self.config, sort_keys=True, default=str),
            "run_key": self.run_key,
            "split_names": list(SPLIT_NAMES),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreMeta:
        """Parse root attributes; raises KeyError/ValueError when they are malformed."""
        class_names = [_as_str(x) for x in np.atleast_1d(np.asarray(attrs["class_names"], dtype=object))]
        fingerprints = json.loads(_as_str(attrs["fingerprints"]))
        config = json.loads(_as_str(attrs["config"]))
        if not isinstance(fingerprints, dict) or not isinstance(config, dict):
            raise ValueError("fingerprints and config must be JSON objects")
        meta = cls(
            teacher_arch=_as_str(attrs["teacher_arch"]),
            teacher_sha256=_as_str(attrs["teacher_sha256"]),
            class_names=class_names,
            data_spec=_as_str(attrs["data_spec"]),
            split_seed=int(attrs["split_seed"]),
            fingerprints={str(k): str(v) for k, v in fingerprints.items()},
            temperature=float(attrs["temperature"]),
            dtype=_as_str(attrs["dtype"]),
            topk=int(attrs["topk"]),
            tool_version=_as_str(attrs["tool_version"]),
            config=config,
            run_key=_as_str(attrs["run_key"]),
        )
        if int(attrs["num_classes"]) != meta.num_classes:
            raise ValueError(f"num_classes={int(attrs['num_classes'])} but {meta.num_classes} class names")
        meta.validate()
        return meta


def derive_run_key(meta: StoreMeta, num_rows: int, num_shards: int) -> str:
    """A deterministic run key from everything that defines a precompute job (not tool_version)."""
    payload = {k: v for k, v in meta.to_attrs().items() if k not in ("run_key", "tool_version")}
    payload.update(num_rows=int(num_rows), num_shards=int(num_shards))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str], block_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(block_size):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- helpers


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = np.array(list(value), dtype=h5py.string_dtype())
        obj.attrs[key] = value


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _fsync_dir(folder: Path) -> None:
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


class StoreLock:
    """An exclusive lock on writing the store at ``master``, held from when it is taken until :meth:`release` (or
    until the object is dropped: the lock goes with its open file, also when the process dies).

    The lock is ``fcntl.flock`` on the empty file ``.NAME.lock`` beside the master; the file stays (removing it
    while another process waits on it would let two writers in). A second writer is refused at once.
    """

    def __init__(self, master: str | os.PathLike[str]):
        master = Path(master)
        self.path = master.with_name(f".{master.name}.lock")
        try:
            master.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the folder of {master} ({e.strerror or e})",
                            "choose a writable --out") from None
        try:
            import fcntl
        except ImportError:  # no flock on this system: one writer at a time is up to the user
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            raise UserError(f"another precompute is writing {master} right now (it holds {self.path})",
                            "wait for it to finish, or choose another --out") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "StoreLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def class_names_problem(store_names: Sequence[str], data_names: Sequence[str], what: str) -> str | None:
    """None when a store's class names are the data's, in the same order; else what differs (short)."""
    store_names, data_names = [str(n) for n in store_names], [str(n) for n in data_names]
    if store_names == data_names:
        return None
    if sorted(store_names) == sorted(data_names):
        diff = "the same names in another order"
    else:
        only = [n for n in store_names if n not in set(data_names)][:3]
        diff = f"{len(store_names)} vs {len(data_names)} classes" + (f"; {', '.join(map(repr, only))} not in the data"
                                                                      if only else "")
    return f"{what} has other class names than the data ({diff})"


def check_class_names(store_names: Sequence[str], data_names: Sequence[str], path: str | os.PathLike[str]) -> None:
    """Refuse a targets store whose class names (or their order) are not the data's: its logit k would be
    taken for the data's class k."""
    problem = class_names_problem(store_names, data_names, f"targets store {path}")
    if problem:
        raise ArtifactError(problem, "precompute targets with a teacher trained on this data's classes")


_RESUME_FIX = "free some space, then run the same precompute command again (finished shards are kept)"


class _NewFile:
    """The temporary file a new HDF5 file is written to, as the file object of h5py's ``fileobj`` driver.

    A failed write (full disk, quota, file size limit) is kept in ``error`` instead of reaching HDF5: after a
    failed write HDF5 2.0 (h5py 3.16) could not close the file, printed errors while freeing its objects and
    crashed the interpreter at exit (measured). After a failure, writes are skipped and reads give zeros, so HDF5
    carries on; :meth:`check` raises the error (a :class:`DiskFullError` naming the final file) and the writer
    discards the file. A Ctrl-C that lands in here while HDF5 waits is kept and raised the same way. Reads past
    the end give zeros, as HDF5's own POSIX driver does.
    """

    def __init__(self, tmp: Path, final: Path):
        self.tmp, self.final = tmp, final
        self.error: BaseException | None = None
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pos = self._size = 0

    def open_h5(self) -> h5py.File:
        return h5py.File(self, "w", libver=_LIBVER)

    # -- the file object HDF5 sees: nothing raised here may reach HDF5 ----------------------------
    def _failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == os.SEEK_SET else self._pos + pos if whence == os.SEEK_CUR else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int) -> bytes:
        start, self._pos = self._pos, self._pos + size
        data = b""
        try:
            if self.error is None:
                data = os.pread(self._fd, size, start)
        except BaseException as e:  # noqa: BLE001 - kept for check()
            self._failed(e)
        return data + bytes(size - len(data))

    def write(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        start, self._pos = self._pos, self._pos + len(view)
        self._size = max(self._size, self._pos)
        try:
            done = 0
            while self.error is None and done < len(view):  # a write stopped short at a limit: the next one fails
                done += os.pwrite(self._fd, view[done:], start + done)
        except BaseException as e:  # noqa: BLE001 - kept for check()
            self._failed(e)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        self._size = size = self._pos if size is None else size
        try:
            if self.error is None:
                os.ftruncate(self._fd, size)
        except BaseException as e:  # noqa: BLE001 - kept for check()
            self._failed(e)
        return size

    def flush(self) -> None:
        pass

    # -- the writer's side ---------------------------------------------------------------------
    def check(self) -> None:
        """Raise the first failed write (as :class:`DiskFullError` when the disk is full)."""
        if isinstance(self.error, Exception):
            with writing(self.final, _RESUME_FIX):
                raise self.error
        if self.error is not None:  # Ctrl-C
            raise self.error

    def commit(self) -> None:
        """After HDF5 closed the file: fsync, check every write succeeded, and move it to ``final``."""
        if self.error is None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                self.error = e
        self.check()
        self.close()
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | None:
    """Chunk shape of ~256 KiB (64 KiB-1 MiB where the table allows) for a row-major table."""
    if shape[0] == 0:
        return None
    if len(shape) == 1:
        return (min(shape[0], _COLUMN_CHUNK_ROWS),)
    row_bytes = int(np.prod(shape[1:])) * itemsize
    if row_bytes > _CHUNK_MAX:  # huge rows: split columns instead
        return (1, max(1, _CHUNK_TARGET // itemsize))
    rows = max(1, _CHUNK_TARGET // row_bytes)
    return (min(shape[0], rows),) + tuple(shape[1:])


def _field_specs(meta: StoreMeta, num_rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every dataset in a file of ``num_rows`` rows."""
    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "id": ((num_rows,), np.dtype(np.int64)),
        "label": ((num_rows,), np.dtype(np.int64)),
        "split": ((num_rows,), np.dtype(np.uint8)),
    }
    dtype = np.dtype(meta.dtype)
    if meta.topk:
        index_dtype = np.dtype(np.int16 if meta.num_classes < 32768 else np.int32)
        specs["topk_logits"] = ((num_rows, meta.topk), dtype)
        specs["topk_index"] = ((num_rows, meta.topk), index_dtype)
        specs["logsumexp"] = ((num_rows,), np.dtype(np.float32))
    else:
        specs["logits"] = ((num_rows, meta.num_classes), dtype)
    return specs


def _table_fields(meta: StoreMeta) -> tuple[str, ...]:
    return TOPK_FIELDS if meta.topk else DENSE_FIELDS


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp of a float32 (n, C) array (max-shifted, so it cannot overflow)."""
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def shard_paths(out: Path, num_shards: int) -> list[Path]:
    """Shard file names beside the master ``out``: ``targets-00000-of-00004.h5``, ..."""
    out = Path(out)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return [out.with_name(f"{out.stem}-{i:05d}-of-{num_shards:05d}{out.suffix}") for i in range(num_shards)]


def plan_shards(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``num_rows`` rows into ``num_shards`` contiguous near-equal ``(start, stop)`` ranges."""
    if num_rows < 1 or num_shards < 1:
        raise ValueError(f"need num_rows >= 1 and num_shards >= 1, got {num_rows}, {num_shards}")
    bounds = [num_rows * i // num_shards for i in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one shard atomically: temp file, fsync, rename on success; deleted on failure.

    Use as a context manager; ``append`` batches of float32 logits, and ``close`` (called on a
    clean exit) checks that exactly ``num_rows`` rows were written and marks the shard complete.
    """

    def __init__(self, path: Path, meta: StoreMeta, num_rows: int, shard_index: int, num_shards: int,
                 row_start: int):
        meta.validate()
        if num_rows < 0 or row_start < 0 or not 0 <= shard_index < num_shards:
            raise ValueError(f"bad shard geometry: rows={num_rows} start={row_start} "
                             f"index={shard_index} of {num_shards}")
        self.path = Path(path)
        self.tmp_path = _temp_path(self.path)
        self.meta = meta
        self.num_rows = int(num_rows)
        self.rows_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = _NewFile(self.tmp_path, self.path)
        self._file: h5py.File | None = None
        try:
            self._file = self._out.open_h5()
            self._datasets: dict[str, h5py.Dataset] = {}
            for name, (shape, dtype) in _field_specs(meta, self.num_rows).items():
                chunks = _chunks(shape, dtype.itemsize)
                compress = name in ROW_FIELDS and chunks is not None
                self._datasets[name] = self._file.create_dataset(
                    name, shape=shape, dtype=dtype, chunks=chunks,
                    compression="gzip" if compress else None, compression_opts=4 if compress else None,
                    shuffle=compress)
            _set_attrs(self._datasets["split"], {"split_names": list(SPLIT_NAMES)})
            _set_attrs(self._file, meta.to_attrs())
            _set_attrs(self._file, {"shard_index": shard_index, "num_shards": num_shards,
                                    "row_start": row_start, "row_stop": row_start + self.num_rows,
                                    "complete": False})
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, ids: np.ndarray, labels: np.ndarray, splits: np.ndarray, logits: np.ndarray) -> None:
        """Write the next batch of rows; logits are raw float32 (n, C), converted here."""
        if self._file is None:
            raise RuntimeError(f"shard writer for {self.path} is closed")
        logits = np.asarray(logits, dtype=np.float32)
        n = logits.shape[0]
        if logits.ndim != 2 or logits.shape[1] != self.meta.num_classes:
            raise ValueError(f"logits must have shape (n, {self.meta.num_classes}), got {logits.shape}")
        cols = {"id": np.asarray(ids), "label": np.asarray(labels), "split": np.asarray(splits)}
        for name, col in cols.items():
            if col.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {col.shape}")
        if cols["split"].size and (cols["split"].min() < 0 or cols["split"].max() >= len(SPLIT_NAMES)):
            raise ValueError(f"split codes must be in 0..{len(SPLIT_NAMES) - 1}")
        if self.rows_written + n > self.num_rows:
            raise ValueError(f"{self.path}: {self.rows_written + n} rows appended, shard holds {self.num_rows}")
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            bad = cols["id"][~finite][:5].tolist()
            raise ArtifactError(f"teacher produced NaN/Inf logits for {int((~finite).sum())} rows of {self.path} "
                                f"(ids {bad})",
                                "check the teacher checkpoint and input data, then rerun precompute")
        start, stop = self.rows_written, self.rows_written + n
        if self.meta.topk:
            self._write_topk(start, stop, logits)
        else:
            with np.errstate(over="ignore"):
                stored = logits.astype(self.meta.dtype)
            if not np.isfinite(stored).all():
                raise ArtifactError(f"teacher logits for {self.path} overflow {self.meta.dtype}",
                                    "rerun precompute with dtype float32")
            self._datasets["logits"][start:stop] = stored
        for name, col in cols.items():
            self._datasets[name][start:stop] = col.astype(self._datasets[name].dtype)
        self._out.check()  # a write that failed (full disk) ends the shard here
        self.rows_written = stop

    def _write_topk(self, start: int, stop: int, logits: np.ndarray) -> None:
        k = self.meta.topk
        index = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(logits, index, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")  # largest first
        index = np.take_along_axis(index, order, axis=1)
        with np.errstate(over="ignore"):
            values = np.take_along_axis(values, order, axis=1).astype(self.meta.dtype)
        if not np.isfinite(values).all():
            raise ArtifactError(f"teacher logits for {self.path} overflow {self.meta.dtype}",
                                "rerun precompute with dtype float32")
        self._datasets["topk_logits"][start:stop] = values
        self._datasets["topk_index"][start:stop] = index.astype(self._datasets["topk_index"].dtype)
        self._datasets["logsumexp"][start:stop] = _logsumexp(logits).astype(np.float32)

    def close(self) -> None:
        """Check the row count, mark complete, fsync and rename into place."""
        if self._file is None:
            return
        if self.rows_written != self.num_rows:
            written = self.rows_written
            self.abort()
            raise ValueError(f"{self.path}: {written} of {self.num_rows} rows written; shard discarded")
        try:
            self._file.attrs["complete"] = True
            self._file.close()
            self._file = None
            self._out.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temp file (the final file is never touched)."""
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None
        self._out.discard()


def _read_shard_attrs(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def shard_is_complete(path: Path, meta: StoreMeta) -> bool:
    """True if ``path`` is a finished shard of this exact job (same schema and run_key)."""
    try:
        attrs = _read_shard_attrs(Path(path))
        return (int(attrs["schema_version"]) == SCHEMA_VERSION and bool(attrs["complete"])
                and _as_str(attrs["run_key"]) == meta.run_key)
    except Exception:
        return False


def write_master(out: Path, shards: list[Path], meta: StoreMeta) -> None:
    """Write the master ``out`` joining complete ``shards`` (same folder, in row order) via VDS."""
    out = Path(out)
    folder = out.parent.resolve()
    ranges: list[tuple[Path, int, int]] = []
    expected_start = 0
    for i, shard in enumerate(shards):
        shard = Path(shard)
        if shard.parent.resolve() != folder:
            raise ValueError(f"shard {shard} must be in the master's folder {folder}")
        if not shard_is_complete(shard, meta):
            raise ArtifactError(f"shard {shard} is missing, incomplete or from another precompute run",
                                "rerun precompute to finish the missing shards")
        attrs = _read_shard_attrs(shard)
        start, stop = int(attrs["row_start"]), int(attrs["row_stop"])
        if (int(attrs["shard_index"]), int(attrs["num_shards"])) != (i, len(shards)) or start != expected_start:
            raise ArtifactError(f"shard {shard} does not fit: index {int(attrs['shard_index'])} of "
                                f"{int(attrs['num_shards'])}, rows {start}..{stop}, expected shard {i} of "
                                f"{len(shards)} starting at row {expected_start}", _REGENERATE)
        if int(attrs["num_classes"]) != meta.num_classes or int(attrs["topk"]) != meta.topk \
                or _as_str(attrs["dtype"]) != meta.dtype:
            raise ArtifactError(f"shard {shard} has a different layout (classes/topk/dtype) than the master",
                                _REGENERATE)
        ranges.append((shard, start, stop))
        expected_start = stop
    num_rows = expected_start
    if num_rows < 1:
        raise ValueError("cannot write a master for an empty store")
    new = _NewFile(_temp_path(out), out)
    try:
        with new.open_h5() as f:
            for name, (shape, dtype) in _field_specs(meta, num_rows).items():
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                for shard, start, stop in ranges:
                    if stop > start:  # relative name: resolved against the master's folder
                        source = h5py.VirtualSource(shard.name, name, shape=(stop - start,) + shape[1:],
                                                    dtype=dtype)
                        layout[start:stop] = source
                f.create_virtual_dataset(name, layout)
            _set_attrs(f["split"], {"split_names": list(SPLIT_NAMES)})
            _set_attrs(f, meta.to_attrs())
            _set_attrs(f, {"num_rows": num_rows, "num_shards": len(ranges),
                           "shards": [shard.name for shard, _, _ in ranges], "complete": True})
        new.commit()
    except BaseException:
        new.discard()
        raise


# ----------------------------------------------------------------------------- reading


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", rdcc_nbytes=0)  # no chunk cache: read only the selected rows
    except OSError as exc:
        raise ArtifactError(f"targets store {path} is not a readable HDF5 file ({exc})", _REGENERATE) from exc


def _check_virtual_sources(ds: h5py.Dataset, path: Path, folder: Path) -> set[Path]:
    """Files behind a virtual dataset; refuses sources outside the master's folder.

    HDF5 resolves a relative source name against the master's folder (unless the environment
    variable HDF5_VDS_PREFIX names another folder). Passing an explicit virtual prefix through a
    dataset access property list would pin this, but made random reads ~4x slower (measured).
    """
    if not ds.is_virtual:
        return set()
    files: set[Path] = set()
    for vmap in ds.virtual_sources():
        name = vmap.file_name
        if name == ".":
            continue
        target = (folder / name).resolve()
        if os.path.isabs(name) or not target.is_relative_to(folder):
            raise ArtifactError(f"targets store {path}: dataset {ds.name} points at {name!r}, outside the "
                                f"store folder {folder}; refusing to read it",
                                "use a store written by reducedmpl precompute (rerun precompute)")
        files.add(target)
    return files


def _check_shard(shard: Path, master: Path, meta: StoreMeta) -> None:
    if not shard.exists():
        raise ArtifactError(f"targets store {master} needs shard {shard.name}, which is missing",
                            "copy the whole store folder, or rerun precompute")
    try:
        attrs = _read_shard_attrs(shard)
        complete, run_key = bool(attrs["complete"]), _as_str(attrs["run_key"])
    except Exception as exc:
        raise ArtifactError(f"shard {shard} of targets store {master} is unreadable ({exc})", _REGENERATE) from exc
    if not complete:
        raise ArtifactError(f"shard {shard} of targets store {master} is incomplete", _REGENERATE)
    if run_key != meta.run_key:
        raise ArtifactError(f"shard {shard} belongs to another precompute run than {master}", _REGENERATE)


def _dense_log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits.astype(np.float32)
    if temperature != 1.0:
        x /= np.float32(temperature)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def _topk_log_probs(topk_logits: np.ndarray, topk_index: np.ndarray, lse: np.ndarray, num_classes: int,
                    temperature: float) -> np.ndarray:
    """Dense (n, C) log-probs from top-k logits; the remainder mass is spread over the other classes.

    At T=1 the top-k log-probs are exact (``logit - logsumexp``). At T != 1 the other classes are
    treated as C-K equal logits holding the known remainder mass, an approximation for them.
    """
    a = topk_logits.astype(np.float64)
    lse_col = lse.astype(np.float64)[:, None]
    others = num_classes - a.shape[1]
    remainder = np.clip(1.0 - np.exp(a - lse_col).sum(axis=1, keepdims=True), _MIN_REMAINDER, 1.0)
    rest = lse_col + np.log(remainder / others)  # raw logit of each non-top-k class
    xa, xr = a / temperature, rest / temperature
    m = np.maximum(xa.max(axis=1, keepdims=True), xr)
    z = m + np.log(np.exp(xa - m).sum(axis=1, keepdims=True) + others * np.exp(xr - m))
    out = np.empty((a.shape[0], num_classes), dtype=np.float32)
    out[:] = (xr - z).astype(np.float32)
    np.put_along_axis(out, topk_index.astype(np.intp), (xa - z).astype(np.float32), axis=1)
    return out


class TargetStore:
    """Read-only view of a targets store; open with :meth:`TargetStore.open`."""

    def __init__(self, path: Path, file: h5py.File, meta: StoreMeta, datasets: dict[str, h5py.Dataset],
                 ids: np.ndarray, labels: np.ndarray, splits: np.ndarray, memory_budget_bytes: int):
        self.path = path
        self.meta = meta
        self.ids = ids
        self.labels = labels
        self.splits = splits
        self._file: h5py.File | None = file
        self._datasets = datasets
        self._fields = _table_fields(meta)
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_rows = order.astype(np.int64)
        if len(ids) > 1 and (self._sorted_ids[1:] == self._sorted_ids[:-1]).any():
            raise ArtifactError(f"targets store {path} has duplicate ids", _REGENERATE)
        self.read_calls = 0  # HDF5 read calls made by the out-of-core path (one per block and field)
        self.blocks_read = 0  # contiguous row blocks planned by the out-of-core path
        row_bytes = sum(int(np.prod(datasets[n].shape[1:])) * datasets[n].dtype.itemsize for n in self._fields)
        self._merge_gap = max(1, _MERGE_GAP_BYTES // max(1, row_bytes))
        table_bytes = row_bytes * len(ids)
        self._table: dict[str, np.ndarray] | None = None
        self.in_memory = self._columns_nbytes() + table_bytes <= memory_budget_bytes
        if self.in_memory:
            self._table = {}
            for name in self._fields:
                ds = datasets[name]
                arr = np.empty(ds.shape, dtype=ds.dtype)
                try:
                    if arr.size:
                        ds.read_direct(arr)
                except OSError as exc:
                    raise ArtifactError(f"reading '{name}' from targets store {path} failed ({exc})",
                                        _REGENERATE) from exc
                self._table[name] = arr

    def _columns_nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ids, self.labels, self.splits, self._sorted_ids, self._sorted_rows))

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expect_fingerprints: dict[str, str] | None = None,
             expect_num_classes: int | None = None, memory_budget_bytes: int = 2 * 2**30) -> TargetStore:
        """Open and validate a store (``path`` is ``targets.h5`` or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / MASTER_NAME
        if not path.exists():
            tmp = _temp_path(path)
            note = f" (only the partial file {tmp.name} exists: precompute was interrupted)" if tmp.exists() else ""
            raise ArtifactError(f"targets store {path} does not exist{note}",
                                "run `reducedmpl precompute` first, or point at the right targets.h5")
        f = _open_h5(path)
        try:
            store = cls._open_checked(path, f, expect_fingerprints, expect_num_classes, memory_budget_bytes)
        except BaseException:
            f.close()
            raise
        return store

    @classmethod
    def _open_checked(cls, path: Path, f: h5py.File, expect_fingerprints: dict[str, str] | None,
                      expect_num_classes: int | None, memory_budget_bytes: int) -> TargetStore:
        attrs = f.attrs
        if "schema_version" not in attrs:
            raise ArtifactError(f"{path} is not a reducedmpl targets store (no schema_version attribute)",
                                _REGENERATE)
        try:
            version = int(attrs["schema_version"])
        except (TypeError, ValueError):
            version = -1
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ArtifactError(f"targets store {path} has schema version {version}; this reducedmpl reads "
                                f"version(s) {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}",
                                "rerun precompute with this reducedmpl, or use the reducedmpl that wrote it")
        if not bool(attrs.get("complete", False)):
            raise ArtifactError(f"targets store {path} is incomplete (complete=False)",
                                "precompute did not finish; rerun it")
        try:
            meta = StoreMeta.from_attrs(attrs)
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"targets store {path} has malformed attributes ({exc})", _REGENERATE) from exc
        for split, expected in (expect_fingerprints or {}).items():
            stored = meta.fingerprints.get(split)
            if stored != expected:
                raise ArtifactError(
                    f"targets store {path} was computed for other data: split '{split}' has fingerprint "
                    f"{stored or 'none'}, this data has {expected}",
                    "rerun precompute for this data (or point at the store made for it)")
        if expect_num_classes is not None and expect_num_classes != meta.num_classes:
            raise ArtifactError(f"targets store {path} has {meta.num_classes} classes, expected "
                                f"{expect_num_classes}",
                                "rerun precompute with the teacher and data used for distillation")
        folder = path.parent.resolve()
        specs = _field_specs(meta, 0)
        datasets: dict[str, h5py.Dataset] = {}
        shards: set[Path] = set()
        for name in ROW_FIELDS + _table_fields(meta):
            obj = f.get(name)
            if not isinstance(obj, h5py.Dataset):
                raise ArtifactError(f"targets store {path} lacks dataset '{name}'", _REGENERATE)
            datasets[name] = obj
            shards |= _check_virtual_sources(datasets[name], path, folder)
        for shard in sorted(shards):
            _check_shard(shard, path, meta)
        num_rows = datasets["id"].shape[0] if datasets["id"].ndim == 1 else -1
        for name, ds in datasets.items():
            shape, dtype = specs[name]
            exact = name in ("logits", "topk_logits")  # must match the recorded dtype
            if ds.shape != (num_rows,) + shape[1:] or (ds.dtype != dtype if exact else ds.dtype.kind != dtype.kind):
                raise ArtifactError(f"targets store {path}: dataset '{name}' has shape {ds.shape} and dtype "
                                    f"{ds.dtype}, expected {(num_rows,) + shape[1:]} {dtype}", _REGENERATE)
        try:
            ids = datasets["id"][...].astype(np.int64)
            labels = datasets["label"][...].astype(np.int64)
            splits = datasets["split"][...].astype(np.uint8)
        except OSError as exc:
            raise ArtifactError(f"targets store {path} is corrupt ({exc})", _REGENERATE) from exc
        if splits.size and splits.max() >= len(SPLIT_NAMES):
            raise ArtifactError(f"targets store {path} has unknown split codes", _REGENERATE)
        if labels.size and (labels.min() < -1 or labels.max() >= meta.num_classes):
            raise ArtifactError(f"targets store {path} has labels outside -1..{meta.num_classes - 1}", _REGENERATE)
        return cls(path, f, meta, datasets, ids, labels, splits, memory_budget_bytes)

    # -- public API -------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Number of rows N."""
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (id/label/split columns, id index, and the table when in memory)."""
        table = sum(a.nbytes for a in self._table.values()) if self._table is not None else 0
        return self._columns_nbytes() + table

    def rows_for_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of ``ids``; unknown ids raise ArtifactError."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, max(0, len(self._sorted_ids) - 1))
        found = (self._sorted_ids[pos] == ids) if len(self._sorted_ids) else np.zeros(ids.shape, bool)
        if not found.all():
            missing = ids[~found][:5].tolist()
            raise ArtifactError(f"{int((~found).sum())} ids are not in targets store {self.path} (e.g. {missing})",
                                "rerun precompute for this data")
        return self._sorted_rows[pos]

    def log_probs(self, ids: Sequence[int] | np.ndarray, temperature: float | None = None) -> np.ndarray:
        """float32 (n, C) ``log_softmax(logits / T)`` for ``ids`` in the given order (T: meta default)."""
        t = self.meta.temperature if temperature is None else float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be positive, got {t}")
        rows = self.rows_for_ids(ids)
        table = self._gather(rows)
        self._check_finite(table, rows)
        if self.meta.topk:
            return _topk_log_probs(table["topk_logits"], table["topk_index"], table["logsumexp"],
                                   self.meta.num_classes, t)
        return _dense_log_probs(table["logits"], t)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (n, C) raw logits (dense stores only)."""
        if self.meta.topk:
            raise ArtifactError(f"targets store {self.path} holds top-{self.meta.topk} logits, not dense ones",
                                "use log_probs, or rerun precompute with topk=0")
        rows = self.rows_for_ids(ids)
        table = self._gather(rows)
        self._check_finite(table, rows)
        return table["logits"].astype(np.float32)

    def ids_in_split(self, name: str) -> np.ndarray:
        """Ids of the rows in split ``name`` (one of SPLIT_NAMES), in row order."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return self.ids[self.splits == SPLIT_NAMES.index(name)]

    def close(self) -> None:
        """Release the file and the in-memory table."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._datasets = {}
        self._table = None

    def __enter__(self) -> TargetStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_finite(self, table: dict[str, np.ndarray], rows: np.ndarray) -> None:
        for name, arr in table.items():
            if arr.dtype.kind == "f":
                bad = ~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim)))  # per row; fine for 0 rows
                if bad.any():
                    raise ArtifactError(f"targets store {self.path} has NaN/Inf in '{name}' for ids "
                                        f"{self.ids[rows[bad]][:5].tolist()}", _REGENERATE)

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Table fields for ``rows`` in the given order."""
        if self._file is None:
            raise RuntimeError(f"targets store {self.path} is closed")
        if self._table is not None:
            return {name: arr[rows] for name, arr in self._table.items()}
        unique, inverse = np.unique(rows, return_inverse=True)
        starts, stops = self._plan_blocks(unique)
        # position of each unique row inside the concatenated blocks
        lengths = stops - starts
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        block_of = np.searchsorted(starts, unique, side="right") - 1
        where = offsets[block_of] + (unique - starts[block_of])
        take = where[inverse.reshape(-1)]
        self.blocks_read += len(starts)
        return {name: self._read_blocks(name, starts, stops)[take] for name in self._fields}

    def _plan_blocks(self, unique_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge sorted unique rows into contiguous ``[start, stop)`` blocks (small gaps absorbed)."""
        if unique_rows.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        breaks = np.flatnonzero(np.diff(unique_rows) > self._merge_gap) + 1
        first = np.concatenate(([0], breaks))
        last = np.concatenate((breaks - 1, [unique_rows.size - 1]))
        return unique_rows[first].astype(np.int64), unique_rows[last].astype(np.int64) + 1

    def _read_blocks(self, name: str, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Rows of all ``[start, stop)`` blocks of ``name``, concatenated; one slice read per block."""
        ds = self._datasets[name]
        out = np.empty((int((stops - starts).sum()),) + ds.shape[1:], dtype=ds.dtype)
        pos = 0
        try:
            for start, stop in zip(starts.tolist(), stops.tolist()):
                out[pos:pos + stop - start] = ds[start:stop]
                pos += stop - start
                self.read_calls += 1
        except OSError as exc:
            raise ArtifactError(f"reading '{name}' from targets store {self.path} failed ({exc})",
                                _REGENERATE) from exc
        return out


# ----------------------------------------------------------------------------- inspection


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins."""
    if confidence.size == 0:
        return float("nan")
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / confidence.size)


def verify_store(path: str | os.PathLike[str], block_rows: int = 65536) -> dict[str, Any]:
    """Check a store and summarise it for ``inspect``; never raises for a broken store.

    Statistics (accuracy, entropy, ECE over 15 bins) use the teacher's raw logits at T=1.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MASTER_NAME
    report: dict[str, Any] = {"path": str(path), "problems": [], "master_complete": None, "shards": [],
                              "rows": None, "rows_per_split": {}, "nonfinite_values": None,
                              "teacher_accuracy": None, "labeled_rows": 0, "mean_entropy": None,
                              "ece": None, "provenance": {}}
    problems: list[str] = report["problems"]
    if not path.exists():
        problems.append(f"{path} does not exist")
        return report
    try:  # raw look, independent of the checks in TargetStore.open
        with h5py.File(path, "r") as f:
            report["provenance"] = {k: _attr_to_py(v) for k, v in f.attrs.items() if k != "class_names"}
            report["master_complete"] = bool(f.attrs.get("complete", False))
            folder = path.parent.resolve()
            names: list[str] = []
            if "id" in f and f["id"].is_virtual:
                names = [vm.file_name for vm in f["id"].virtual_sources()]
            for name in dict.fromkeys(names):
                shard = (folder / name).resolve()
                entry: dict[str, Any] = {"file": name, "exists": shard.exists(), "complete": None}
                if shard.exists() and shard.is_relative_to(folder):
                    try:
                        attrs = _read_shard_attrs(shard)
                        entry.update(complete=bool(attrs.get("complete", False)),
                                     rows=int(attrs["row_stop"]) - int(attrs["row_start"]),
                                     same_run=_as_str(attrs.get("run_key", "")) == _as_str(f.attrs.get("run_key", "")))
                    except Exception as exc:  # noqa: BLE001 - report, don't raise
                        entry["error"] = str(exc)
                report["shards"].append(entry)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{path} cannot be read as HDF5 ({exc})")
        return report
    try:
        store = TargetStore.open(path, memory_budget_bytes=0)
    except Exception as exc:  # noqa: BLE001
        problems.append(str(exc))
        return report
    try:
        _scan_store(store, report, block_rows)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"reading {path} failed: {exc}")
    finally:
        store.close()
    return report


def _scan_store(store: TargetStore, report: dict[str, Any], block_rows: int) -> None:
    """Fill row counts and teacher statistics by streaming the table in contiguous blocks."""
    meta = store.meta
    report["rows"] = store.num_rows
    report["rows_per_split"] = {name: int((store.splits == code).sum()) for code, name in enumerate(SPLIT_NAMES)}
    nonfinite = bad_rows = correct = labeled = 0
    entropy_sum, conf_all, correct_all = 0.0, [], []
    for start in range(0, store.num_rows, block_rows):
        stop = min(start + block_rows, store.num_rows)
        table = {name: store._read_blocks(name, np.array([start]), np.array([stop])) for name in store._fields}
        finite = np.ones(stop - start, dtype=bool)
        for arr in table.values():
            if arr.dtype.kind == "f":
                ok = np.isfinite(arr).reshape(stop - start, -1)
                nonfinite += int((~ok).sum())
                finite &= ok.all(axis=1)
        bad_rows += int((~finite).sum())
        if meta.topk:
            logp = _topk_log_probs(table["topk_logits"][finite], table["topk_index"][finite],
                                   table["logsumexp"][finite], meta.num_classes, 1.0)
        else:
            logp = _dense_log_probs(table["logits"][finite], 1.0)
        probs = np.exp(logp)
        entropy_sum += float(-(probs * logp).sum())
        pred = logp.argmax(axis=1)
        labels = store.labels[start:stop][finite]
        has = labels >= 0
        hit = pred[has] == labels[has]
        correct += int(hit.sum())
        labeled += int(has.sum())
        conf_all.append(probs.max(axis=1)[has])
        correct_all.append(hit)
    report["nonfinite_values"] = nonfinite
    if nonfinite:
        report["problems"].append(f"{store.path}: {nonfinite} NaN/Inf values in {bad_rows} rows; {_REGENERATE}")
    good = store.num_rows - bad_rows
    report["mean_entropy"] = entropy_sum / good if good else None
    report["labeled_rows"] = labeled
    if labeled:
        report["teacher_accuracy"] = correct / labeled
        report["ece"] = _ece(np.concatenate(conf_all), np.concatenate(correct_all).astype(np.float64))


def _attr_to_py(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [_attr_to_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
