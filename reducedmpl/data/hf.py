"""``hf:`` sources: Hugging Face datasets read through the ``datasets`` library (the ``[hf]`` extra).

``hf:DIR`` reads a folder of parquet or arrow files (``datasets.load_dataset``; files named ``train-*``,
``test-*`` ... give the splits) or a ``save_to_disk`` folder (``datasets.load_from_disk``). ``hf:NAME`` or
``hf:ORG/NAME`` reads a hub dataset already in the local cache (with ``HF_HUB_OFFLINE=1`` nothing is downloaded):
the arrow files a former ``load_dataset`` left in the datasets cache, else the repository's files that a download
(``hf download ORG/NAME --repo-type dataset``) left in the hub cache, read like ``hf:DIR``. The image column is
the one ``Image`` feature and the label column the one ``ClassLabel`` unless ``data.image_column`` /
``data.label_column`` name them; class names come from the ``ClassLabel``. The splits read
(``data.hf_splits``, default all) are concatenated in order into rows ``0..N-1``; ``data.hf_test_split``
(default ``test``, else ``validation``) is the source's official test split. Images stay encoded in the
dataset's memory-mapped arrow files and are decoded by row, in DataLoader workers when there are some.
"""
from __future__ import annotations

import logging
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import DataError
from .base import Source, decode_image, finish

if TYPE_CHECKING:
    from ..config import DataConfig

INSTALL = "install the extra: pip install 'reducedmpl[hf]'"
_DISK_MARKERS = ("dataset_dict.json", "state.json")  # what datasets.save_to_disk writes
_DATA_FILE_TYPES = {".parquet": "parquet", ".arrow": "arrow"}
_BAD_ROW_FIX = "fix or drop that row of the dataset"


def import_datasets() -> Any:
    """The ``datasets`` module, or a DataError naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data sources need the 'datasets' library, which is not installed", INSTALL) from None
    return datasets


def local_hf_path(arg: str) -> str | None:
    """The absolute path ``hf:ARG`` names on this machine, or None when it names a hub dataset: a path that
    exists, or one written as a path (absolute, ``./``, ``../``, ``~``), is local."""
    path = os.path.abspath(os.path.expanduser(arg))
    if os.path.exists(path) or os.path.isabs(arg) or arg.startswith(("./", "../", "~", ".\\", "..\\")):
        return path
    return None


@dataclass(frozen=True)
class HFSettings:
    config: str | None = None
    splits: tuple[str, ...] | None = None
    test_split: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    @classmethod
    def of(cls, options: DataConfig | None) -> HFSettings:
        if options is None:
            return cls()
        splits = getattr(options, "hf_splits", None)
        return cls(getattr(options, "hf_config", None), tuple(splits) if splits else None,
                   getattr(options, "hf_test_split", None), getattr(options, "image_column", None),
                   getattr(options, "label_column", None))


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars and no log lines from ``datasets`` while it loads: our errors are one line."""
    bars = datasets.utils.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240] if text else ''}"


def _open(datasets: Any, spec: str, arg: str, config: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The dataset's splits, name -> ``datasets.Dataset``, in the dataset's order, and for a hub dataset read from
    its cached files what identifies each split's data (see :func:`_open_snapshot`)."""
    local = local_hf_path(arg)
    if local is None:
        return _open_hub(datasets, spec, arg, config)
    if not os.path.exists(local):
        raise DataError(f"data source {spec!r}: {local} does not exist",
                        "check the path (a folder of parquet or arrow files, or a save_to_disk folder)")
    on_disk = os.path.isdir(local) and any(os.path.isfile(os.path.join(local, m)) for m in _DISK_MARKERS)
    if on_disk and config:
        raise DataError(f"data source {spec!r} is a save_to_disk folder, which has no configurations",
                        "drop data.hf_config")
    try:
        with _quiet(datasets):
            if on_disk:
                loaded = datasets.load_from_disk(local)
            elif os.path.isfile(local):
                file_type = _DATA_FILE_TYPES.get(os.path.splitext(local)[1].lower())
                if file_type is None:
                    raise DataError(f"data source {spec!r}: {local} is not a .parquet or .arrow file",
                                    "point hf: at a parquet or arrow file, or at their folder")
                loaded = datasets.load_dataset(file_type, data_files={"train": local})
            else:
                loaded = datasets.load_dataset(local, name=config)
    except DataError:
        raise
    except Exception as exc:  # FileNotFoundError, ValueError (config), ArrowInvalid...
        raise DataError(f"cannot load the Hugging Face dataset of {spec!r} ({_first_line(exc)})",
                        "check the folder: parquet or arrow files (train-*.parquet, test-*.parquet, ...) or a "
                        "save_to_disk folder") from None
    return _split_dict(datasets, loaded), {}


def _split_dict(datasets: Any, loaded: Any) -> dict[str, Any]:
    if isinstance(loaded, datasets.Dataset):
        return {str(loaded.split or "train"): loaded}
    return {str(name): ds for name, ds in loaded.items()}


def datasets_cache_dir() -> str | None:
    """The ``datasets`` cache the environment names now (the library reads it once, when it is imported)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "datasets") if os.environ.get("HF_HOME") else None


def _fetch_hint(repo: str) -> str:
    return f"fetch it once online (`hf download {repo} --repo-type dataset`, or datasets.load_dataset) into the cache"


def _open_hub(datasets: Any, spec: str, repo: str, config: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """A hub dataset: what ``datasets.load_dataset`` gives (offline: the arrow files a former ``load_dataset`` left
    in the datasets cache), else the repository's files that a download left in the hub cache, read as a folder."""
    try:
        with _quiet(datasets):
            loaded = _split_dict(datasets, datasets.load_dataset(repo, name=config, cache_dir=datasets_cache_dir()))
    except Exception as exc:  # offline and never prepared: ConnectionError; another configuration: ValueError
        failed = exc
    else:
        return loaded, _prepared_identities(datasets, repo, loaded)
    snapshot = _hub_snapshot(repo)
    if snapshot is None:
        prepared = _prepared_configs(repo)
        if prepared and config not in prepared and (config or len(prepared) > 1):
            raise _config_error(spec, repo, config, prepared)
        why = "offline" if isinstance(failed, ConnectionError) else _first_line(failed)[:100]
        raise DataError(f"data source {spec!r}: {repo} is not in the local Hugging Face caches and cannot be "
                        f"downloaded ({why})", _fetch_hint(repo))
    return _open_snapshot(datasets, spec, repo, snapshot, config)


def _hub_snapshot(repo: str) -> str | None:
    """The folder of the repository's files (its ``main`` revision) in the hub cache, or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        return None
    from ..hub import hub_cache_dir

    try:
        return snapshot_download(repo_id=repo, repo_type="dataset", cache_dir=hub_cache_dir(), local_files_only=True)
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), not a repository name
        return None


def _prepared_identities(datasets: Any, repo: str, loaded: dict[str, Any]) -> dict[str, str]:
    """For arrow files that ``load_dataset`` prepared from the very revision the hub cache holds (an online
    ``load_dataset`` leaves both): its data files' identities, as :func:`_open_snapshot` names them, so that either
    cache gives the same fingerprints. Empty when they cannot be matched."""
    snapshot = _hub_snapshot(repo)
    files = [str(f.get("filename", "")) for ds in loaded.values() for f in ds.cache_files]
    if snapshot is None or not files:
        return {}
    folder = os.path.dirname(files[0])  # ORG___NAME/CONFIG/VERSION/REVISION
    if os.path.basename(folder) != os.path.basename(snapshot) or any(os.path.dirname(f) != folder for f in files):
        return {}
    try:
        with _quiet(datasets):
            builder = datasets.load_dataset_builder(snapshot, name=os.path.basename(os.path.dirname(
                os.path.dirname(folder))), cache_dir=datasets_cache_dir())
        data_files = builder.config.data_files or {}
        if all(data_files.get(name) for name in loaded):
            return {name: _blob_identity(snapshot, data_files[name]) for name in loaded}
    except Exception:  # noqa: BLE001 - another layout than the hub's: the arrow files' own identities
        pass
    return {}


def _prepared_configs(repo: str) -> list[str]:
    """The configurations of ``repo`` that ``load_dataset`` left in the datasets cache (``ORG___NAME/CONFIG/...``)."""
    import glob

    from datasets import config as ds_config
    from datasets.naming import camelcase_to_snakecase

    parts = repo.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(datasets_cache_dir() or str(ds_config.HF_DATASETS_CACHE), "___".join(parts))
    return sorted({os.path.basename(os.path.dirname(os.path.dirname(p)))
                   for p in glob.glob(os.path.join(glob.escape(root), "*", "*", "*")) if os.path.isdir(p)})


def _config_error(spec: str, repo: str, config: str | None, known: list[str]) -> DataError:
    if config is None:
        return DataError(f"data source {spec!r} has several configurations in the local cache ({', '.join(known)})",
                         "set data.hf_config to one of them")
    return DataError(f"data source {spec!r} has no configuration {config!r} in the local cache "
                     f"(configurations: {', '.join(known) or 'none'})",
                     f"set data.hf_config to one of those, or fetch it once online: "
                     f"datasets.load_dataset('{repo}', '{config}')")


def _open_snapshot(datasets: Any, spec: str, repo: str, snapshot: str,
                   config: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The splits of a hub snapshot folder (configurations and splits as its README declares them), converted
    into the datasets cache as ``hf:DIR`` is. Each split is identified by its data files' blobs, which the hub
    names by their content hash, and sizes: the same files give the same fingerprints wherever the cache is."""
    with _quiet(datasets):
        try:
            names = list(datasets.get_dataset_config_names(snapshot))
        except Exception:  # noqa: BLE001 - a README that does not parse: load_dataset_builder says why below
            names = []
    if config and names and config not in names:
        raise _config_error(spec, repo, config, sorted(set(names) | set(_prepared_configs(repo))))
    try:
        with _quiet(datasets):
            builder = datasets.load_dataset_builder(snapshot, name=config, cache_dir=datasets_cache_dir())
            builder.download_and_prepare()
            loaded = _split_dict(datasets, builder.as_dataset())
    except Exception as exc:  # noqa: BLE001 - a partial download, unreadable files, a bad README
        if config is None and len(names) > 1:  # and none of them is the default
            raise _config_error(spec, repo, None, names) from None
        raise DataError(f"cannot load the Hugging Face dataset {repo} of {spec!r} from its cached files "
                        f"({_first_line(exc)})", _fetch_hint(repo)) from None
    files = builder.config.data_files or {}
    return loaded, {name: _blob_identity(snapshot, files[name]) for name in loaded if files.get(name)}


def _blob_identity(snapshot: str, paths: list[str]) -> str:
    """``blob:size`` of each data file of a split, in order; a file that is no link into the cache's blobs (a
    copy) is named by its path in the repository and modification time instead."""
    parts = []
    for path in paths:
        real = os.path.realpath(path)
        stat = os.stat(real)
        linked = os.path.islink(path) and os.path.basename(os.path.dirname(real)) == "blobs"
        name = os.path.basename(real) if linked else f"{os.path.relpath(path, snapshot)}@{stat.st_mtime_ns}"
        parts.append(f"{name}:{stat.st_size}")
    return "hub-files|" + ",".join(parts)


def _choose_splits(spec: str, splits: dict[str, Any], s: HFSettings) -> tuple[list[str], str | None]:
    """The splits read (in order) and which of them is the official test split (or None)."""
    names = list(s.splits) if s.splits else list(splits)
    missing = [n for n in names if n not in splits]
    if missing:
        raise DataError(f"data source {spec!r} has no split {missing[0]!r} (splits: {', '.join(splits)})",
                        "set data.hf_splits to some of those")
    if s.test_split is not None:
        if s.test_split not in names:
            raise DataError(f"data.hf_test_split {s.test_split!r} is not among the splits read from {spec!r} "
                            f"({', '.join(names)})", "name one of them, or add it to data.hf_splits")
        return names, s.test_split
    return names, next((n for n in ("test", "validation") if n in names and len(names) > 1), None)


def _column(spec: str, features: dict, named: str | None, kinds: tuple[str, ...], setting: str, what: str) -> str:
    """The column holding ``what``: the one named by ``setting``, or the only one of a feature type in ``kinds``."""
    if named is not None:
        if named not in features:
            raise DataError(f"data source {spec!r} has no column {named!r} (columns: {', '.join(features)})",
                            f"set {setting} to one of those")
        return named
    found = [name for name, f in features.items() if type(f).__name__ in kinds]
    if len(found) != 1:
        state = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise DataError(f"data source {spec!r} has {state} {kinds[0]} column for the {what} "
                        f"(columns: {', '.join(features)})", f"set {setting} to the column holding the {what}")
    return found[0]


def _image_kind(spec: str, feature: Any, column: str) -> bool:
    """Whether the image column holds raw bytes (True) or is an ``Image`` feature (False)."""
    if type(feature).__name__ == "Image":
        return False
    if getattr(feature, "dtype", None) in ("binary", "large_binary"):
        return True
    raise DataError(f"column {column!r} of {spec!r} is {feature}, not an Image feature or encoded image bytes",
                    "set data.image_column to the column holding the images")


def _labels(spec: str, parts: dict[str, Any], column: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Labels per split as int64 and the class names: a ClassLabel's names, the sorted strings of a string
    column, or 0..max of an integer column."""
    feature = next(iter(parts.values())).features[column]
    raw = {name: np.asarray(ds.with_format("numpy")[column]) for name, ds in parts.items()}  # an indices map too
    if type(feature).__name__ == "ClassLabel":
        return {k: v.astype(np.int64) for k, v in raw.items()}, [str(n) for n in feature.names]
    dtype = str(getattr(feature, "dtype", feature))
    if dtype in ("string", "large_string"):
        names = sorted({str(x) for v in raw.values() for x in v})
        index = {n: i for i, n in enumerate(names)}
        return {k: np.array([index[str(x)] for x in v], dtype=np.int64) for k, v in raw.items()}, names
    if dtype.startswith(("int", "uint")):
        labels = {k: v.astype(np.int64) for k, v in raw.items()}
        top = max((int(v.max()) for v in labels.values() if v.size), default=-1)
        return labels, [str(k) for k in range(top + 1)]
    raise DataError(f"column {column!r} of {spec!r} is {feature}, not a class label",
                    "set data.label_column to a ClassLabel, integer or string column")


def _check_labels(spec: str, labels: dict[str, np.ndarray], n_classes: int) -> None:
    for name, lab in labels.items():
        bad = np.flatnonzero((lab < 0) | (lab >= n_classes))
        if bad.size:
            raise DataError(f"split {name!r} of {spec!r} has label {int(lab[bad[0]])} at row {int(bad[0])}, outside "
                            f"the {n_classes} classes (0..{n_classes - 1})",
                            "fix the labels, or leave that split out with data.hf_splits (unlabeled rows are -1)")


def load_hf(spec: str, arg: str, options: DataConfig | None) -> Source:
    """Load ``hf:ARG`` as a :class:`Source` whose rows are decoded on demand by an :class:`HFRows`."""
    datasets = import_datasets()
    s = HFSettings.of(options)
    splits, identities = _open(datasets, spec, arg, s.config)
    names, test_split = _choose_splits(spec, splits, s)
    features = splits[names[0]].features
    image_col = _column(spec, features, s.image_column, ("Image",), "data.image_column", "images")
    label_col = _column(spec, features, s.label_column, ("ClassLabel",), "data.label_column", "labels")
    for name in names[1:]:
        other = splits[name].features
        for col in (image_col, label_col):
            if col not in other or other[col] != features[col]:
                raise DataError(f"split {name!r} of {spec!r} has another {col!r} column than split {names[0]!r}",
                                "read only splits of the same features (data.hf_splits)")
    binary = _image_kind(spec, features[image_col], image_col)
    parts = {n: splits[n] for n in names}
    labels, class_names = _labels(spec, parts, label_col)
    _check_labels(spec, labels, len(class_names))
    reader = HFRows(spec, parts, image_col, binary, datasets, identities)
    official = np.concatenate([np.full(len(parts[n]), n == test_split) for n in names])
    return finish(Source(spec=spec, kind="hf", class_names=class_names,
                         labels=np.concatenate([labels[n] for n in names]), in_chans=3,
                         official_test=official if test_split is not None else None, reader=reader))


class HFRows:
    """Row ``i`` of the concatenated splits, decoded: the image column alone, read undecoded from the dataset's
    memory-mapped arrow files. Pickles small (``datasets`` pickles a memory-mapped table as its file path), so
    spawned DataLoader workers reopen the files themselves."""

    def __init__(self, spec: str, parts: dict[str, Any], column: str, binary: bool, datasets: Any,
                 identities: dict[str, str] | None = None):
        self.spec, self.column, self.binary = spec, column, binary
        self.names = list(parts)
        self.parts = [ds.select_columns([column]) if binary else
                      ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
                      for ds in parts.values()]
        self.starts = np.cumsum([0] + [len(ds) for ds in self.parts])
        self.identity = b"".join(_split_identity(name, ds, (identities or {}).get(name))
                                 for name, ds in parts.items())

    def _locate(self, row: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return k, row - int(self.starts[k])

    def __call__(self, row: int) -> Any:
        k, local = self._locate(int(row))
        value = self.parts[k][local][self.column]
        what = f"row {row} ({self.names[k]} row {local}) of {self.spec!r}"
        if value is None:
            raise DataError(f"{what} has no image", _BAD_ROW_FIX)
        data = value if self.binary else value.get("bytes")
        if data is None and not self.binary and value.get("path"):
            try:
                with open(value["path"], "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise DataError(f"cannot read the image file {value['path']} of {what}: {exc.strerror or exc}",
                                "restore the file the dataset points to") from None
        if not data:
            raise DataError(f"{what} has no image bytes", _BAD_ROW_FIX)
        return decode_image(data, what, _BAD_ROW_FIX)

    def row_key(self, row: int) -> bytes:
        return b""  # a row is named by its place in the splits, which the identity fixes


def _split_identity(name: str, ds: Any, files: str | None = None) -> bytes:
    """A split's name, datasets fingerprint, row count, and its arrow files' names and sizes; or, for a hub
    dataset read from its cached files, its name, row count and ``files`` (what names its data files)."""
    if files is not None:
        text = f"{name}|{len(ds)}|{files}".encode()
        return struct.pack("<q", len(text)) + text
    paths = []
    for f in ds.cache_files:
        path = f.get("filename", "")
        size = os.stat(path).st_size if path and os.path.exists(path) else -1
        paths.append(f"{os.path.basename(path)}:{size}")
    text = f"{name}|{ds._fingerprint}|{len(ds)}|{','.join(paths)}".encode()
    return struct.pack("<q", len(text)) + text
