"""CIFAR sources: the "python version" pickle batches, read with an unpickler that builds only numpy arrays."""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable

import numpy as np

from ..errors import DataError
from .base import Source, finish


# --------------------------------------------------------------------------------------------------
# CIFAR (python-version pickle batches)
# --------------------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and imports nothing else."""

    def __init__(self, file: io.BufferedIOBase, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        factory = _PICKLE_ALLOWED.get((module, name))
        if factory is None:
            raise DataError(
                f"refusing to load {self._path}: it asks to import {module}.{name}, which a CIFAR "
                "batch never needs (the file may be malicious)",
                "use the original files from the CIFAR download",
            )
        return factory()


def _safe_unpickle(path: str) -> Any:
    """Unpickle a CIFAR batch with :class:`_ArrayOnlyUnpickler`; any failure is a DataError."""
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check the file and its permissions") from None
    except (EOFError, pickle.UnpicklingError) as exc:
        raise DataError(
            f"{path} is truncated or not a pickle file ({type(exc).__name__}: {exc})",
            "download and extract the CIFAR archive again",
        ) from None
    except Exception as exc:  # malformed content: bad array state, memory, recursion, ...
        raise DataError(
            f"{path} is malformed ({type(exc).__name__}: {exc})",
            "download and extract the CIFAR archive again",
        ) from None


def _str_keys(obj: Any, path: str) -> dict[str, Any]:
    """A batch dict with bytes keys (Python 2 pickles) turned into str keys."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR batch",
            "download and extract the CIFAR archive again",
        )
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        out[str(key)] = value
    return out


def _get(batch: dict[str, Any], key: str, path: str) -> Any:
    if key not in batch:
        raise DataError(
            f"{path} has no '{key}' entry (found: {', '.join(sorted(batch)) or 'nothing'})",
            "download and extract the CIFAR archive again",
        )
    return batch[key]


def _names(value: Any, key: str, path: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{path}: '{key}' is not a non-empty list of names", "download the archive again")
    names = []
    for v in value:
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if not isinstance(v, str):
            raise DataError(f"{path}: '{key}' holds a {type(v).__name__}, not a name", "download the archive again")
        names.append(v)
    return names


def _cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels (N,) of one batch file."""
    batch = _str_keys(_safe_unpickle(path), path)
    data = _get(batch, "data", path)
    raw_labels = _get(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{path}: 'data' is {desc}, expected a uint8 array of shape (N, 3072)",
            "download and extract the CIFAR archive again",
        )
    try:
        labels = np.asarray(raw_labels)
        ok = labels.ndim == 1 and (labels.size == 0 or np.issubdtype(labels.dtype, np.integer))
    except Exception:
        ok = False
    if not ok:
        raise DataError(f"{path}: '{label_key}' is not a list of integer labels", "download the archive again")
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels",
            "download and extract the CIFAR archive again",
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _cifar_folder(path: str, folder_name: str, files: list[str], archive: str) -> str:
    """DIR itself when it holds any batch file, else DIR/<folder_name>; otherwise a DataError listing files."""
    for candidate in (path, os.path.join(path, folder_name)):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in files):
            return candidate
    hint = ""
    if os.path.isfile(os.path.join(path, archive)):
        hint = f"extract {os.path.join(path, archive)} first (tar xzf {archive}); "
    raise DataError(
        f"no CIFAR batches in {path} (looked there and in {folder_name}/)",
        f"{hint}point the spec at the {folder_name} folder holding {', '.join(files)}",
    )


def _load_cifar(spec: str, path: str, kind: str) -> Source:
    if kind == "cifar10":
        folder_name, archive = "cifar-10-batches-py", "cifar-10-python.tar.gz"
        train, test, meta = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
        label_key, names_key = "labels", "label_names"
    else:
        folder_name, archive = "cifar-100-python", "cifar-100-python.tar.gz"
        train, test, meta = ["train"], ["test"], "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    expected = train + test + [meta]
    folder = _cifar_folder(path, folder_name, expected, archive)
    missing = [f for f in expected if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(
            f"{folder} is missing {', '.join(missing)}",
            f"a complete {folder_name} folder holds {', '.join(expected)}; extract {archive} again",
        )
    meta_path = os.path.join(folder, meta)
    meta_dict = _str_keys(_safe_unpickle(meta_path), meta_path)
    class_names = _names(_get(meta_dict, names_key, meta_path), names_key, meta_path)
    parts = [(_cifar_batch(os.path.join(folder, f), label_key), f in test) for f in train + test]
    images = np.concatenate([p[0][0] for p in parts])
    labels = np.concatenate([p[0][1] for p in parts])
    official_test = np.concatenate([np.full(p[0][1].shape[0], p[1], dtype=bool) for p in parts])
    return finish(
        Source(
            spec=spec,
            kind=kind,
            class_names=class_names,
            labels=labels,
            in_chans=3,
            images=images,
            image_size=(32, 32),
            official_test=official_test,
        )
    )


def load_cifar10(spec: str, path: str) -> Source:
    """CIFAR-10 python batches: data_batch_1..5 then test_batch."""
    return _load_cifar(spec, path, "cifar10")


def load_cifar100(spec: str, path: str) -> Source:
    """CIFAR-100 python batches: train then test, fine labels."""
    return _load_cifar(spec, path, "cifar100")
