"""Writing a store: shard files, each complete or absent, and the master that joins them as virtual datasets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ArtifactError, writing
from ..files import publish, temp_path
from .meta import CHUNK_MAX, CHUNK_TARGET, COLUMN_CHUNK_ROWS, DENSE_FIELDS, LIBVER, REGENERATE, ROW_FIELDS, SCHEMA_VERSION, SPLIT_NAMES, StoreMeta, TOPK_FIELDS, VIEW_PREFIX, as_str, set_attrs


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
        return h5py.File(self, "w", libver=LIBVER)

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
        publish(self.tmp, self.final)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


def _chunks(shape: tuple[int, ...], itemsize: int, per_view: bool = False) -> tuple[int, ...] | None:
    """Chunk shape of ~256 KiB (64 KiB-1 MiB where the table allows) for a row-major table; ``per_view``: a view_*
    table (N, V-1, ...) chunked one view at a time, so that reading a row's chosen view touches no other view."""
    if shape[0] == 0:
        return None
    if per_view and len(shape) >= 2:
        return _chunks((shape[0],) + tuple(shape[2:]), itemsize)[:1] + (1,) + tuple(shape[2:])
    if len(shape) == 1:
        return (min(shape[0], COLUMN_CHUNK_ROWS),)
    row_bytes = int(np.prod(shape[1:])) * itemsize
    if row_bytes > CHUNK_MAX:  # huge rows: split columns instead
        return (1, max(1, CHUNK_TARGET // itemsize))
    rows = max(1, CHUNK_TARGET // row_bytes)
    return (min(shape[0], rows),) + tuple(shape[1:])


def field_specs(meta: StoreMeta, num_rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
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
    if meta.views > 1:  # views 1..V-1 of each row, beside view 0's tables: (N, V-1, ...)
        for name in table_fields(meta):
            shape, dt = specs[name]
            specs[VIEW_PREFIX + name] = ((num_rows, meta.views - 1) + shape[1:], dt)
    return specs


def target_bytes_per_row(meta: StoreMeta) -> int:
    """Bytes of one row's teacher targets, every view (the id/label/split columns, compressed, excluded)."""
    specs = field_specs(meta, 1)
    return sum(int(np.prod(shape[1:])) * dtype.itemsize
               for name, (shape, dtype) in specs.items() if name not in ROW_FIELDS)


def table_fields(meta: StoreMeta) -> tuple[str, ...]:
    """The tables of view 0 (the clean input): what evaluation, probes and version-1 readers use."""
    return TOPK_FIELDS if meta.topk else DENSE_FIELDS


def view_fields(meta: StoreMeta) -> tuple[str, ...]:
    """The tables of the augmented views 1..V-1 (none for a one-view store)."""
    return tuple(VIEW_PREFIX + name for name in table_fields(meta)) if meta.views > 1 else ()


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
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
        self.tmp_path = temp_path(self.path)
        self.meta = meta
        self.num_rows = int(num_rows)
        self.rows_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = _NewFile(self.tmp_path, self.path)
        self._file: h5py.File | None = None
        try:
            self._file = self._out.open_h5()
            self._datasets: dict[str, h5py.Dataset] = {}
            for name, (shape, dtype) in field_specs(meta, self.num_rows).items():
                chunks = _chunks(shape, dtype.itemsize, per_view=name.startswith(VIEW_PREFIX))
                compress = name in ROW_FIELDS and chunks is not None
                self._datasets[name] = self._file.create_dataset(
                    name, shape=shape, dtype=dtype, chunks=chunks,
                    compression="gzip" if compress else None, compression_opts=4 if compress else None,
                    shuffle=compress)
            set_attrs(self._datasets["split"], {"split_names": list(SPLIT_NAMES)})
            set_attrs(self._file, meta.to_attrs())
            set_attrs(self._file, {"shard_index": shard_index, "num_shards": num_shards,
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

    def append(self, ids: np.ndarray, labels: np.ndarray, splits: np.ndarray, logits: np.ndarray,
               view_logits: np.ndarray | None = None) -> None:
        """Write the next batch of rows; logits are raw float32 (n, C) of view 0, converted here, and (a store of
        V > 1 views) ``view_logits`` (n, V-1, C) of views 1..V-1."""
        if self._file is None:
            raise RuntimeError(f"shard writer for {self.path} is closed")
        logits = np.asarray(logits, dtype=np.float32)
        n = logits.shape[0]
        c, extra = self.meta.num_classes, self.meta.views - 1
        if logits.ndim != 2 or logits.shape[1] != c:
            raise ValueError(f"logits must have shape (n, {c}), got {logits.shape}")
        if (view_logits is None) != (extra == 0):
            raise ValueError(f"this store has {self.meta.views} view(s): pass view_logits exactly when it has more "
                             f"than one")
        if view_logits is not None:
            view_logits = np.asarray(view_logits, dtype=np.float32)
            if view_logits.shape != (n, extra, c):
                raise ValueError(f"view_logits must have shape ({n}, {extra}, {c}), got {view_logits.shape}")
        cols = {"id": np.asarray(ids), "label": np.asarray(labels), "split": np.asarray(splits)}
        for name, col in cols.items():
            if col.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {col.shape}")
        if cols["split"].size and (cols["split"].min() < 0 or cols["split"].max() >= len(SPLIT_NAMES)):
            raise ValueError(f"split codes must be in 0..{len(SPLIT_NAMES) - 1}")
        if self.rows_written + n > self.num_rows:
            raise ValueError(f"{self.path}: {self.rows_written + n} rows appended, shard holds {self.num_rows}")
        finite = np.isfinite(logits).all(axis=1)
        if view_logits is not None:
            finite &= np.isfinite(view_logits).all(axis=(1, 2))
        if not finite.all():
            bad = cols["id"][~finite][:5].tolist()
            raise ArtifactError(f"teacher produced NaN/Inf logits for {int((~finite).sum())} rows of {self.path} "
                                f"(ids {bad})",
                                "check the teacher checkpoint and input data, then rerun precompute")
        start, stop = self.rows_written, self.rows_written + n
        self._write_table("", start, stop, logits)
        if view_logits is not None:
            self._write_table(VIEW_PREFIX, start, stop, view_logits)
        for name, col in cols.items():
            self._datasets[name][start:stop] = col.astype(self._datasets[name].dtype)
        self._out.check()  # a write that failed (full disk) ends the shard here
        self.rows_written = stop

    def _write_table(self, prefix: str, start: int, stop: int, logits: np.ndarray) -> None:
        """Rows ``start:stop`` of the tables named ``prefix`` + field, from float32 logits (n, [V-1,] C)."""
        shape = logits.shape[:-1]
        flat = logits.reshape(-1, logits.shape[-1])
        if self.meta.topk:
            columns = self._topk(flat)
        else:
            with np.errstate(over="ignore"):
                columns = {"logits": flat.astype(self.meta.dtype)}
        if not np.isfinite(columns["topk_logits" if self.meta.topk else "logits"]).all():
            raise ArtifactError(f"teacher logits for {self.path} overflow {self.meta.dtype}",
                                "rerun precompute with dtype float32")
        for name, values in columns.items():
            ds = self._datasets[prefix + name]
            ds[start:stop] = values.reshape(shape + values.shape[1:]).astype(ds.dtype)

    def _topk(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        k = self.meta.topk
        index = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(logits, index, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")  # largest first
        index = np.take_along_axis(index, order, axis=1)
        with np.errstate(over="ignore"):
            values = np.take_along_axis(values, order, axis=1).astype(self.meta.dtype)
        return {"topk_logits": values, "topk_index": index, "logsumexp": logsumexp_rows(logits).astype(np.float32)}

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


def read_shard_attrs(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def shard_is_complete(path: Path, meta: StoreMeta) -> bool:
    """True if ``path`` is a finished shard of this exact job (same schema and run_key)."""
    try:
        attrs = read_shard_attrs(Path(path))
        return (int(attrs["schema_version"]) == SCHEMA_VERSION and bool(attrs["complete"])
                and as_str(attrs["run_key"]) == meta.run_key)
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
        attrs = read_shard_attrs(shard)
        start, stop = int(attrs["row_start"]), int(attrs["row_stop"])
        if (int(attrs["shard_index"]), int(attrs["num_shards"])) != (i, len(shards)) or start != expected_start:
            raise ArtifactError(f"shard {shard} does not fit: index {int(attrs['shard_index'])} of "
                                f"{int(attrs['num_shards'])}, rows {start}..{stop}, expected shard {i} of "
                                f"{len(shards)} starting at row {expected_start}", REGENERATE)
        if int(attrs["num_classes"]) != meta.num_classes or int(attrs["topk"]) != meta.topk \
                or as_str(attrs["dtype"]) != meta.dtype or int(attrs.get("views", 1)) != meta.views:
            raise ArtifactError(f"shard {shard} has a different layout (classes/topk/dtype/views) than the master",
                                REGENERATE)
        ranges.append((shard, start, stop))
        expected_start = stop
    num_rows = expected_start
    if num_rows < 1:
        raise ValueError("cannot write a master for an empty store")
    new = _NewFile(temp_path(out), out)
    try:
        with new.open_h5() as f:
            for name, (shape, dtype) in field_specs(meta, num_rows).items():
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                for shard, start, stop in ranges:
                    if stop > start:  # relative name: resolved against the master's folder
                        source = h5py.VirtualSource(shard.name, name, shape=(stop - start,) + shape[1:],
                                                    dtype=dtype)
                        layout[start:stop] = source
                f.create_virtual_dataset(name, layout)
            set_attrs(f["split"], {"split_names": list(SPLIT_NAMES)})
            set_attrs(f, meta.to_attrs())
            set_attrs(f, {"num_rows": num_rows, "num_shards": len(ranges),
                           "shards": [shard.name for shard, _, _ in ranges], "complete": True})
        new.commit()
    except BaseException:
        new.discard()
        raise
