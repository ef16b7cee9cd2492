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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import numpy as np

from ..errors import DataError
from .base import Source, decode_image, finish

if TYPE_CHECKING:
    from ..config import DataConfig

INSTALL = "install the extra: pip install 'reducedmpl[wds]'"
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LABEL_FIELD = "cls"
_GZIP_MAGIC = b"\x1f\x8b"
_ZERO_BLOCK = bytes(512)


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


class Member(NamedTuple):
    """A regular file in a tar shard: its name, where its data starts, and its size in bytes."""

    name: str
    offset: int
    size: int


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


def _add_sample(out: _Listing, k: int, path: str, key: str, members: dict[str, Member],
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
    out.offsets.append(image.offset)
    out.sizes.append(image.size)
    out.keys.append(key)
    out.labels.append(label)


def _number(field: bytes) -> int:
    """A tar header number: octal digits, or GNU's base-256 (high bit of the first byte set)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def _checked_size(header: bytes, path: str, pos: int) -> int:
    """The size of the member whose 512-byte header is ``header``, once the header passes its checksum."""
    try:
        if _number(header[148:156]) == sum(header[:148]) + 256 + sum(header[156:]):
            return _number(header[124:136])
    except ValueError:  # not octal digits
        pass
    raise DataError(f"shard {path} is not a tar file (no valid tar header at byte {pos})",
                    "write the shard again, as a plain tar (e.g. with webdataset.TarWriter)")


def _pax(data: bytes, path: str) -> tuple[str | None, int | None]:
    """The ``path`` and ``size`` records of a pax extended header (``"LEN KEY=VALUE\n"``...), when there."""
    records, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] != b"\0":
            space = data.index(b" ", pos)
            end = pos + int(data[pos:space])
            key, _, value = data[space + 1:end - 1].partition(b"=")
            records[key], pos = value, end
        size = int(records[b"size"]) if b"size" in records else None
    except ValueError:
        raise DataError(f"shard {path} holds a malformed pax header", "write the shard again") from None
    name = records[b"path"].decode("utf-8", "surrogateescape") if b"path" in records else None
    return name, size


def tar_members(f: Any, path: str) -> Iterator[Member]:
    """The regular files of the plain tar ``f``, in order, from their headers alone (each header is read, every
    file's data skipped): ustar names with their prefix, pax ``path``/``size`` records and GNU long names, as
    :mod:`tarfile` reads them. A header that fails its checksum, or data past the end of the file, is a DataError."""
    end = os.fstat(f.fileno()).st_size
    pos, name, size = 0, None, None  # name, size: set by a pax or GNU header for the member that follows
    while True:
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            if 0 < len(header) < 512 or (pos == 0 and not header):
                raise DataError(f"shard {path} is truncated or empty (at byte {pos})", "write the shard again")
            return
        kind, length, data = header[156:157], _checked_size(header, path, pos), pos + 512
        regular = kind in (b"0", b"\0", b"7")
        if regular and size is not None:
            length = size  # a pax size record (a file of 8 GiB or more) overrides the header's
        if data + length > end:
            raise DataError(f"shard {path} is truncated (a member at byte {pos} ends past its end)",
                            "write the shard again")
        pos = data + (length + 511) // 512 * 512
        if kind in (b"x", b"L", b"K"):  # the next member's pax records, GNU long name, GNU long link name
            content = f.read(length)
            if kind == b"L":
                name = content.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax_name, pax_size = _pax(content, path)
                name, size = pax_name or name, size if pax_size is None else pax_size
            continue
        if regular:
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            if not (kind == b"\0" and name.endswith("/")):  # an old-style directory
                yield Member(name, data, length)
        elif kind == b"S":
            raise DataError(f"shard {path} holds a sparse file", "write the shard again without sparse files")
        name, size = None, None


def _list_shard(out: _Listing, k: int, path: str, image_field: str | None, label_field: str) -> None:
    """Add the samples of shard ``path`` (number ``k``) to ``out``, reading only member headers and labels."""
    from webdataset.tariterators import base_plus_ext

    key, members, label = None, {}, None
    with open(path, "rb") as f:
        if f.read(2) == _GZIP_MAGIC:
            raise DataError(f"shard {path} is compressed", "rows are read by their offset in the shard: "
                            "decompress it (gunzip) into a plain .tar")
        for m in tar_members(f, path):
            base, ext = base_plus_ext(m.name)
            if base is None or os.path.basename(base).startswith(("__", ".")):
                continue
            if base != key:
                if key is not None:
                    _add_sample(out, k, path, key, members, label, image_field, label_field)
                key, members, label = base, {}, None
            ext = ext.lower()
            members[ext] = m
            if ext == label_field:
                f.seek(m.offset)
                label = _label(f.read(m.size), base, path, label_field)
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
