"""Tiny data sets in the Hugging Face (parquet, save_to_disk) and WebDataset (tar shards) formats, written with the
libraries themselves, for the tests of the ``hf:`` and ``wds:`` sources."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 3


def pixels(n: int, size: int = 16, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """``n`` random RGB images with a per-class tint (so a model learns something), and their labels."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        c = i % CLASSES
        x = rng.integers(0, 160, (size, size, 3), dtype=np.uint8)
        x[..., c] += 90
        images.append(x)
        labels.append(c)
    return images, labels


def encoded(x: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format=fmt)
    return buf.getvalue()


def hf_dataset(n: int, *, image: str = "image", label: str = "label", images: list[bytes] | None = None,
               labels: list[int] | None = None, extra_image: bool = False):
    """A ``datasets.Dataset`` with an Image column, a ClassLabel column and a caption (another Image column too)."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    arrays, default_labels = pixels(n)
    images = images or [encoded(x) for x in arrays]
    features = {image: ImageFeature(), label: ClassLabel(names=[f"class{c}" for c in range(CLASSES)]),
                "caption": Value("string")}
    rows = {image: [{"bytes": b, "path": None} for b in images], label: labels or default_labels,
            "caption": [f"row {i}" for i in range(n)]}
    if extra_image:
        features["thumb"] = ImageFeature()
        rows["thumb"] = [{"bytes": encoded(x[:4, :4]), "path": None} for x in arrays]
    return Dataset.from_dict(rows, features=Features(features))


def write_hf_parquet(root: Path, n: int = 60, test: int = 12, **kwargs) -> Path:
    """``root/train-00000-of-00001.parquet`` (the first n - test rows) and ``root/test-...parquet`` (the rest)."""
    root.mkdir(parents=True, exist_ok=True)
    ds = hf_dataset(n, **kwargs)
    ds.select(range(n - test)).to_parquet(str(root / "train-00000-of-00001.parquet"))
    ds.select(range(n - test, n)).to_parquet(str(root / "test-00000-of-00001.parquet"))
    return root


def write_hf_disk(root: Path, n: int = 60, validation: int = 12, **kwargs) -> Path:
    """A ``save_to_disk`` folder of a DatasetDict with splits train and validation."""
    from datasets import DatasetDict

    ds = hf_dataset(n, **kwargs)
    DatasetDict({"train": ds.select(range(n - validation)),
                 "validation": ds.select(range(n - validation, n))}).save_to_disk(str(root))
    return root


def write_wds(root: Path, shards: int = 3, per_shard: int = 20, *, drop_cls: str | None = None,
              seed: int = 0) -> Path:
    """``root/shard-00000{0..}.tar`` written with webdataset.TarWriter: PNG images (every fourth a JPEG) and a
    ``cls`` member; ``drop_cls`` names a sample written without one."""
    import webdataset

    root.mkdir(parents=True, exist_ok=True)
    arrays, labels = pixels(shards * per_shard, seed=seed)
    for k in range(shards):
        with webdataset.TarWriter(str(root / f"shard-{k:06d}.tar")) as sink:
            for i in range(k * per_shard, (k + 1) * per_shard):
                key = f"sample{i:05d}"
                sample = {"__key__": key, "jpg" if i % 4 == 3 else "png":
                          encoded(arrays[i], "JPEG" if i % 4 == 3 else "PNG")}
                if key != drop_cls:
                    sample["cls"] = labels[i]
                sink.write(sample)
    return root


def wds_spec(root: Path, shards: int = 3) -> str:
    return f"wds:{root}/shard-{{000000..{shards - 1:06d}}}.tar"
