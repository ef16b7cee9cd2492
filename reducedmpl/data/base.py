"""The :class:`Source` record every data source loads into, and what all sources share: decoding an encoded image,
the checks of a finished source, and the content digest behind the split fingerprints.

Every source module (``sources.py`` and the formats beside it) imports this module; it imports none of them.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import DataError

_DIGEST_TAG = b"reducedmpl-source-digest-v1"
_DIGEST_CHUNK = 4096  # rows hashed per update for array sources (fixed: part of the digest definition)


class RowReader(Protocol):
    """Reads row ``i`` of a source whose encoded images are neither in memory nor files of their own (a dataset's
    rows, a tar shard's samples). It must pickle small: DataLoader worker processes receive it."""

    identity: bytes  # what the rows are read from (fingerprints, shard names and sizes); part of every digest

    def __call__(self, row: int) -> Any:
        """Row ``row`` decoded as a PIL image; a row that cannot be decoded raises DataError."""

    def row_key(self, row: int) -> bytes:
        """What names row ``row`` in its data (a sample key): part of every digest that holds the row."""


@dataclass
class Source:
    """A loaded data set: labels and class names, plus pixels (array sources), file paths (folder) or a
    :class:`RowReader` (encoded images read by row: ``hf:``, ``wds:``).

    Row ids are row indices ``0..N-1``; they are stable for the same data on disk.
    """

    spec: str
    kind: str
    class_names: list[str]
    labels: np.ndarray
    in_chans: int
    images: np.ndarray | None = None
    files: list[str] | None = None
    image_size: tuple[int, int] | None = None
    official_test: np.ndarray | None = None
    root: str | None = None  # folder sources: the directory that ``files`` are relative to in digests
    reader: RowReader | None = None  # sources of encoded images that are not files: row -> PIL image

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _check_row(self, i: int) -> int:
        n = len(self)
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"row index must be an integer, got {type(i).__name__}")
        if not 0 <= int(i) < n:
            raise IndexError(f"row {int(i)} is out of range for {self.spec!r} with {n} rows")
        return int(i)

    def load_image(self, i: int) -> np.ndarray:
        """Return row ``i`` as a new ``uint8 (H, W, C)`` array; an unreadable image raises DataError."""
        i = self._check_row(i)
        if self.images is not None:
            return np.array(self.images[i], dtype=np.uint8, copy=True)
        arr = np.asarray(self.pil_image(i, "RGB" if self.in_chans == 3 else "L"), dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def pil_image(self, i: int, mode: str = "RGB") -> Any:
        """Row ``i`` of a source of encoded images (folder files, or rows read by ``reader``) as a PIL image in
        ``mode``; a row that cannot be decoded raises DataError."""
        if self.reader is not None:
            return self.reader(int(i)).convert(mode)
        if self.files is None:
            raise RuntimeError(f"source {self.spec!r} holds no encoded images")
        return read_pil_image(self.files[int(i)], mode)

    def content_digest(self, indices: np.ndarray) -> str:
        """SHA-256 hex digest over the given rows, in the given order: row ids, labels and content.

        Array sources hash the image bytes (and the image shape). Folder sources hash, for each row,
        the file's path relative to the source root and its size in bytes, not the pixels: this is
        cheap for large folders and still changes when a file is added, renamed, moved to another
        class or rewritten with a different size (a same-size in-place edit is not detected). Sources with a
        reader hash its ``identity`` (what the rows are read from) and each row's key.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise TypeError("indices must be a 1-D array of integer row ids")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row ids must be in 0..{len(self) - 1} for {self.spec!r}")
        h = hashlib.sha256(_DIGEST_TAG)
        h.update(struct.pack("<q", idx.size))
        if self.images is not None:
            h.update(b"pixels" + struct.pack("<3q", *self.images.shape[1:]))
            for start in range(0, idx.size, _DIGEST_CHUNK):
                chunk = idx[start : start + _DIGEST_CHUNK]
                h.update(chunk.astype("<i8").tobytes())
                h.update(self.labels[chunk].astype("<i8").tobytes())
                h.update(np.ascontiguousarray(self.images[chunk]).tobytes())
            return h.hexdigest()
        if self.reader is not None:
            h.update(b"reader" + struct.pack("<q", len(self.reader.identity)) + self.reader.identity)
            for row in idx.tolist():
                key = self.reader.row_key(row)
                h.update(struct.pack("<qqq", row, int(self.labels[row]), len(key)) + key)
            return h.hexdigest()
        if self.files is None:
            raise RuntimeError(f"source {self.spec!r} has neither images, files nor a reader")
        self._digest_files(h, idx)
        return h.hexdigest()

    def _digest_files(self, h: Any, idx: np.ndarray) -> None:
        h.update(b"files")
        root = self.root or os.path.dirname(os.path.commonpath(self.files))
        prefix = root if root.endswith(os.sep) else root + os.sep
        for row in idx.tolist():
            path = self.files[row]
            # a listed file is root + names joined (no "." or ".." in them): the slice is its relpath, 10x faster
            rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
            rel = rel.replace(os.sep, "/").encode("utf-8")
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                raise DataError(
                    f"cannot read image file {path}: {exc.strerror or exc}",
                    "restore the file or reload the data source",
                ) from None
            h.update(struct.pack("<qqq", row, int(self.labels[row]), len(rel)) + rel + struct.pack("<q", size))


def read_pil_image(path: str, mode: str = "RGB") -> Any:
    """Decode one image file with PIL, converted to ``mode``; any failure becomes a DataError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert(mode)  # convert() decodes: a broken file fails here, inside the try
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(
            f"cannot read image file {path}: {type(exc).__name__}: {exc}",
            "replace or delete the corrupt file",
        ) from None


def decode_image(data: bytes, what: str, fix: str) -> Any:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) with PIL; a failure is a DataError naming ``what``."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))  # an in-memory buffer: nothing to close
        im.load()  # decodes: a broken image fails here, inside the try
        return im
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "its bytes", str(exc))
        raise DataError(f"cannot decode the image of {what}: {type(exc).__name__}: {reason}", fix) from None


def finish(source: Source) -> Source:
    """Check invariants shared by all sources: non-empty, int64 labels in range."""
    n = len(source)
    where = source.spec
    if n == 0:
        raise DataError(f"data source {where!r} holds no images", "point it at a non-empty data set")
    if source.num_classes == 0:
        raise DataError(f"data source {where!r} has no classes", "provide at least one class")
    labels = source.labels
    if labels.min() < 0 or labels.max() >= source.num_classes:
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataError(
            f"data source {where!r} has label {bad}, outside 0..{source.num_classes - 1}",
            "fix the labels or the list of class names",
        )
    if source.images is not None:
        assert source.images.dtype == np.uint8 and source.images.ndim == 4
        assert source.images.shape[0] == n and source.images.shape[3] == source.in_chans
    if source.official_test is not None:
        assert source.official_test.dtype == np.bool_ and source.official_test.shape == (n,)
    return source
