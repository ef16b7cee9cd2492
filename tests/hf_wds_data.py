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


HUB_DATASET_REVISION = "5e1d4c3b2a1908f7e6d5c4b3a2918f7e6d5c4b3a"


def write_hub_dataset(cache: Path, repo: str, n: int = 60, test: int = 12, config: str = "plain",
                      revision: str = HUB_DATASET_REVISION, **kwargs) -> Path:
    """A dataset repository in a Hugging Face Hub cache as ``hf download REPO --repo-type dataset`` leaves it:
    ``datasets--ORG--NAME/blobs/SHA256`` (the parquet files and a README declaring configuration ``config``),
    ``snapshots/REVISION/...`` linking there, ``refs/main``. Returns the snapshot folder."""
    import hashlib
    import os

    folder = cache / ("datasets--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    staging = write_hf_parquet(folder / "staging", n, test, **kwargs)
    readme = (f"---\nconfigs:\n- config_name: {config}\n  data_files:\n"
              f"  - split: train\n    path: {config}/train-*\n  - split: test\n    path: {config}/test-*\n---\n")
    (staging / "README.md").write_text(readme)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(staging.iterdir()):
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.replace(blob)
        link = snapshot / (file.name if file.suffix == ".md" else f"{config}/{file.name}")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    staging.rmdir()
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def write_prepared_dataset(cache: Path, repo: str, n: int = 60, test: int = 12, config: str = "plain",
                           revision: str = HUB_DATASET_REVISION, **kwargs) -> Path:
    """A dataset in a ``datasets`` cache as ``datasets.load_dataset(REPO)`` online leaves it: the parquet builder's
    arrow files and ``dataset_info.json`` in ``ORG___NAME/CONFIG/0.0.0/REVISION``. Returns that folder."""
    import shutil

    from datasets.packaged_modules.parquet.parquet import Parquet

    source = write_hf_parquet(cache / "incoming-parquet", n, test, **kwargs)
    name = repo.split("/")[-1]
    builder = Parquet(cache_dir=str(cache / "incoming"), dataset_name=name, config_name=config, hash=revision,
                      data_files={split: [str(source / f"{split}-00000-of-00001.parquet")]
                                  for split in ("train", "test")})
    builder.download_and_prepare()
    dest = cache / repo.replace("/", "___") / config / "0.0.0" / revision
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, dest)
    shutil.rmtree(cache / "incoming")
    shutil.rmtree(source)
    return dest
