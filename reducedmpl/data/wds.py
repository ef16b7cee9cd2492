"""``wds:`` sources: WebDataset tar shards, named by a pattern the ``webdataset`` library expands (the ``[wds]``
extra): braces (``shards-{000000..000099}.tar``), ``::`` between several patterns, and here also a glob or a
folder (its ``*.tar``).

Each shard's member headers are read once when the source is loaded (no image is decoded): a sample is the run
of members sharing a key (webdataset's rule: the name up to the first dot of its last part), its image the
``jpg``, ``jpeg``, ``png`` or ``webp`` member (or ``data.image_column``), its class the integer in its ``cls``
member (or ``data.label_column``). Rows ``0..N-1`` are the samples in shard order, then order within the shard;
an image is read back by its offset in the shard, so any row can be read in any order, in any process. Sample
keys must be unique: they name the rows. The fingerprints hash the shards' names and sizes and every sample's
key and image size, so a shard rewritten with other samples is refused by a later stage.
"""
from __future__ import annotations

import glob
import os
import struct
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError
from .base import Source, decode_image, finish

if TYPE_CHECKING:
    from ..config import DataConfig

INSTALL = "install the extra: pip install 'reducedmpl[wds]'"
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LABEL_FIELD = "cls"
_GZIP_MAGIC = b"\x1f\x8b"


def import_webdataset() -> Any:
    """The ``webdataset`` module, or a DataError naming the extra that installs it."""
    try:
        import webdataset
    except ImportError:
        raise DataError("wds: data sources need the 'webdataset' library, which is not installed", INSTALL) from None
    return webdataset


def shard_paths(pattern: str) -> list[str]:
    """The shard files ``pattern`` names, in order: webdataset's expansion (braces, ``::``), then a glob or a
    folder (its ``*.tar``, sorted); names that exist nowhere are kept (the caller reports them)."""
    import_webdataset()
    from webdataset.shardlists import expand_urls

    paths: list[str] = []
    for name in expand_urls(pattern):
        path = os.path.abspath(os.path.expanduser(name))
        if glob.has_magic(path):
            paths += sorted(glob.glob(path))
        elif os.path.isdir(path):
            paths += sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        else:
            paths.append(path)
    return paths


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` names no usable shards (nothing is read): None when every name it expands to exists."""
    paths = shard_paths(pattern)
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        return f"{os.path.abspath(os.path.expanduser(pattern))} matches no shard file"
    if missing:
        return f"shard {missing[0]} does not exist ({len(missing)} of the {len(paths)} shards named are missing)"
    return None


@dataclass
class _Listing:
    """What the listing of the shards found, one entry per sample."""

    shards: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    where: dict[str, str] = field(default_factory=dict)  # key -> the shard it was found in


def _label(data: bytes, key: str, path: str, label_field: str) -> int:
    try:
        label = int(data.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"sample {key!r} in {path} has {label_field!r} {data[:20]!r}, not a class index",
                        f"write the class index (0, 1, ...) as the {label_field} member") from None
    if label < 0:
        raise DataError(f"sample {key!r} in {path} has class {label}", "class indices start at 0")
    return label


def _add_sample(out: _Listing, k: int, path: str, key: str, members: dict[str, tarfile.TarInfo],
                label: int | None, image_field: str | None, label_field: str) -> None:
    fields = ", ".join(sorted(members))
    if label is None:
        raise DataError(f"sample {key!r} in {path} has no {label_field!r} field (fields: {fields})",
                        f"write each sample's class index as a .{label_field} member, or name the label field "
                        "with data.label_column")
    names = (image_field,) if image_field else IMAGE_FIELDS
    image = next((members[n] for n in names if n in members), None)
    if image is None:
        raise DataError(f"sample {key!r} in {path} has no image field ({'/'.join(names)}; fields: {fields})",
                        "write the image as a .jpg, .png or .webp member, or name its field with data.image_column")
    if key in out.where:
        place = "twice in " + path if out.where[key] == path else f"in {out.where[key]} and in {path}"
        raise DataError(f"sample key {key!r} is {place}", "give every sample a unique key (its __key__)")
    out.where[key] = path
    out.shards.append(k)
    out.offsets.append(image.offset_data)
    out.sizes.append(image.size)
    out.keys.append(key)
    out.labels.append(label)


def _list_shard(out: _Listing, k: int, path: str, image_field: str | None, label_field: str) -> None:
    """Add the samples of shard ``path`` (number ``k``) to ``out``, reading only member headers and labels."""
    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            raise DataError(f"shard {path} is compressed", "rows are read by their offset in the shard: "
                            "decompress it (gunzip) into a plain .tar")
    key, members, label = None, {}, None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                base, ext = base_plus_ext(m.name) if m.isfile() else (None, None)
                if base is None or os.path.basename(base).startswith(("__", ".")):
                    continue
                if m.offset_data + m.size > size:
                    raise DataError(f"shard {path} is truncated (member {m.name} ends past its end)",
                                    "write the shard again")
                if base != key:
                    if key is not None:
                        _add_sample(out, k, path, key, members, label, image_field, label_field)
                    key, members, label = base, {}, None
                ext = ext.lower()
                members[ext] = m
                if ext == label_field:
                    label = _label(tar.extractfile(m).read(), base, path, label_field)
    except tarfile.TarError as exc:
        raise DataError(f"cannot read shard {path} as a tar file ({exc})", "write the shard again") from None
    if key is not None:
        _add_sample(out, k, path, key, members, label, image_field, label_field)


def load_wds(spec: str, pattern: str, options: DataConfig | None) -> Source:
    """Load ``wds:PATTERN``: list every shard's samples once, then read images by offset (:class:`WdsRows`)."""
    problem = pattern_problem(pattern)
    if problem:
        raise DataError(f"data source {spec!r}: {problem}",
                        "check the pattern (e.g. wds:/data/shards-{000000..000099}.tar) and the shards")
    paths = shard_paths(pattern)
    image_field = getattr(options, "image_column", None)
    label_field = getattr(options, "label_column", None) or LABEL_FIELD
    out = _Listing()
    for k, path in enumerate(paths):
        _list_shard(out, k, path, image_field.lower() if image_field else None, label_field.lower())
    labels = np.asarray(out.labels, dtype=np.int64)
    top = int(labels.max()) if labels.size else -1
    reader = WdsRows(paths, out)
    return finish(Source(spec=spec, kind="wds", class_names=[str(c) for c in range(top + 1)], labels=labels,
                         in_chans=3, reader=reader))


class WdsRows:
    """Row ``i``'s image, read by its offset in its shard and decoded. Holds only the shard paths and per-row
    numbers (no open file), so it pickles small for DataLoader workers."""

    def __init__(self, paths: list[str], listing: _Listing):
        self.paths = paths
        self.shard = np.asarray(listing.shards, dtype=np.int32)
        self.offset = np.asarray(listing.offsets, dtype=np.int64)
        self.size = np.asarray(listing.sizes, dtype=np.int64)
        self.keys = np.array([k.encode("utf-8") for k in listing.keys], dtype=bytes)
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        parts = []
        for p in paths:
            name = os.path.relpath(p, root).replace(os.sep, "/").encode("utf-8")
            parts.append(struct.pack("<q", len(name)) + name + struct.pack("<q", os.path.getsize(p)))
        self.identity = b"wds" + b"".join(parts)

    def __call__(self, row: int) -> Any:
        k, key = int(self.shard[row]), self.keys[row].decode("utf-8")
        path, size = self.paths[k], int(self.size[row])
        try:
            with open(path, "rb") as f:
                f.seek(int(self.offset[row]))
                data = f.read(size)
        except OSError as exc:
            raise DataError(f"cannot read shard {path}: {exc.strerror or exc}", "restore the shard") from None
        if len(data) != size:
            raise DataError(f"shard {path} changed since it was listed (sample {key!r} is cut short)",
                            "restore the shard, or start the stage again on the shards as they are")
        return decode_image(data, f"sample {key!r} in {path}", "replace the sample's image in the shard")

    def row_key(self, row: int) -> bytes:
        return struct.pack("<iq", int(self.shard[row]), int(self.size[row])) + bytes(self.keys[row])
