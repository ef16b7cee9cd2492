"""Pretrained timm weights by name, through the Hugging Face Hub cache.

A model is named as timm names it: ``NAME`` (its default pretrained tag), ``NAME.TAG``, or ``hf-hub:ORG/NAME``
(``@REVISION`` optional). :func:`resolve` finds the weights file in the Hub cache (``HF_HOME``, ``HF_HUB_CACHE``;
with ``HF_HUB_OFFLINE=1`` only the cache is used, else a missing file is downloaded once) and records where it
came from: hub id, revision and the file's sha256. :func:`create_pretrained` then builds the model through
timm's own loader (``pretrained=True`` with that file), which adapts the input channels, resamples position
embeddings and replaces a classifier for another number of classes.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ConfigError

HF_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's loader looks for, in its order
# the preprocessing keys of a pretrained configuration (timm.data.resolve_model_data_config's)
PREPROCESS_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std")


@dataclass(frozen=True)
class Pretrained:
    """A resolved set of pretrained weights: which architecture, which file, and where it came from."""

    name: str  # as the user wrote it
    arch: str  # the timm architecture it builds
    hub_id: str  # ORG/NAME on the Hub
    revision: str  # the snapshot (commit) the file belongs to
    file: str  # the local path of the weights file
    sha256: str
    cfg: dict = field(default_factory=dict)  # timm's pretrained configuration (num_classes, input_size, mean, ...)
    model_args: dict = field(default_factory=dict)  # architecture arguments a hub config.json records

    @property
    def num_classes(self) -> int:
        return int(self.cfg.get("num_classes") or 0)

    def record(self) -> dict[str, str]:
        """Provenance for artifacts and stage keys."""
        return {"source": "hf-hub", "name": self.name, "hub_id": self.hub_id, "revision": self.revision,
                "file": Path(self.file).name, "sha256": self.sha256}


def is_hub_name(name: str) -> bool:
    return name.startswith(HF_PREFIX)


def split_name(name: str) -> tuple[str, str | None]:
    """``NAME.TAG`` -> (NAME, TAG); a name without a tag has tag None. Not for ``hf-hub:`` names."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _fetch_hint(hub_id: str) -> str:
    return (f"fetch it once where there is internet (`hf download {hub_id}`, or timm.create_model(..., "
            "pretrained=True)) and point HF_HOME or HF_HUB_CACHE at that cache")


def hub_cache_dir() -> str | None:
    """The Hub cache the environment names now (the library reads it once, when it is imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _download(hub_id: str, filename: str, revision: str | None, name: str) -> str:
    """The cached path of ``filename`` of ``hub_id`` (downloaded unless HF_HUB_OFFLINE=1); one-line errors."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        raise ConfigError("pretrained weights need the huggingface_hub package", "pip install huggingface_hub")
    try:
        return hf_hub_download(repo_id=hub_id, filename=filename, revision=revision, cache_dir=hub_cache_dir(),
                               local_files_only=_offline())
    except LocalEntryNotFoundError:
        raise ConfigError(f"model {name!r}: {hub_id}/{filename} is not in the Hugging Face cache and cannot be "
                          "downloaded (offline)", _fetch_hint(hub_id)) from None
    except RevisionNotFoundError:
        raise ConfigError(f"model {name!r}: revision {revision!r} of {hub_id} does not exist",
                          "name an existing revision after '@'") from None
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise ConfigError(f"model {name!r}: {hub_id}/{filename} was not found on the Hub "
                          f"({type(e).__name__})", "check the name, or pass the weights as checkpoint:PATH") from None
    except Exception as e:  # noqa: BLE001 - network, HTTP and cache-permission errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model {name!r}: cannot fetch {hub_id}/{filename} ({type(e).__name__}: {first[:120]})",
                          _fetch_hint(hub_id)) from None


def _weights_file(hub_id: str, revision: str | None, name: str, preferred: str | None) -> str:
    """The first weights file the repository has (``preferred``, else timm's order); a miss names the first."""
    first: ConfigError | None = None
    for filename in [preferred] if preferred else WEIGHT_FILES:
        try:
            return _download(hub_id, filename, revision, name)
        except ConfigError as e:
            first = first or e
    raise first


def _registry_cfg(name: str) -> tuple[str, dict]:
    """(architecture, pretrained config) of a timm ``NAME[.TAG]`` from timm's registry."""
    import timm
    from timm.models import get_pretrained_cfg

    from .models import check_model_name

    arch, tag = split_name(name)
    check_model_name(arch)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{arch}.*")]
        hint = f"known tags: {', '.join(tags[:8])}" if tags else f"{arch} has no pretrained weights in timm"
        raise ConfigError(f"timm model {arch!r} has no pretrained tag {tag!r}", hint) from None
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"timm has no Hugging Face Hub weights for {name!r}",
                          "name a tagged model with hub weights (timm.list_pretrained()), or pass checkpoint:PATH")
    return arch, cfg.to_dict()


def _hub_cfg(name: str, hub_id: str, revision: str | None) -> tuple[str, dict, dict]:
    """(architecture, pretrained config, model arguments) from an ``hf-hub:`` repository's config.json."""
    path = _download(hub_id, "config.json", revision, name)
    try:
        doc = json.loads(Path(path).read_text())
        pretrained = dict(doc.get("pretrained_cfg") or {k: v for k, v in doc.items() if k != "architecture"})
        arch = str(doc["architecture"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"model {name!r}: {path} is not a timm config.json ({type(e).__name__})",
                            "check the repository, or pass the weights as checkpoint:PATH") from None
    if "num_classes" in doc:
        pretrained["num_classes"] = doc["num_classes"]
    from .models import check_model_name

    check_model_name(arch)
    args = doc.get("model_args") or {}
    return arch, pretrained, dict(args) if isinstance(args, dict) else {}


def resolve(name: str, weights: bool = True) -> Pretrained:
    """Find the pretrained weights of ``name`` in the Hub cache (fetching them unless offline); with ``weights``
    False only its configuration (architecture, model arguments), for a model trained from scratch."""
    args: dict = {}
    if is_hub_name(name):
        repo, _, rev = name[len(HF_PREFIX):].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"model {name!r} is not of the form hf-hub:ORG/NAME", "e.g. hf-hub:timm/resnet18.a1_in1k")
        arch, cfg, args = _hub_cfg(name, repo, rev or None)
    else:
        arch, cfg = _registry_cfg(name)
        repo, _, rev = cfg["hf_hub_id"].partition("@")
    hub_id, revision = repo, (rev or None)
    if not weights:
        return Pretrained(name, arch, hub_id, revision or "", "", "", cfg, args)
    path = _weights_file(hub_id, revision, name, cfg.get("hf_hub_filename"))
    snapshot = Path(path).parent.name if Path(path).parent.parent.name == "snapshots" else (revision or "")
    return Pretrained(name, arch, hub_id, snapshot, path, file_digest(path), cfg, args)


def file_digest(path: str | Path) -> str:
    """A weights file's sha256, hashed once per process for the same file, size and modification time (a `run`
    plans every stage, then each stage resolves its model again)."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from .targets import file_sha256

    return file_sha256(path)


def create_pretrained(weights: Pretrained, num_classes: int, in_chans: int, input_size: int | None = None,
                      **kwargs: Any):
    """The model with ``weights``, through timm's loader (from the resolved file, nothing is fetched); a classifier
    for another class count is replaced."""
    from .models import create_model

    cfg = {k: v for k, v in weights.cfg.items() if k in _cfg_fields()}
    cfg.update(file=weights.file, source="", hf_hub_id="", url="", hf_hub_filename=None, state_dict=None)
    model_args = {**weights.model_args, **kwargs}
    for key in ("num_classes", "in_chans", "img_size", "pretrained_cfg", "pretrained", "pretrained_cfg_overlay"):
        model_args.pop(key, None)
    with silence_timm():
        try:
            return create_model(weights.arch, num_classes, in_chans, input_size, pretrained=True, pretrained_cfg=cfg,
                                **model_args)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ArtifactError(f"the weights of {weights.name!r} ({weights.file}) do not load into {weights.arch!r} "
                                f"({type(e).__name__}: {first[:120]})",
                                "check the file (it may be truncated: delete it from the cache and fetch it "
                                "again)") from None


@functools.lru_cache(maxsize=1)
def _cfg_fields() -> frozenset[str]:
    """The field names of timm's PretrainedCfg (what a pretrained configuration may hold)."""
    import dataclasses

    from timm.models import PretrainedCfg

    return frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


def save_to_cache(cache: str | Path, repo: str, state_dict: dict, config: dict | None = None,
                  revision: str = "0" * 40) -> Path:
    """Put weights (and a timm ``config.json``) into a Hugging Face Hub cache in the hub's own layout, as a download
    would: ``models--ORG--NAME/blobs/SHA256``, ``snapshots/REVISION/FILE`` linking there, ``refs/main``. For offline
    machines and tests; ``hf-hub:ORG/NAME`` then resolves to it. Returns the snapshot folder."""
    import hashlib

    from safetensors.torch import save_file

    org, _, name = repo.partition("/")
    folder = Path(cache) / f"models--{org}--{name}"
    snapshot = folder / "snapshots" / revision
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    incoming = folder / "blobs" / "incoming"
    files = {"model.safetensors": None, **({"config.json": json.dumps(config, indent=1)} if config else {})}
    for filename, text in files.items():
        if text is None:
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(incoming))
        else:
            incoming.write_text(text)
        blob = folder / "blobs" / hashlib.sha256(incoming.read_bytes()).hexdigest()
        incoming.replace(blob)
        link = snapshot / filename
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return snapshot


@contextmanager
def silence_timm():
    """timm's loader logs and warns about what it adapts (a replaced classifier, resampled position embeddings);
    the stages say it in their own notes instead."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
