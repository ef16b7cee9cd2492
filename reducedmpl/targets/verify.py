"""``inspect``'s view of a store: a full scan for soundness, statistics and provenance."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .meta import MASTER_NAME, REGENERATE, SPLIT_NAMES, VIEW_PREFIX, StoreMeta, as_str
from .reader import TargetStore, dense_log_probs, topk_log_probs
from .writer import read_shard_attrs


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

    Statistics (accuracy, entropy, ECE over 15 bins) use the teacher's raw logits at T=1, on view 0 (the clean
    input); ``views`` gives the accuracy and mean entropy of every stored view. Accuracy counts the rows with a
    label (labeled, val and test).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MASTER_NAME
    report: dict[str, Any] = {"path": str(path), "problems": [], "master_complete": None, "shards": [],
                              "rows": None, "rows_per_split": {}, "nonfinite_values": None,
                              "teacher_accuracy": None, "labeled_rows": 0, "mean_entropy": None,
                              "ece": None, "views": [], "provenance": {}}
    problems: list[str] = report["problems"]
    if not path.exists():
        problems.append(f"{path} does not exist")
        return report
    try:  # raw look, independent of the checks in TargetStore.open
        with h5py.File(path, "r") as f:
            report["provenance"] = {k: attr_to_py(v) for k, v in f.attrs.items() if k != "class_names"}
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
                        attrs = read_shard_attrs(shard)
                        entry.update(complete=bool(attrs.get("complete", False)),
                                     rows=int(attrs["row_stop"]) - int(attrs["row_start"]),
                                     same_run=as_str(attrs.get("run_key", "")) == as_str(f.attrs.get("run_key", "")))
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


SCAN_BLOCK_BYTES = 64 * 2**20  # bytes of targets (every view) read at once by the scan


def label_statistics(logp: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Sums over a block of rows for one view: ``correct`` (argmax == label) and ``labeled`` over the rows with a
    label (``labels >= 0``), ``entropy`` (nats, summed over every row) and ``rows``. ``logp``: (n, C) log-probs."""
    has = labels >= 0
    return {"correct": int((logp.argmax(axis=1)[has] == labels[has]).sum()), "labeled": int(has.sum()),
            "entropy": float(-(np.exp(logp) * logp).sum()), "rows": int(len(logp))}


def view_log_probs(meta: StoreMeta, table: dict[str, np.ndarray], view: int) -> np.ndarray:
    """(n, C) log-probs at T=1 of ``view`` (0: the clean input) from a block of the store's tables. For a top-k
    store the remainder mass is spread evenly over the other classes (an upper bound of the true entropy)."""
    def field(name: str) -> np.ndarray:
        return table[name] if view == 0 else table[VIEW_PREFIX + name][:, view - 1]

    if meta.topk:
        return topk_log_probs(field("topk_logits"), field("topk_index"), field("logsumexp"), meta.num_classes, 1.0)
    return dense_log_probs(field("logits"), 1.0)


def _scan_store(store: TargetStore, report: dict[str, Any], block_rows: int) -> None:
    """Fill row counts and teacher statistics, per view too, by streaming the table in contiguous blocks."""
    meta = store.meta
    report["rows"] = store.num_rows
    report["rows_per_split"] = {name: int((store.splits == code).sum()) for code, name in enumerate(SPLIT_NAMES)}
    fields = store._fields + store._view_fields
    block_rows = max(1, min(block_rows, SCAN_BLOCK_BYTES // max(1, store._row_bytes(fields))))
    unlabeled = SPLIT_NAMES.index("unlabeled")
    sums = [dict.fromkeys(("correct", "labeled", "entropy", "rows"), 0) for _ in range(store.views)]
    nonfinite = bad_rows = 0
    conf_all, correct_all = [], []
    for start in range(0, store.num_rows, block_rows):
        stop = min(start + block_rows, store.num_rows)
        table = {name: store._read_blocks(name, np.array([start]), np.array([stop])) for name in fields}
        finite = np.ones(stop - start, dtype=bool)
        for arr in table.values():
            if arr.dtype.kind == "f":
                ok = np.isfinite(arr).reshape(stop - start, -1)
                nonfinite += int((~ok).sum())
                finite &= ok.all(axis=1)
        bad_rows += int((~finite).sum())
        table = {name: arr[finite] for name, arr in table.items()}
        labels = np.where(store.splits[start:stop] == unlabeled, -1, store.labels[start:stop])[finite]
        for view in range(store.views):
            logp = view_log_probs(meta, table, view)
            for key, value in label_statistics(logp, labels).items():
                sums[view][key] += value
            if view == 0:
                has = labels >= 0
                conf_all.append(np.exp(logp.max(axis=1))[has])
                correct_all.append(logp.argmax(axis=1)[has] == labels[has])
    report["nonfinite_values"] = nonfinite
    if nonfinite:
        report["problems"].append(f"{store.path}: {nonfinite} NaN/Inf values in {bad_rows} rows; {REGENERATE}")
    report["views"] = [{"view": v, "teacher_accuracy": s["correct"] / s["labeled"] if s["labeled"] else None,
                        "labeled_rows": s["labeled"], "mean_entropy": s["entropy"] / s["rows"] if s["rows"] else None}
                       for v, s in enumerate(sums)]
    report.update({k: report["views"][0][k] for k in ("teacher_accuracy", "labeled_rows", "mean_entropy")})
    if report["labeled_rows"]:
        report["ece"] = _ece(np.concatenate(conf_all), np.concatenate(correct_all).astype(np.float64))


def attr_to_py(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [attr_to_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
