"""The store's format: schema version, fields, metadata attributes and the run key."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from ..errors import ArtifactError

# 2: stored views (``views``, ``view_policy`` and the ``view_*`` tables); a version-1 store reads as one view
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")
LOGIT_DTYPES = ("float16", "float32")
MASTER_NAME = "targets.h5"

ROW_FIELDS = ("id", "label", "split")
DENSE_FIELDS = ("logits",)
TOPK_FIELDS = ("topk_logits", "topk_index", "logsumexp")
VIEW_PREFIX = "view_"  # the augmented views 1..V-1 of each row: view_logits (N, V-1, C), view_topk_* (N, V-1, K)
MAX_VIEWS = 256

LIBVER = ("v110", "latest")  # VDS and large (dense-stored) attributes need the 1.10 format
CHUNK_TARGET = 256 * 1024
CHUNK_MAX = 1024 * 1024
COLUMN_CHUNK_ROWS = 65536
MERGE_GAP_BYTES = 32 * 1024  # rows closer than this are read as one block
MIN_REMAINDER = 1e-12  # floor on top-k remainder mass (absorbs float16 rounding)
REGENERATE = "rerun `reducedmpl precompute` to rebuild the targets store"


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
    views: int = 1  # view 0 is the clean input; views 1..V-1 are augmented inputs rebuilt from view_policy
    view_policy: dict = field(default_factory=dict)

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
        if not 1 <= self.views <= MAX_VIEWS:
            raise ValueError(f"views={self.views} must be in 1..{MAX_VIEWS}")
        if self.views > 1 and not self.view_policy:
            raise ValueError("a store with augmented views must record the view policy that rebuilds them")

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
            "views": int(self.views),
            "view_policy": json.dumps(self.view_policy, sort_keys=True),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreMeta:
        """Parse root attributes; raises KeyError/ValueError when they are malformed."""
        class_names = [as_str(x) for x in np.atleast_1d(np.asarray(attrs["class_names"], dtype=object))]
        fingerprints = json.loads(as_str(attrs["fingerprints"]))
        config = json.loads(as_str(attrs["config"]))
        policy = json.loads(as_str(attrs.get("view_policy", "{}")))  # version 1: one view, no policy
        if not isinstance(fingerprints, dict) or not isinstance(config, dict) or not isinstance(policy, dict):
            raise ValueError("fingerprints, config and view_policy must be JSON objects")
        meta = cls(
            teacher_arch=as_str(attrs["teacher_arch"]),
            teacher_sha256=as_str(attrs["teacher_sha256"]),
            class_names=class_names,
            data_spec=as_str(attrs["data_spec"]),
            split_seed=int(attrs["split_seed"]),
            fingerprints={str(k): str(v) for k, v in fingerprints.items()},
            temperature=float(attrs["temperature"]),
            dtype=as_str(attrs["dtype"]),
            topk=int(attrs["topk"]),
            tool_version=as_str(attrs["tool_version"]),
            config=config,
            run_key=as_str(attrs["run_key"]),
            views=int(attrs.get("views", 1)),
            view_policy=policy,
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


def as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = np.array(list(value), dtype=h5py.string_dtype())
        obj.attrs[key] = value


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
