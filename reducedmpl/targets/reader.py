"""Reading a store: checks at open, then batches of rows by id, from memory or in sorted blocks."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from ..errors import ArtifactError
from ..files import ZIP_SIGNATURE, file_head, temp_path
from .meta import MASTER_NAME, MERGE_GAP_BYTES, MIN_REMAINDER, REGENERATE, ROW_FIELDS, SPLIT_NAMES, SUPPORTED_SCHEMA_VERSIONS, VIEW_PREFIX, StoreMeta, as_str
from .writer import field_specs, read_shard_attrs, table_fields, view_fields


# ----------------------------------------------------------------------------- reading


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", rdcc_nbytes=0)  # no chunk cache: read only the selected rows
    except OSError as exc:
        error = _not_a_store(path) or ArtifactError(f"targets store {path} is not a readable HDF5 file ({exc})",
                                                    REGENERATE)
        error.same_on_every_rank = True  # every rank opens the same file: rank 0 reports it
        raise error from exc


def _not_a_store(path: Path) -> ArtifactError | None:
    """The error for a teacher.pt / student.pt / reduced_teacher.pt of ours passed where a store belongs."""
    if file_head(path, len(ZIP_SIGNATURE)) != ZIP_SIGNATURE:
        return None
    try:
        import torch

        kind = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("kind")
    except Exception:  # noqa: BLE001 - not one of ours: the plain message applies
        return None
    if kind == "teacher":
        return ArtifactError(f"{path} is a teacher artifact (teacher.pt), not a targets store",
                             f"pass the {MASTER_NAME} that `reducedmpl precompute --teacher {path}` writes beside it")
    if kind in ("student", "reduced_teacher"):
        return ArtifactError(f"{path} is a {kind.replace('_', ' ')} artifact, not a targets store",
                             "pass the targets.h5 written by `reducedmpl precompute` (the one this student was "
                             "distilled from)")
    return None


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
        attrs = read_shard_attrs(shard)
        complete, run_key = bool(attrs["complete"]), as_str(attrs["run_key"])
    except Exception as exc:
        raise ArtifactError(f"shard {shard} of targets store {master} is unreadable ({exc})", REGENERATE) from exc
    if not complete:
        raise ArtifactError(f"shard {shard} of targets store {master} is incomplete", REGENERATE)
    if run_key != meta.run_key:
        raise ArtifactError(f"shard {shard} belongs to another precompute run than {master}", REGENERATE)


def dense_log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits.astype(np.float32)
    if temperature != 1.0:
        x /= np.float32(temperature)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def topk_log_probs(topk_logits: np.ndarray, topk_index: np.ndarray, lse: np.ndarray, num_classes: int,
                    temperature: float) -> np.ndarray:
    """Dense (n, C) log-probs from top-k logits; the remainder mass is spread over the other classes.

    At T=1 the top-k log-probs are exact (``logit - logsumexp``). At T != 1 the other classes are
    treated as C-K equal logits holding the known remainder mass, an approximation for them.
    """
    a = topk_logits.astype(np.float64)
    lse_col = lse.astype(np.float64)[:, None]
    others = num_classes - a.shape[1]
    remainder = np.clip(1.0 - np.exp(a - lse_col).sum(axis=1, keepdims=True), MIN_REMAINDER, 1.0)
    rest = lse_col + np.log(remainder / others)  # raw logit of each non-top-k class
    xa, xr = a / temperature, rest / temperature
    m = np.maximum(xa.max(axis=1, keepdims=True), xr)
    z = m + np.log(np.exp(xa - m).sum(axis=1, keepdims=True) + others * np.exp(xr - m))
    out = np.empty((a.shape[0], num_classes), dtype=np.float32)
    out[:] = (xr - z).astype(np.float32)
    np.put_along_axis(out, topk_index.astype(np.intp), (xa - z).astype(np.float32), axis=1)
    return out


def _checked_meta(path: Path, attrs: Any, expect_fingerprints: dict[str, str] | None,
                  expect_num_classes: int | None) -> StoreMeta:
    """The master's metadata, refused when it is not ours, of an unknown schema, incomplete, or for other data."""
    if "schema_version" not in attrs:
        raise ArtifactError(f"{path} is not a reducedmpl targets store (no schema_version attribute)",
                            REGENERATE)
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
        raise ArtifactError(f"targets store {path} has malformed attributes ({exc})", REGENERATE) from exc
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
    return meta


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
        self._fields = table_fields(meta)  # view 0
        self._view_fields = view_fields(meta)  # views 1..V-1
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_rows = order.astype(np.int64)
        if len(ids) > 1 and (self._sorted_ids[1:] == self._sorted_ids[:-1]).any():
            raise ArtifactError(f"targets store {path} has duplicate ids", REGENERATE)
        self.read_calls = 0  # HDF5 read calls made by the out-of-core path (one per block and field)
        self.blocks_read = 0  # contiguous row blocks planned by the out-of-core path
        self.bytes_read = 0  # bytes of the selections the out-of-core path read
        self._merge_gap = max(1, MERGE_GAP_BYTES // max(1, self._row_bytes(self._fields)))
        one_view = self._row_bytes(self._view_fields) // max(1, meta.views - 1)  # a view_* read holds one view
        self._view_merge_gap = max(1, MERGE_GAP_BYTES // max(1, one_view))
        table_bytes = (self._row_bytes(self._fields) + self._row_bytes(self._view_fields)) * len(ids)
        self._table: dict[str, np.ndarray] | None = None
        self.in_memory = self._columns_nbytes() + table_bytes <= memory_budget_bytes
        if self.in_memory:
            self._table = {}
            for name in self._fields + self._view_fields:
                ds = datasets[name]
                arr = np.empty(ds.shape, dtype=ds.dtype)
                try:
                    if arr.size:
                        ds.read_direct(arr)
                except OSError as exc:
                    raise ArtifactError(f"reading '{name}' from targets store {path} failed ({exc})",
                                        REGENERATE) from exc
                self._table[name] = arr

    def _row_bytes(self, fields: tuple[str, ...]) -> int:
        return sum(int(np.prod(self._datasets[n].shape[1:])) * self._datasets[n].dtype.itemsize for n in fields)

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
            tmp = temp_path(path)
            note = f" (only the partial file {tmp.name} exists: precompute was interrupted)" if tmp.exists() else ""
            raise ArtifactError(f"targets store {path} does not exist{note}",
                                "run `reducedmpl precompute` first, or point at the right targets.h5")
        f = open_h5(path)
        try:
            store = cls._open_checked(path, f, expect_fingerprints, expect_num_classes, memory_budget_bytes)
        except BaseException:
            f.close()
            raise
        return store

    @classmethod
    def _open_checked(cls, path: Path, f: h5py.File, expect_fingerprints: dict[str, str] | None,
                      expect_num_classes: int | None, memory_budget_bytes: int) -> TargetStore:
        meta = _checked_meta(path, f.attrs, expect_fingerprints, expect_num_classes)
        folder = path.parent.resolve()
        specs = field_specs(meta, 0)
        datasets: dict[str, h5py.Dataset] = {}
        shards: set[Path] = set()
        for name in ROW_FIELDS + table_fields(meta) + view_fields(meta):
            obj = f.get(name)
            if not isinstance(obj, h5py.Dataset):
                raise ArtifactError(f"targets store {path} lacks dataset '{name}'", REGENERATE)
            datasets[name] = obj
            shards |= _check_virtual_sources(datasets[name], path, folder)
        for shard in sorted(shards):
            _check_shard(shard, path, meta)
        num_rows = datasets["id"].shape[0] if datasets["id"].ndim == 1 else -1
        for name, ds in datasets.items():
            shape, dtype = specs[name]
            exact = name.removeprefix(VIEW_PREFIX) in ("logits", "topk_logits")  # must match the recorded dtype
            if ds.shape != (num_rows,) + shape[1:] or (ds.dtype != dtype if exact else ds.dtype.kind != dtype.kind):
                raise ArtifactError(f"targets store {path}: dataset '{name}' has shape {ds.shape} and dtype "
                                    f"{ds.dtype}, expected {(num_rows,) + shape[1:]} {dtype}", REGENERATE)
        try:
            ids = datasets["id"][...].astype(np.int64)
            labels = datasets["label"][...].astype(np.int64)
            splits = datasets["split"][...].astype(np.uint8)
        except OSError as exc:
            raise ArtifactError(f"targets store {path} is corrupt ({exc})", REGENERATE) from exc
        if splits.size and splits.max() >= len(SPLIT_NAMES):
            raise ArtifactError(f"targets store {path} has unknown split codes", REGENERATE)
        if labels.size and (labels.min() < -1 or labels.max() >= meta.num_classes):
            raise ArtifactError(f"targets store {path} has labels outside -1..{meta.num_classes - 1}", REGENERATE)
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

    @property
    def views(self) -> int:
        """Number of stored views V per row (view 0 is the clean input; 1 for a version-1 store)."""
        return self.meta.views

    def log_probs(self, ids: Sequence[int] | np.ndarray, temperature: float | None = None,
                  views: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 (n, C) ``log_softmax(logits / T)`` for ``ids`` in the given order (T: meta default), of view
        ``views[i]`` of row ``ids[i]`` (None: view 0, the clean input)."""
        t = self.meta.temperature if temperature is None else float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be positive, got {t}")
        rows = self.rows_for_ids(ids)
        table = self._gather_views(rows, views)
        self._check_finite(table, rows)
        if self.meta.topk:
            return topk_log_probs(table["topk_logits"], table["topk_index"], table["logsumexp"],
                                   self.meta.num_classes, t)
        return dense_log_probs(table["logits"], t)

    def logits(self, ids: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """float32 (n, C) raw logits of view ``views[i]`` of row ``ids[i]`` (None: view 0; dense stores only)."""
        if self.meta.topk:
            raise ArtifactError(f"targets store {self.path} holds top-{self.meta.topk} logits, not dense ones",
                                "use log_probs, or rerun precompute with topk=0")
        rows = self.rows_for_ids(ids)
        table = self._gather_views(rows, views)
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
                                        f"{self.ids[rows[bad]][:5].tolist()}", REGENERATE)

    def _gather_views(self, rows: np.ndarray, views: Sequence[int] | np.ndarray | None) -> dict[str, np.ndarray]:
        """View 0's table fields for ``rows``, each row's from its view ``views[i]`` where one is given."""
        if views is None:
            return self._gather(rows)
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        if views.shape != rows.shape:
            raise ValueError(f"{len(views)} views for {len(rows)} ids")
        if views.size and (views.min() < 0 or views.max() >= self.views):
            raise ValueError(f"views must be in 0..{self.views - 1} (the store holds {self.views}), got "
                             f"{views.min()}..{views.max()}")
        augmented = views > 0
        if not augmented.any():
            return self._gather(rows)
        table = self._gather(rows[~augmented])
        rows_v, slot = rows[augmented], views[augmented] - 1  # position along the view axis of view_* tables
        if self._table is not None:  # in memory: only the chosen view of each row is copied
            parts = {v: self._table[v][rows_v, slot] for v in self._view_fields}
        else:  # out of core: only each row's chosen view comes off the disk
            parts = self._gather_slots(rows_v, slot)
        out = {}
        for name, vname in zip(self._fields, self._view_fields):
            col = np.empty((len(rows),) + parts[vname].shape[1:], dtype=parts[vname].dtype)
            col[~augmented], col[augmented] = table[name], parts[vname]
            out[name] = col
        return out

    def _gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """View 0's table fields for ``rows`` in the given order."""
        if self._file is None:
            raise RuntimeError(f"targets store {self.path} is closed")
        if self._table is not None:
            return {name: self._table[name][rows] for name in self._fields}
        starts, stops, take = self._plan_reads(rows, self._merge_gap)
        return {name: self._read_blocks(name, starts, stops)[take] for name in self._fields}

    def _gather_slots(self, rows: np.ndarray, slot: np.ndarray) -> dict[str, np.ndarray]:
        """The view_* fields of view ``slot[i] + 1`` of ``rows[i]``, read out of core: for each view, the rows that
        chose it in planned blocks of that view alone (a selection ``[start:stop, slot]``), never the other views."""
        if self._file is None:
            raise RuntimeError(f"targets store {self.path} is closed")
        out = {name: np.empty((len(rows),) + self._datasets[name].shape[2:], dtype=self._datasets[name].dtype)
               for name in self._view_fields}
        for s in np.unique(slot).tolist():
            mine = np.flatnonzero(slot == s)
            starts, stops, take = self._plan_reads(rows[mine], self._view_merge_gap)
            for name in self._view_fields:
                out[name][mine] = self._read_blocks(name, starts, stops, s)[take]
        return out

    def _plan_reads(self, rows: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The blocks ``[start, stop)`` that hold ``rows`` and where each row lands in their concatenation."""
        unique, inverse = np.unique(rows, return_inverse=True)
        starts, stops = self._plan_blocks(unique, gap)
        offsets = np.concatenate(([0], np.cumsum(stops - starts)[:-1]))
        block_of = np.searchsorted(starts, unique, side="right") - 1
        self.blocks_read += len(starts)
        return starts, stops, (offsets[block_of] + (unique - starts[block_of]))[inverse.reshape(-1)]

    def _plan_blocks(self, unique_rows: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray]:
        """Merge sorted unique rows into contiguous ``[start, stop)`` blocks (small gaps absorbed)."""
        if unique_rows.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        breaks = np.flatnonzero(np.diff(unique_rows) > gap) + 1
        first = np.concatenate(([0], breaks))
        last = np.concatenate((breaks - 1, [unique_rows.size - 1]))
        return unique_rows[first].astype(np.int64), unique_rows[last].astype(np.int64) + 1

    def _read_blocks(self, name: str, starts: np.ndarray, stops: np.ndarray, slot: int | None = None) -> np.ndarray:
        """Rows of all ``[start, stop)`` blocks of ``name``, concatenated; one slice read per block (of view
        ``slot + 1`` alone where ``slot`` is given: ``name`` is then a view_* field)."""
        ds = self._datasets[name]
        shape = ds.shape[1:] if slot is None else ds.shape[2:]
        out = np.empty((int((stops - starts).sum()),) + shape, dtype=ds.dtype)
        pos = 0
        try:
            for start, stop in zip(starts.tolist(), stops.tolist()):
                out[pos:pos + stop - start] = ds[start:stop] if slot is None else ds[start:stop, slot]
                pos += stop - start
                self.read_calls += 1
                self.bytes_read += (stop - start) * int(np.prod(shape)) * ds.dtype.itemsize
        except OSError as exc:
            raise ArtifactError(f"reading '{name}' from targets store {self.path} failed ({exc})",
                                REGENERATE) from exc
        return out
