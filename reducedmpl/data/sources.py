"""Image data sources: parse a spec string and load the images and labels it names.

Every kind of source is one row of ``KINDS`` (how to write it, what its argument is, its loader); the loaders of
``mnist:``, ``cifar10:``/``cifar100:``, ``hf:`` and ``wds:`` live in their own modules, which share only
:mod:`reducedmpl.data.base` with this one. Every problem a user can fix (missing or truncated file, unreadable
image, empty data set, labels out of range, ...) raises :class:`DataError` naming the path and the fix.

Array-backed sources hold all pixels in memory as ``uint8 (N, H, W, C)``; ``folder`` sources keep only the sorted
file list, ``hf`` and ``wds`` sources a reader of encoded rows, and decode an image when it is asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import DataError
from .base import Source, finish, read_pil_image
from .cifar import load_cifar10, load_cifar100
from .hf import load_hf, local_hf_path
from .mnist import load_mnist
from .wds import load_wds, pattern_problem

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["KINDS", "SPEC_FORMS", "Source", "finish", "load_source", "read_pil_image", "spec_help",
           "spec_problem"]

MAX_CLASSES = 100_000  # classes a source may have (so a stray label cannot make a billion class names)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class SourceKind:
    """One kind of data source: how to write it, what its argument is, and its loader."""

    form: str  # e.g. "mnist:DIR (...)", for help and error messages
    argument: str  # "none", "dir", "file", "name" (a folder or a dataset name) or "pattern" (shard files)
    load: Callable[[str, str, "DataConfig | None"], Source]  # (spec, argument, data settings) -> Source


def _plain(loader: Callable[[str, str], Source]) -> Callable[[str, str, Any], Source]:
    """A loader that takes no data settings, in the table's form."""
    return lambda spec, arg, options: loader(spec, arg)


def _digits_loader(spec: str, arg: str, options: Any) -> Source:
    return _load_digits(spec)


KINDS: dict[str, SourceKind] = {
    "digits": SourceKind("digits (scikit-learn's built-in 8x8 digits)", "none", _digits_loader),
    "mnist": SourceKind("mnist:DIR (IDX files such as train-images-idx3-ubyte[.gz]; also Fashion-MNIST / KMNIST)",
                        "dir", _plain(load_mnist)),
    "cifar10": SourceKind("cifar10:DIR (the cifar-10-batches-py folder or a folder containing it)", "dir",
                          _plain(load_cifar10)),
    "cifar100": SourceKind("cifar100:DIR (the cifar-100-python folder or a folder containing it)", "dir",
                           _plain(load_cifar100)),
    "folder": SourceKind("folder:DIR (DIR/CLASS/IMAGE files, optionally DIR/train + DIR/val or DIR/test)", "dir",
                         lambda spec, arg, options: _load_folder(spec, arg)),
    "npz": SourceKind("npz:FILE (arrays x (N,H,W[,C]) and y (N,), optional class_names)", "file",
                      lambda spec, arg, options: _load_npz(spec, arg)),
    "hf": SourceKind("hf:NAME_OR_DIR (a Hugging Face dataset: a folder of parquet or arrow files, a save_to_disk "
                     "folder, or a hub dataset in the local cache)", "name", load_hf),
    "wds": SourceKind("wds:PATTERN (WebDataset .tar shards, e.g. shards-{000000..000009}.tar)", "pattern",
                      load_wds),
}
SPEC_FORMS = tuple(k.form for k in KINDS.values())


def spec_help(kind: str | None = None) -> str:
    """How to write a data source: ``kind``'s form with what it reads, or every form in short (a message stays one
    short line; the README's Data section describes each)."""
    forms = [f for f in SPEC_FORMS if kind is not None and f.split(":")[0].split(" ")[0] == kind]
    if forms:
        return "check the path; expected " + "; ".join(forms)
    return "use one of: " + ", ".join(f.split(" (")[0] for f in SPEC_FORMS)


# --------------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------------


def _parse(spec: str) -> tuple[str, str]:
    """``(kind, argument)`` of a spec; an unknown kind or a missing argument is a DataError."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data source spec {spec!r}", spec_help())
    kind, _, arg = spec.strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if kind not in KINDS:
        raise DataError(f"unknown data source {spec!r}", spec_help())
    if KINDS[kind].argument == "none":
        if arg:
            raise DataError(f"data source {spec!r}: {kind!r} takes no path", spec_help())
    elif not arg:
        raise DataError(f"data source {spec!r} is missing its path (expected '{kind}:PATH')", spec_help())
    return kind, arg


def spec_problem(spec: str) -> str | None:
    """Why ``spec`` cannot name data on this machine, checked cheaply (nothing is read): e.g. ``"/x does not
    exist"``; None when it may (an unknown kind is left to :func:`load_source` to explain)."""
    try:
        kind, arg = _parse(spec)
    except DataError:
        return None
    argument = KINDS[kind].argument
    if argument in ("dir", "file"):
        path = os.path.abspath(os.path.expanduser(arg))
        return None if os.path.exists(path) else f"{path} does not exist"
    if argument == "name":
        local = local_hf_path(arg)
        return f"{local} does not exist" if local is not None and not os.path.exists(local) else None
    if argument == "pattern":
        return pattern_problem(arg)
    return None


def load_source(spec: str, options: DataConfig | None = None) -> Source:
    """Parse ``spec`` (e.g. ``"mnist:/data/mnist"``) and load that data source; ``options`` are the data settings
    that some kinds read (``hf:``'s config, splits and columns; ``wds:``'s fields)."""
    kind, arg = _parse(spec)
    argument = KINDS[kind].argument
    if argument in ("dir", "file"):
        arg = os.path.abspath(os.path.expanduser(arg))
        want_file = argument == "file"
        if not (os.path.isfile(arg) if want_file else os.path.isdir(arg)):
            what = "does not exist"
            if os.path.exists(arg):
                what = "is a directory, not a file" if want_file else "is a file, not a directory"
            raise DataError(f"data source {spec!r}: {arg} {what}", spec_help(kind))
    return KINDS[kind].load(spec, arg, options)


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
