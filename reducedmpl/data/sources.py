"""Image data sources: parse a spec string and load the images and labels it names.

Supported specs (see ``SPEC_FORMS``): ``digits``, ``mnist:DIR``, ``cifar10:DIR``, ``cifar100:DIR``,
``folder:DIR`` and ``npz:FILE``. Every problem a user can fix (missing or truncated file, unreadable
image, empty data set, labels out of range, ...) raises :class:`DataError` naming the path and the fix.

Array-backed sources hold all pixels in memory as ``uint8 (N, H, W, C)``; ``folder`` sources keep only
the sorted file list and decode an image when :meth:`Source.load_image` is called.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from reducedmpl.errors import DataError

SPEC_FORMS = (
    "digits (scikit-learn's built-in 8x8 digits)",
    "mnist:DIR (IDX files such as train-images-idx3-ubyte[.gz]; also Fashion-MNIST / KMNIST)",
    "cifar10:DIR (the cifar-10-batches-py folder or a folder containing it)",
    "cifar100:DIR (the cifar-100-python folder or a folder containing it)",
    "folder:DIR (DIR/CLASS/IMAGE files, optionally DIR/train + DIR/val or DIR/test)",
    "npz:FILE (arrays x (N,H,W[,C]) and y (N,), optional class_names)",
)
MAX_CLASSES = 100_000  # classes a source may have (so a stray label cannot make a billion class names)
KINDS = ("digits", "mnist", "cifar10", "cifar100", "folder", "npz")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

_DIGEST_TAG = b"reducedmpl-source-digest-v1"
_DIGEST_CHUNK = 4096  # rows hashed per update for array sources (fixed: part of the digest definition)


def spec_help(kind: str | None = None) -> str:
    """How to write a data source: every form, or only ``kind``'s."""
    forms = [f for f in SPEC_FORMS if kind is None or f.split(":")[0].split(" ")[0] == kind]
    return ("check the path; expected " if kind else "use one of: ") + "; ".join(forms or SPEC_FORMS)


# --------------------------------------------------------------------------------------------------
# The Source record
# --------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A loaded data set: labels and class names, plus pixels (array sources) or file paths (folder).

    Row ids are row indices ``0..N-1``; they are stable for the same files on disk.
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
        """Return row ``i`` as a new ``uint8 (H, W, C)`` array; an unreadable file raises DataError."""
        i = self._check_row(i)
        if self.images is not None:
            return np.array(self.images[i], dtype=np.uint8, copy=True)
        if self.files is None:
            raise RuntimeError(f"source {self.spec!r} has neither images nor files")
        return _read_image_file(self.files[i], self.in_chans)

    def content_digest(self, indices: np.ndarray) -> str:
        """SHA-256 hex digest over the given rows, in the given order: row ids, labels and content.

        Array sources hash the image bytes (and the image shape). Folder sources hash, for each row,
        the file's path relative to the source root and its size in bytes, not the pixels: this is
        cheap for large folders and still changes when a file is added, renamed, moved to another
        class or rewritten with a different size (a same-size in-place edit is not detected).
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
        if self.files is None:
            raise RuntimeError(f"source {self.spec!r} has neither images nor files")
        h.update(b"files")
        root = self.root or os.path.dirname(os.path.commonpath(self.files))
        for row in idx.tolist():
            path = self.files[row]
            rel = os.path.relpath(path, root).replace(os.sep, "/").encode("utf-8")
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                raise DataError(
                    f"cannot read image file {path}: {exc.strerror or exc}",
                    "restore the file or reload the data source",
                ) from None
            h.update(struct.pack("<qqq", row, int(self.labels[row]), len(rel)) + rel + struct.pack("<q", size))
        return h.hexdigest()


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


def _read_image_file(path: str, in_chans: int) -> np.ndarray:
    """Decode one image file with PIL into uint8 (H, W, C); any failure becomes a DataError."""
    arr = np.asarray(read_pil_image(path, "RGB" if in_chans == 3 else "L"), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


# --------------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------------


def load_source(spec: str) -> Source:
    """Parse ``spec`` (e.g. ``"mnist:/data/mnist"``) and load that data source."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data source spec {spec!r}", spec_help())
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind not in KINDS:
        raise DataError(f"unknown data source {spec!r}", spec_help())
    if kind == "digits":
        if arg:
            raise DataError(f"data source {spec!r}: 'digits' takes no path", spec_help())
        return _load_digits(spec)
    if not arg:
        raise DataError(f"data source {spec!r} is missing its path (expected '{kind}:PATH')", spec_help())
    path = os.path.abspath(os.path.expanduser(arg))
    if kind == "npz":
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            raise DataError(f"data source {spec!r}: {path} {what}", spec_help(kind))
    elif not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise DataError(f"data source {spec!r}: {path} {what}", spec_help(kind))
    from .cifar import load_cifar10, load_cifar100
    from .mnist import load_mnist

    loaders: dict[str, Callable[[str, str], Source]] = {
        "mnist": load_mnist,
        "cifar10": load_cifar10,
        "cifar100": load_cifar100,
        "folder": _load_folder,
        "npz": _load_npz,
    }
    return loaders[kind](spec, path)


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


# --------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------


def _load_digits(spec: str) -> Source:
    """scikit-learn's 1,797 8x8 digits, values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return finish(
        Source(
            spec=spec,
            kind="digits",
            class_names=[str(d) for d in range(10)],
            labels=labels,
            in_chans=1,
            images=images[:, :, :, None],
            image_size=(8, 8),
        )
    )


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------

_IGNORED_DIRS = frozenset({"__MACOSX"})


def _visible_subdirs(path: str) -> list[str]:
    """Names of non-hidden sub-directories, sorted."""
    try:
        entries = list(os.scandir(path))
    except OSError as exc:
        raise DataError(f"cannot list {path}: {exc.strerror or exc}", "check the folder and its permissions") from None
    return sorted(
        e.name
        for e in entries
        if not e.name.startswith(".") and e.name not in _IGNORED_DIRS and e.is_dir(follow_symlinks=True)
    )


class _FolderListing:
    """Lists the image files of a folder source once each: real paths, no loops, no duplicates, none empty.

    Symbolic links are followed, but a folder reached a second time (a link loop such as ``cat/up -> ..``, or the
    same folder linked under two classes) and a file reached a second time (a link or a hard link to a listed
    file) are refused: they would give one image two rows, or two labels, and put it in two splits. A 0-byte file
    is refused here, before a run starts, rather than when an epoch first reads it.
    """

    def __init__(self, root: str):
        self.root = root
        self.dirs: dict[str, str] = {os.path.realpath(root): root}  # real path -> path it was first reached by
        self.files: dict[tuple[int, int], str] = {}  # (device, inode) -> path it was first reached by

    def _enter(self, path: str) -> None:
        real = os.path.realpath(path)
        first = self.dirs.get(real)
        if first is not None:
            loop = path.startswith(first.rstrip(os.sep) + os.sep)  # reached again from inside itself
            what = "a symbolic link loop" if loop else "a folder linked twice"
            raise DataError(f"folder source {self.root}: {path} is {first} again ({what})",
                            "remove the symbolic link, so that every folder is reached once")
        self.dirs[real] = path

    def _add_file(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image file {path}: {exc.strerror or exc}",
                            "fix or remove the file (a broken symbolic link?)") from None
        first = self.files.get((st.st_dev, st.st_ino))
        if first is not None:
            raise DataError(f"folder source {self.root}: {path} is the same file as {first} (a link or a "
                            "duplicate)", "remove one of them, so that every image is listed once")
        if st.st_size == 0:
            raise DataError(f"image file {path} is empty (0 bytes)", "replace or delete the broken file")
        self.files[(st.st_dev, st.st_ino)] = path

    def class_files(self, class_dir: str) -> list[str]:
        """Image files under ``class_dir`` (recursively, sorted), skipping hidden files and folders."""
        self._enter(class_dir)
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for d in dirnames:
                self._enter(os.path.join(dirpath, d))
            for name in filenames:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(os.path.join(dirpath, name))
        found.sort()
        for path in found:
            self._add_file(path)
        return found


def _folder_layout(root: str) -> list[tuple[str, bool]]:
    """The class-folder roots to read and whether each is an official test split."""
    subdirs = _visible_subdirs(root)
    splits = {"train", "val", "test"}
    if "train" in subdirs and set(subdirs) <= splits and _visible_subdirs(os.path.join(root, "train")):
        layout = [(os.path.join(root, "train"), False)]
        for name in ("val", "test"):
            if name in subdirs:
                split_dir = os.path.join(root, name)
                if not _visible_subdirs(split_dir):
                    raise DataError(
                        f"{split_dir} holds no class sub-folders",
                        f"arrange it like train/ ({name}/CLASS/IMAGE) or move it out of {root}",
                    )
                layout.append((split_dir, True))
        return layout
    return [(root, False)]


def _load_folder(spec: str, path: str) -> Source:
    """ImageFolder layout: DIR/CLASS/IMAGE, or DIR/train/CLASS/IMAGE plus DIR/val or DIR/test."""
    layout = _folder_layout(path)
    class_names = sorted({c for split_dir, _ in layout for c in _visible_subdirs(split_dir)})
    if not class_names:
        raise DataError(
            f"{path} holds no class sub-folders",
            "arrange images as DIR/CLASS/IMAGE (one sub-folder per class)",
        )
    class_index = {name: k for k, name in enumerate(class_names)}
    files: list[str] = []
    labels: list[int] = []
    official: list[bool] = []
    counts = dict.fromkeys(class_names, 0)
    listing = _FolderListing(path)
    for split_dir, _ in layout:
        if split_dir != path:
            listing._enter(split_dir)
    for split_dir, is_test in layout:
        for name in _visible_subdirs(split_dir):
            found = listing.class_files(os.path.join(split_dir, name))
            files += found
            labels += [class_index[name]] * len(found)
            official += [is_test] * len(found)
            counts[name] += len(found)
    if not files:
        raise DataError(
            f"no image files in {path}",
            f"add images with one of the extensions {', '.join(sorted(IMAGE_EXTENSIONS))} under DIR/CLASS/",
        )
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {path} hold no image files",
            "add images to them or remove them",
        )
    return finish(
        Source(
            spec=spec,
            kind="folder",
            class_names=class_names,
            labels=np.asarray(labels, dtype=np.int64),
            in_chans=3,
            files=files,
            official_test=np.asarray(official, dtype=bool) if len(layout) > 1 else None,
            root=path,
        )
    )


# --------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------


def _npz_images(x: np.ndarray, path: str) -> np.ndarray:
    """Validate ``x`` and return uint8 (N, H, W, C)."""
    if x.ndim == 3:
        x = x[:, :, :, None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise DataError(
            f"{path}: 'x' has shape {x.shape}, expected (N, H, W) or (N, H, W, C) with C = 1 or 3",
            "save the images as an (N, H, W) or (N, H, W, C) array",
        )
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(
                f"{path}: float 'x' must hold values in [0, 1]",
                "scale the images to [0, 1] or save them as uint8 0..255",
            )
        return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: integer 'x' must hold values 0..255", "save the images as uint8")
        return x.astype(np.uint8)
    raise DataError(f"{path}: 'x' has dtype {x.dtype}", "save the images as uint8 or float in [0, 1]")


def _load_npz(spec: str, path: str) -> Source:
    """An .npz with ``x`` (images), ``y`` (labels) and optional ``class_names``."""
    try:
        with open(path, "rb") as f:  # our own handle: np.load leaks its file when parsing fails
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a single .npy array, not an .npz archive", "save it with np.savez")
            with z:
                keys = set(z.files)
                missing = [k for k in ("x", "y") if k not in keys]
                if missing:
                    raise DataError(
                        f"{path} has no array {' or '.join(repr(k) for k in missing)} "
                        f"(found: {', '.join(sorted(keys)) or 'nothing'})",
                        "save it with np.savez(FILE, x=images, y=labels[, class_names=names])",
                    )
                x, y = z["x"], z["y"]
                names_arr = z["class_names"] if "class_names" in keys else None
    except DataError:
        raise
    except Exception as exc:  # BadZipFile, ValueError (pickled objects), OSError, EOFError, ...
        raise DataError(
            f"cannot read {path} as an .npz archive ({type(exc).__name__}: {exc})",
            "save it with np.savez using plain (non-object) arrays",
        ) from None
    images = _npz_images(x, path)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_)):
        raise DataError(f"{path}: 'y' is {y.dtype} {y.shape}, expected integer labels (N,)", "save y as an int array")
    if y.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: 'x' holds {images.shape[0]} images but 'y' holds {y.shape[0]} labels",
            "save as many labels as images",
        )
    labels = y.astype(np.int64)
    if names_arr is not None:
        if names_arr.ndim != 1 or names_arr.dtype.kind not in ("U", "S"):
            raise DataError(
                f"{path}: 'class_names' is {names_arr.dtype} {names_arr.shape}, expected a 1-D string array",
                "save class_names as np.array(['cat', 'dog', ...])",
            )
        class_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names_arr.tolist()]
    else:  # one name per class up to the largest label: its range is checked before the names are made
        top = int(labels.max()) if labels.size else -1
        if top >= MAX_CLASSES:
            raise DataError(f"data source {spec!r} has label {top}; without class_names the labels are the classes "
                            f"0..K-1, and K may be at most {MAX_CLASSES:,}",
                            "number the classes 0..K-1, or save class_names with the labels")
        class_names = [str(k) for k in range(top + 1)] if top >= 0 else []
    return finish(
        Source(
            spec=spec,
            kind="npz",
            class_names=class_names,
            labels=labels,
            in_chans=int(images.shape[3]),
            images=images,
            image_size=(int(images.shape[1]), int(images.shape[2])),
        )
    )
