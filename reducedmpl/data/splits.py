"""Deterministic train / val / test and labeled / unlabeled splits, each with a content fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..config import DataConfig
from ..errors import DataError, UserError
from .sources import Source

SPLITS = ("labeled", "unlabeled", "val", "test")


@dataclass
class Splits:
    """Row indices into a :class:`Source` per split, sorted, and a fingerprint per split."""

    indices: dict[str, np.ndarray]
    fingerprints: dict[str, str]

    def sizes(self) -> dict[str, int]:
        return {k: int(len(v)) for k, v in self.indices.items()}


def _count(size: float, total: int) -> int:
    return int(round(size * total)) if size < 1 else int(size)


def make_splits(source: Source, cfg: DataConfig) -> Splits:
    """Split ``source`` as ``cfg`` says; the same source and config always give the same splits."""
    n = len(source)
    if n == 0:
        raise DataError(f"data source {source.spec!r} holds no examples", "point it at a data set with images")
    rng = np.random.default_rng(cfg.split_seed)
    if cfg.use_official_test:
        if source.official_test is None:
            raise DataError(f"data source {source.spec!r} has no official test split",
                            "set data.use_official_test: false to split off a test set by seed")
        test = np.flatnonzero(source.official_test)
        pool = rng.permutation(np.flatnonzero(~source.official_test))
    else:
        pool = rng.permutation(n)
        n_test = _count(cfg.test_size, n)
        test, pool = pool[:n_test], pool[n_test:]
    n_val = _count(cfg.val_size, n if not cfg.use_official_test else len(pool))
    if n_val >= len(pool):
        raise DataError(f"val ({n_val}) and test ({len(test)}) leave no training examples out of {n}",
                        "lower data.val_size or data.test_size")
    val, train = pool[:n_val], pool[n_val:]

    labels = source.labels[train]
    if cfg.labeled_per_class is None and cfg.labeled_fraction is None:
        labeled = train
    else:
        chosen = []
        for c in range(source.num_classes):
            rows = train[labels == c]  # already in random order
            k = cfg.labeled_per_class if cfg.labeled_per_class is not None else \
                max(1, int(round(cfg.labeled_fraction * len(rows))))
            if len(rows) < k:
                raise DataError(
                    f"{k} labeled examples per class asked, but class {source.class_names[c]!r} has only "
                    f"{len(rows)} in the training split", "lower data.labeled_per_class or data.val_size/test_size")
            chosen.append(rows[:k])
        labeled = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    unlabeled = np.setdiff1d(train, labeled)
    if len(labeled) == 0:
        raise DataError(f"data source {source.spec!r} leaves no labeled training examples",
                        "use a larger data set or smaller val/test sizes")

    indices = {"labeled": labeled, "unlabeled": unlabeled, "val": val, "test": test}
    indices = {k: np.sort(v).astype(np.int64) for k, v in indices.items()}
    fingerprints = {k: fingerprint(source, k, v) for k, v in indices.items()}
    return Splits(indices, fingerprints)


def fingerprint(source: Source, split: str, indices: np.ndarray) -> str:
    """A short hash of a split's name, ids and content."""
    h = hashlib.sha256(split.encode())
    h.update(source.content_digest(indices).encode())
    return h.hexdigest()[:16]


def check_same_data(state: dict | None, fingerprints: dict[str, str], out) -> None:
    """Refuse to resume the run in ``out`` (its ``last.pt`` ``state``) on data whose splits changed since it began
    (for an image folder: a file added, removed, renamed or rewritten with another size)."""
    saved = (state or {}).get("data_fingerprints")
    if not isinstance(saved, dict):
        return  # not resuming, or a checkpoint from before fingerprints were kept
    changed = sorted(k for k in set(saved) | set(fingerprints) if saved.get(k) != fingerprints.get(k))
    if changed:
        raise UserError(f"the data changed since the run in {out} began (split {', '.join(changed)} differs)",
                        "restore the data as it was, or pass --overwrite to start again")
