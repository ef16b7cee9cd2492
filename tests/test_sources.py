"""Tests for reducedmpl.data.sources: tiny files in the real on-disk formats, written into tmp_path."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import MNIST_DIR as MNIST_T10K  # ../shared/data/mnist-t10k, beside the repository
from reducedmpl.data import Source, load_source
from reducedmpl.errors import DataError


# ---------------------------------------------------------------------------------------------------
# Writers for the real formats
# ---------------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, magic: int | None = None) -> None:
    """Write an IDX file of unsigned bytes (MNIST format), optionally gzip-compressed."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def py2_pickle(obj: Any) -> bytes:
    """Pickle dicts / lists / ints / bytes / uint8 arrays the way Python 2's cPickle (protocol 2) did.

    The CIFAR "python version" batches were written like this: str values as (SHORT_)BINSTRING and
    numpy arrays via numpy.core.multiarray._reconstruct with a Python 2 dtype state.
    """
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend((b"U" + bytes([len(b)])) if len(b) < 256 else (b"T" + struct.pack("<I", len(b))))
        out.extend(b)

    def integer(i: int) -> None:
        if 0 <= i < 256:
            out.extend(b"K" + bytes([i]))
        elif 0 <= i < 65536:
            out.extend(b"M" + struct.pack("<H", i))
        else:
            out.extend(b"J" + struct.pack("<i", i))

    def emit(o: Any) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, (int, np.integer)):
            integer(int(o))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01")
            integer(o.shape[0])
            integer(o.shape[1])
            out.extend(b"\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            out.extend(b"\x89")
            string(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def cifar_data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, *, per_batch: int = 3, py2: bool = True) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A complete cifar-10-batches-py folder with tiny batches; returns {file: (data, labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    dump = py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=4))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(dump({b"label_names": names, b"num_cases_per_batch": per_batch}))
    written = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = cifar_data(per_batch, k)
        labels = [(k + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch}
        (root / name).write_bytes(dump(batch))
        written[name] = (data, labels)
    return written


def write_cifar100(root: Path, *, str_keys: bool = False) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A cifar-100-python folder (train, test, meta) pickled with protocol 4 and bytes (or str) keys."""
    root.mkdir(parents=True, exist_ok=True)
    key = (lambda s: s) if str_keys else (lambda s: s.encode())
    fine = [f"class{i:02d}".encode() for i in range(100)]
    meta = {key("fine_label_names"): fine, key("coarse_label_names"): [b"c"] * 20}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    written = {}
    for name, n, seed in (("train", 5, 10), ("test", 2, 11)):
        data = cifar_data(n, seed)
        fine_labels = [(7 * j + seed) % 100 for j in range(n)]
        batch = {key("data"): data, key("fine_labels"): fine_labels, key("coarse_labels"): [0] * n}
        (root / name).write_bytes(pickle.dumps(batch, protocol=4))
        written[name] = (data, fine_labels)
    return written


def chw_to_hwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def all_rows(src: Source) -> np.ndarray:
    return np.arange(len(src))


# ---------------------------------------------------------------------------------------------------
# digits and spec parsing
# ---------------------------------------------------------------------------------------------------


def test_digits() -> None:
    from sklearn.datasets import load_digits

    src = load_source("digits")
    assert src.kind == "digits" and src.spec == "digits"
    assert src.images is not None and src.images.shape == (1797, 8, 8, 1) and src.images.dtype == np.uint8
    assert src.labels.dtype == np.int64 and src.labels.shape == (1797,)
    assert src.class_names == [str(d) for d in range(10)] and src.num_classes == 10 and len(src) == 1797
    assert src.in_chans == 1 and src.image_size == (8, 8) and src.official_test is None and src.files is None
    ref = load_digits()
    np.testing.assert_array_equal(src.images[..., 0], np.rint(ref.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(src.labels, ref.target)
    assert src.images.max() == 255 and src.images.min() == 0
    img = src.load_image(5)
    assert img.shape == (8, 8, 1) and img.dtype == np.uint8
    img[...] = 0  # load_image returns a copy
    assert src.images[5].any()
    with pytest.raises(IndexError):
        src.load_image(1797)


@pytest.mark.parametrize(
    "spec",
    ["", "imagenet:/data", "mnist", "mnist:", "cifar10", "folder:", "npz", "digits:/some/path"],
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(DataError, match="mnist:DIR") as info:
        load_source(spec)
    assert "npz:FILE" in str(info.value)


def test_missing_path_names_only_its_own_form() -> None:
    with pytest.raises(DataError, match="does not exist — check the path; expected mnist:DIR") as info:
        load_source("mnist:/no/such/dir")
    assert "npz:FILE" not in str(info.value)


def test_spec_path_kind_mismatch(tmp_path: Path) -> None:
    (tmp_path / "f.npz").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        load_source(f"mnist:{tmp_path / 'f.npz'}")
    with pytest.raises(DataError, match="directory, not a file"):
        load_source(f"npz:{tmp_path}")


# ---------------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------------


def mnist_arrays(n: int, seed: int, h: int = 6, w: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, h, w), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


def test_mnist_gz_and_raw(tmp_path: Path) -> None:
    tr_x, tr_y = mnist_arrays(7, 0)
    te_x, te_y = mnist_arrays(4, 1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr_x, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", tr_y, gz=True)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", te_x)  # dot variant, uncompressed
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", te_y)
    spec = f"mnist:{tmp_path}"
    src = load_source(spec)
    assert src.spec == spec and src.kind == "mnist" and src.in_chans == 1
    assert src.images is not None and src.images.shape == (11, 6, 5, 1) and src.images.dtype == np.uint8
    assert src.image_size == (6, 5) and src.class_names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(src.images[..., 0], np.concatenate([tr_x, te_x]))
    np.testing.assert_array_equal(src.labels, np.concatenate([tr_y, te_y]))
    assert src.labels.dtype == np.int64
    assert src.official_test is not None and src.official_test.dtype == np.bool_
    np.testing.assert_array_equal(src.official_test, [False] * 7 + [True] * 4)
    np.testing.assert_array_equal(src.load_image(8)[..., 0], te_x[1])


def test_mnist_only_test_pair_and_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    te_x, te_y = mnist_arrays(3, 2, 28, 28)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", te_x, gz=True)
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", te_y, gz=True)
    for spec in (f"mnist:{raw}", f"mnist:{tmp_path}"):
        src = load_source(spec)
        assert len(src) == 3 and src.images is not None and src.images.shape == (3, 28, 28, 1)
        assert src.official_test is not None and src.official_test.all()


def _write_valid_mnist(folder: Path, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist_arrays(n, 3)
    write_idx(folder / "train-images-idx3-ubyte", x)
    write_idx(folder / "train-labels-idx1-ubyte", y)
    return x, y


def test_mnist_truncated_files(tmp_path: Path) -> None:
    _write_valid_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    full = images.read_bytes()
    images.write_bytes(full[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte is truncated"):
        load_source(f"mnist:{tmp_path}")
    images.write_bytes(full[:9])  # not even a whole header
    with pytest.raises(DataError, match="truncated"):
        load_source(f"mnist:{tmp_path}")
    images.write_bytes(full + b"\0")
    with pytest.raises(DataError, match="longer than"):
        load_source(f"mnist:{tmp_path}")


def test_mnist_truncated_gzip(tmp_path: Path) -> None:
    x, y = mnist_arrays(5, 4)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, gz=True)
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_source(f"mnist:{tmp_path}")
    gz.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    with pytest.raises(DataError, match="gzip"):
        load_source(f"mnist:{tmp_path}")


def test_mnist_malformed(tmp_path: Path) -> None:
    x, y = _write_valid_mnist(tmp_path)
    spec = f"mnist:{tmp_path}"
    # wrong magic number: a labels file named as images
    write_idx(tmp_path / "train-images-idx3-ubyte", y)
    with pytest.raises(DataError, match="magic"):
        load_source(spec)
    # image / label count mismatch
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y[:-1])
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_source(spec)
    # label out of range
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match="label 10"):
        load_source(spec)
    # labels file missing
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match="no matching labels"):
        load_source(spec)
    # nothing there at all
    os.remove(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(DataError, match="no MNIST IDX files"):
        load_source(spec)


def test_mnist_train_and_test_sizes_must_match(tmp_path: Path) -> None:
    _write_valid_mnist(tmp_path)
    te_x, te_y = mnist_arrays(2, 5, 28, 28)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", te_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", te_y)
    with pytest.raises(DataError, match="different sizes"):
        load_source(f"mnist:{tmp_path}")


def test_mnist_digest(tmp_path: Path) -> None:
    x, y = _write_valid_mnist(tmp_path, n=6)
    spec = f"mnist:{tmp_path}"
    a, b = load_source(spec), load_source(spec)
    idx = np.array([0, 2, 4])
    d = a.content_digest(idx)
    assert len(d) == 64 and d == b.content_digest(idx)
    assert a.content_digest(idx[::-1]) != d  # order-sensitive
    assert a.content_digest(np.array([0, 2])) != d
    assert a.content_digest(np.array([0, 2, 5])) != d
    x2 = x.copy()
    x2[2, 3, 1] ^= 1  # one pixel of a selected row
    write_idx(tmp_path / "train-images-idx3-ubyte", x2)
    changed = load_source(spec)
    assert changed.content_digest(idx) != d
    assert changed.content_digest(np.array([0, 4])) == a.content_digest(np.array([0, 4]))
    y2 = y.copy()
    y2[4] = (y2[4] + 1) % 10  # one label
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y2)
    assert load_source(spec).content_digest(idx) != d
    with pytest.raises(IndexError):
        a.content_digest(np.array([6]))


@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason=f"the MNIST t10k folder {MNIST_T10K} is not present")
def test_mnist_real_t10k() -> None:
    src = load_source(f"mnist:{MNIST_T10K}")
    assert len(src) == 10_000 and src.images is not None and src.images.shape == (10_000, 28, 28, 1)
    assert src.image_size == (28, 28) and src.in_chans == 1
    counts = np.bincount(src.labels, minlength=10)
    assert counts.shape == (10,) and counts.sum() == 10_000 and counts.min() > 800
    assert src.official_test is not None and src.official_test.all()
    assert src.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test labels
    assert src.content_digest(np.arange(100)) == load_source(f"mnist:{MNIST_T10K}").content_digest(np.arange(100))


# ---------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------


def test_cifar10_python2_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar10(folder)
    order = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{folder}"):
        src = load_source(spec)
        assert src.kind == "cifar10" and src.in_chans == 3 and src.image_size == (32, 32)
        assert src.images is not None and src.images.shape == (18, 32, 32, 3) and src.images.dtype == np.uint8
        assert src.class_names[:3] == ["airplane", "automobile", "bird"] and src.num_classes == 10
        np.testing.assert_array_equal(src.images, np.concatenate([chw_to_hwc(written[f][0]) for f in order]))
        np.testing.assert_array_equal(src.labels, np.concatenate([written[f][1] for f in order]))
        assert src.official_test is not None
        np.testing.assert_array_equal(src.official_test, [False] * 15 + [True] * 3)
    # pixel (row 0, y=1, x=2, channel=c) comes from CHW offset c*1024 + 1*32 + 2
    data0 = written["data_batch_1"][0][0]
    np.testing.assert_array_equal(src.load_image(0)[1, 2], [data0[34], data0[1024 + 34], data0[2048 + 34]])


def test_cifar10_protocol4_pickles(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, py2=False)
    src = load_source(f"cifar10:{tmp_path}")
    assert src.images is not None
    np.testing.assert_array_equal(src.images[-3:], chw_to_hwc(written["test_batch"][0]))


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar100(tmp_path: Path, str_keys: bool) -> None:
    written = write_cifar100(tmp_path / "cifar-100-python", str_keys=str_keys)
    src = load_source(f"cifar100:{tmp_path}")
    assert src.kind == "cifar100" and src.num_classes == 100 and src.class_names[7] == "class07"
    assert src.images is not None and src.images.shape == (7, 32, 32, 3)
    np.testing.assert_array_equal(src.images, chw_to_hwc(np.concatenate([written["train"][0], written["test"][0]])))
    np.testing.assert_array_equal(src.labels, written["train"][1] + written["test"][1])
    np.testing.assert_array_equal(src.official_test, [False] * 5 + [True] * 2)


def test_cifar_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(DataError, match="missing data_batch_3") as info:
        load_source(f"cifar10:{tmp_path}")
    assert "test_batch" in str(info.value) and "batches.meta" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="extract"):
        load_source(f"cifar100:{empty}")
    with pytest.raises(DataError, match="no CIFAR batches"):
        load_source(f"cifar10:{empty}")


def test_cifar_truncated_and_malformed(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    spec = f"cifar10:{tmp_path}"
    batch = tmp_path / "data_batch_2"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_2 is truncated"):
        load_source(spec)
    batch.write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_2"):
        load_source(spec)
    batch.write_bytes(py2_pickle([1, 2, 3]))
    with pytest.raises(DataError, match="not the dict"):
        load_source(spec)
    batch.write_bytes(py2_pickle({b"labels": [1]}))
    with pytest.raises(DataError, match="no 'data' entry"):
        load_source(spec)
    batch.write_bytes(py2_pickle({b"data": cifar_data(3, 0)[:, :100], b"labels": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        load_source(spec)
    batch.write_bytes(py2_pickle({b"data": cifar_data(3, 0), b"labels": [1, 2]}))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_source(spec)
    batch.write_bytes(py2_pickle({b"data": cifar_data(3, 0), b"labels": [1, 2, 10]}))
    with pytest.raises(DataError, match="label 10"):
        load_source(spec)


class _Hostile:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("target", ["test_batch", "batches.meta"])
def test_cifar_hostile_pickle_is_refused(tmp_path: Path, target: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    marker = tmp_path / "pwned"
    payload = {b"data": _Hostile(f"touch {marker}"), b"labels": [0]}
    (folder / target).write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(DataError, match=r"refusing .* it asks to import (posix|os)\.system"):
        load_source(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_cifar_refuses_builtins(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    (tmp_path / "test").write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(DataError, match=r"refusing .* builtins\.eval"):
        load_source(f"cifar100:{tmp_path}")


def test_cifar_digest(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    spec = f"cifar100:{tmp_path}"
    idx = np.array([6, 0, 3])
    d = load_source(spec).content_digest(idx)
    assert d == load_source(spec).content_digest(idx)
    batch = pickle.loads((tmp_path / "test").read_bytes())
    batch[b"data"][0, 5] ^= 0x80  # row 5 of the source (first test row); not selected
    (tmp_path / "test").write_bytes(pickle.dumps(batch, protocol=4))
    assert load_source(spec).content_digest(idx) == d
    batch[b"data"][1, 5] ^= 0x80  # row 6: selected
    (tmp_path / "test").write_bytes(pickle.dumps(batch, protocol=4))
    assert load_source(spec).content_digest(idx) != d


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------


def save_image(path: Path, seed: int, size: tuple[int, int] = (5, 4), mode: str = "RGB") -> np.ndarray:
    """Save a small random image (PIL size = (W, H)); return its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(path)
    return pixels


def test_folder_layout(tmp_path: Path) -> None:
    cat_a = save_image(tmp_path / "cat" / "b.png", 1)
    save_image(tmp_path / "cat" / "a.JPG", 2, (16, 12))
    gray = save_image(tmp_path / "dog" / "x.png", 3, mode="L")
    save_image(tmp_path / "dog" / "sub" / "y.bmp", 4)
    save_image(tmp_path / "bird" / "z.PNG", 5)
    save_image(tmp_path / "cat" / ".hidden.png", 6)
    save_image(tmp_path / ".git" / "h.png", 7)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("readme")
    src = load_source(f"folder:{tmp_path}")
    assert src.kind == "folder" and src.in_chans == 3 and src.images is None and src.image_size is None
    assert src.class_names == ["bird", "cat", "dog"]
    assert src.files is not None and all(os.path.isabs(f) for f in src.files)
    rel = [os.path.relpath(f, tmp_path) for f in src.files]
    assert rel == ["bird/z.PNG", "cat/a.JPG", "cat/b.png", "dog/sub/y.bmp", "dog/x.png"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 1, 1, 2, 2]
    assert src.official_test is None
    np.testing.assert_array_equal(src.load_image(2), cat_a)  # PNG round-trips exactly
    jpeg = src.load_image(1)
    assert jpeg.shape == (12, 16, 3) and jpeg.dtype == np.uint8
    as_rgb = src.load_image(4)
    assert as_rgb.shape == (4, 5, 3)
    np.testing.assert_array_equal(as_rgb, np.repeat(gray[:, :, None], 3, axis=2))


def test_folder_corrupt_image(tmp_path: Path) -> None:
    save_image(tmp_path / "a" / "good.png", 1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    good = (tmp_path / "a" / "good.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    src = load_source(f"folder:{tmp_path}")
    assert src.load_image(0).shape == (4, 5, 3)
    with pytest.raises(DataError, match="broken.png"):
        src.load_image(1)
    with pytest.raises(DataError, match="truncated.png"):
        src.load_image(2)


def test_folder_train_val_split(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "ant" / "1.png", 1)
    save_image(tmp_path / "train" / "bee" / "1.png", 2)
    save_image(tmp_path / "train" / "bee" / "2.png", 3)
    save_image(tmp_path / "val" / "bee" / "3.png", 4)
    save_image(tmp_path / "val" / "cow" / "4.png", 5)
    save_image(tmp_path / "test" / "ant" / "5.png", 6)
    src = load_source(f"folder:{tmp_path}")
    assert src.class_names == ["ant", "bee", "cow"]
    rel = [os.path.relpath(f, tmp_path) for f in src.files or []]
    assert rel == ["train/ant/1.png", "train/bee/1.png", "train/bee/2.png", "val/bee/3.png", "val/cow/4.png",
                   "test/ant/5.png"]
    assert src.labels.tolist() == [0, 1, 1, 1, 2, 0]
    assert src.official_test is not None and src.official_test.tolist() == [False] * 3 + [True] * 3


def test_folder_train_only(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "ant" / "1.png", 1)
    save_image(tmp_path / "train" / "bee" / "2.png", 2)
    src = load_source(f"folder:{tmp_path}")
    assert src.class_names == ["ant", "bee"] and src.labels.tolist() == [0, 1] and src.official_test is None


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_source(f"folder:{empty}")
    (empty / "cat").mkdir()
    (empty / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_source(f"folder:{empty}")
    save_image(empty / "dog" / "a.png", 1)
    with pytest.raises(DataError, match="cat .*hold no image files"):
        load_source(f"folder:{empty}")
    split = tmp_path / "split"
    save_image(split / "train" / "a" / "1.png", 1)
    save_image(split / "val" / "1.png", 2)  # flat val/ without class folders
    with pytest.raises(DataError, match="val holds no class sub-folders"):
        load_source(f"folder:{split}")


def test_folder_digest(tmp_path: Path) -> None:
    for i, cls in enumerate(["a", "a", "b", "b"]):
        save_image(tmp_path / "root" / cls / f"{i}.png", i)
    root = tmp_path / "root"
    src = load_source(f"folder:{root}")
    idx = np.array([0, 1, 3])
    d = src.content_digest(idx)
    d03 = src.content_digest(np.array([0, 3]))
    assert d == load_source(f"folder:{root}").content_digest(idx)
    assert src.content_digest(np.array([1, 0, 3])) != d
    for spelled in (f"{root}/", f"{root}//", os.path.relpath(root), f"./{os.path.relpath(root)}"):
        assert load_source(f"folder:{spelled}").content_digest(idx) == d, spelled  # however the root is written
    moved = tmp_path / "moved"
    os.rename(root, moved)  # digest depends on paths relative to the root, not on where the root is
    assert load_source(f"folder:{moved}").content_digest(idx) == d
    src_moved = load_source(f"folder:{moved}")
    save_image(moved / "a" / "1.png", 99, size=(9, 9))  # rewritten with another size
    assert load_source(f"folder:{moved}").content_digest(idx) != d
    assert load_source(f"folder:{moved}").content_digest(np.array([0, 3])) == d03
    os.remove(moved / "b" / "3.png")
    with pytest.raises(DataError, match="3.png"):
        src_moved.content_digest(idx)


# ---------------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------------


def test_npz_uint8_gray(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(6, 7, 5), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    src = load_source(f"npz:{tmp_path / 'd.npz'}")
    assert src.kind == "npz" and src.in_chans == 1 and src.image_size == (7, 5)
    assert src.images is not None and src.images.shape == (6, 7, 5, 1) and src.images.dtype == np.uint8
    np.testing.assert_array_equal(src.images[..., 0], x)
    assert src.labels.dtype == np.int64 and src.labels.tolist() == y.tolist()
    assert src.class_names == ["0", "1", "2"] and src.official_test is None


def test_npz_float_rgb_with_names(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 3, 2, 3), dtype=np.uint8)
    names = np.array(["cat", "dog", "emu"])
    np.savez_compressed(tmp_path / "d.npz", x=pixels.astype(np.float32) / 255, y=np.array([2, 2, 0, 1]), class_names=names)
    src = load_source(f"npz:{tmp_path / 'd.npz'}")
    assert src.in_chans == 3 and src.class_names == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(src.images, pixels)
    np.testing.assert_array_equal(src.load_image(3), pixels[3])
    d = src.content_digest(np.array([0, 1]))
    pixels[1, 2, 1, 0] ^= 1
    np.savez(tmp_path / "e.npz", x=pixels, y=np.array([2, 2, 0, 1]), class_names=names)
    assert load_source(f"npz:{tmp_path / 'e.npz'}").content_digest(np.array([0, 1])) != d


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 4, 4), np.uint8)}, "no array 'y'"),
        ({"y": np.zeros(3, int)}, "no array 'x'"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros(2, int)}, "3 images but 'y' holds 2"),
        ({"x": np.zeros((3, 16), np.uint8), "y": np.zeros(3, int)}, "expected"),
        ({"x": np.zeros((3, 4, 4, 4), np.uint8), "y": np.zeros(3, int)}, "C = 1 or 3"),
        ({"x": np.zeros((3, 4, 4)) + 2.0, "y": np.zeros(3, int)}, r"\[0, 1\]"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.zeros((3, 1), int)}, "integer labels"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0.5, 1, 2])}, "integer labels"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, 1, 2]), "class_names": np.array(["a", "b"])},
         "label 2"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, -1, 1])}, "label -1"),
        ({"x": np.zeros((0, 4, 4), np.uint8), "y": np.zeros(0, int)}, "no images"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, int), "class_names": np.array([{"a": 1}], dtype=object)},
         "cannot read"),
    ],
)
def test_npz_malformed(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message):
        load_source(f"npz:{path}")


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="bad.npz"):
        load_source(f"npz:{path}")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2, int))
    path.write_bytes(good.read_bytes()[:-30])  # truncated archive
    with pytest.raises(DataError, match="bad.npz"):
        load_source(f"npz:{path}")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="not an .npz"):
        load_source(f"npz:{tmp_path / 'single.npy'}")
