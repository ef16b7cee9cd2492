"""MNIST-format sources: the canonical IDX files (MNIST, Fashion-MNIST, KMNIST), plain or gzipped."""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from ..errors import DataError
from .base import Source, finish


# --------------------------------------------------------------------------------------------------
# MNIST (IDX files)
# --------------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def _mnist_names(split: str, what: str) -> list[str]:
    """Candidate file names for one IDX file, raw before gzip: e.g. t10k-images-idx3-ubyte[.gz]."""
    idx = "idx3" if what == "images" else "idx1"
    bases = [f"{split}-{what}-{idx}-ubyte", f"{split}-{what}.{idx}-ubyte"]
    return bases + [b + ".gz" for b in bases]


def _find_first(folder: str, names: list[str]) -> str | None:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _has_mnist_files(folder: str) -> bool:
    return any(
        _find_first(folder, _mnist_names(split, what)) is not None
        for split in ("train", "t10k")
        for what in ("images", "labels")
    )


def _mnist_folder(path: str) -> str:
    """The folder holding the IDX files: DIR itself, DIR/raw or DIR/*/raw (torchvision's layout)."""
    if _has_mnist_files(path):
        return path
    candidates = [os.path.join(path, "raw")]
    try:
        candidates += [os.path.join(e.path, "raw") for e in sorted(os.scandir(path), key=lambda e: e.name)]
    except OSError:
        pass
    found = [c for c in candidates if os.path.isdir(c) and _has_mnist_files(c)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(
            f"{path} holds several MNIST-style data sets: {', '.join(found)}",
            "point the spec at one of those folders",
        )
    expected = ", ".join(_mnist_names("train", "images")[:1] + _mnist_names("train", "labels")[:1])
    raise DataError(
        f"no MNIST IDX files in {path}",
        f"the folder must hold {expected} and/or t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        "(each optionally .gz), as in the canonical download",
    )


def _read_maybe_gzip(path: str) -> bytes:
    """Read a file, gunzipping it when it starts with the gzip magic bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check the file and its permissions") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path} is a truncated or corrupt gzip file ({exc})", "download the file again"
        ) from None


def _parse_idx(path: str, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes whose header must carry ``magic``; check its length."""
    data = _read_maybe_gzip(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    (found,) = struct.unpack(">I", data[:4]) if len(data) >= 4 else (magic,)
    if found != magic:
        raise DataError(
            f"{path} is not an IDX {kind} file (magic number 0x{found:08X}, expected 0x{magic:08X})",
            "check that the file is the MNIST-format "
            + ("images (idx3)" if kind == "images" else "labels (idx1)")
            + " file it is named after",
        )
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: {len(data)} bytes, shorter than the {header}-byte IDX header",
            "download the file again",
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: {len(data)} bytes, expected {expected} for shape {tuple(dims)}",
            "download the file again",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist_pair(folder: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Images (N, H, W) and labels (N,) of one split, or None when neither file is present."""
    img_path = _find_first(folder, _mnist_names(split, "images"))
    lbl_path = _find_first(folder, _mnist_names(split, "labels"))
    if img_path is None and lbl_path is None:
        return None
    if img_path is None or lbl_path is None:
        have, missing_what = (lbl_path, "images") if img_path is None else (img_path, "labels")
        raise DataError(
            f"{have} has no matching {missing_what} file in {folder}",
            f"add {_mnist_names(split, missing_what)[0]} (or its .gz) next to it",
        )
    images = _parse_idx(img_path, _IDX_IMAGES_MAGIC)
    labels = _parse_idx(lbl_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels",
            "use an images file and labels file from the same download",
        )
    return images, labels


def load_mnist(spec: str, path: str) -> Source:
    """MNIST / Fashion-MNIST / KMNIST IDX files: train rows first, then t10k rows."""
    folder = _mnist_folder(path)
    parts: list[tuple[np.ndarray, np.ndarray, bool]] = []
    for split, is_test in (("train", False), ("t10k", True)):
        pair = _load_mnist_pair(folder, split)
        if pair is not None:
            parts.append((pair[0], pair[1], is_test))
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DataError(
            f"the train and t10k images in {folder} have different sizes {sorted(shapes)}",
            "use files from the same data set",
        )
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    official_test = np.concatenate([np.full(p[0].shape[0], p[2], dtype=bool) for p in parts])
    h, w = images.shape[1:]
    return finish(
        Source(
            spec=spec,
            kind="mnist",
            class_names=[str(d) for d in range(10)],
            labels=labels,
            in_chans=1,
            images=images[:, :, :, None],
            image_size=(int(h), int(w)),
            official_test=official_test,
        )
    )
