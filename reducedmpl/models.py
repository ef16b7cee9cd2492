"""timm model creation and checkpoint files.

Artifacts (``teacher.pt``, ``student.pt``) are plain dicts of tensors, strings and numbers, so they load with
``torch.load(path, weights_only=True)`` and with ``timm.create_model(arch, num_classes=..., in_chans=...,
checkpoint_path=PATH)``: the weights sit under ``state_dict``, which timm finds by itself.
"""
from __future__ import annotations

import difflib
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from .errors import ArtifactError, ConfigError
from .files import file_kind, is_pickle_stream


def check_model_name(name: str) -> None:
    """An architecture timm knows (``NAME`` or ``NAME.TAG``); ``hf-hub:ORG/NAME`` is checked when resolved."""
    from .hub import is_hub_name

    if is_hub_name(name) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for the names"
    raise ConfigError(f"unknown timm model {name!r}", hint)


def create_model(name: str, num_classes: int, in_chans: int, input_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model, from scratch unless ``kwargs`` say otherwise (:func:`hub.create_pretrained` passes a resolved
    weights file); nothing is ever downloaded here."""
    check_model_name(name)
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=input_size, **kwargs)
    except TypeError:  # a model without img_size
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def check_model_fits(name: str, num_classes: int, in_chans: int, input_size: int, what: str = "model",
                     **kwargs: Any) -> None:
    """One dry forward pass of a fresh ``name`` on a batch of the data's shape, on the CPU, before a run folder is
    made: a model that cannot take the input size (a ViT with a fixed patch grid, inception_v3 on 8x8 images)
    is refused in one line instead of failing inside the first training step. The process's random state is
    left as it was (building a model draws its initial weights)."""
    shape = f"{in_chans}x{input_size}x{input_size}"
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = create_model(name, num_classes, in_chans, input_size=input_size, **kwargs)
            model.eval()
            with torch.no_grad():
                out = model(torch.zeros(2, in_chans, input_size, input_size))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the model on this input
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{what} {name!r} cannot take the data's {shape} inputs "
                              f"({type(e).__name__}: {first[:80]})",
                              f"set {what.split('.')[0]}.input_size or data.input_size to a size it takes (e.g. "
                              f"224), or choose a model that takes {input_size}x{input_size} images") from None
    if tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"{what} {name!r} gives outputs of shape {tuple(out.shape)[1:]} on {shape} inputs, "
                          f"not {num_classes} class scores", "choose a classification model")


@dataclass
class ModelSource:
    """What a model name and an init mode stand for: the timm architecture, its pretrained configuration (for
    ``pretrained``: preprocessing, class count), architecture arguments, and the resolved weights."""

    name: str
    init: str
    arch: str
    pretrained_cfg: dict | None = None
    model_args: dict = field(default_factory=dict)
    weights: Any = None  # hub.Pretrained for init "pretrained"

    def record(self) -> dict:
        """Where the weights come from, for artifacts and stage keys."""
        if self.weights is not None:
            return self.weights.record()
        if self.init.startswith("checkpoint:"):
            from .hub import file_digest

            path = Path(self.init.split(":", 1)[1])
            return {"source": "checkpoint", "file": str(path), "sha256": file_digest(path) if path.is_file() else None}
        return {"source": "scratch"}


def model_source(name: str, init: str = "scratch") -> ModelSource:
    """Resolve ``name`` for ``init``: pretrained weights are found in the Hub cache (see :mod:`reducedmpl.hub`)."""
    from . import hub

    check_model_name(name)
    if init == "pretrained":
        w = hub.resolve(name)
        return ModelSource(name, init, w.arch, w.cfg, dict(w.model_args), w)
    if hub.is_hub_name(name):  # the architecture comes from the repository's config.json
        w = hub.resolve(name, weights=False)
        return ModelSource(name, init, w.arch, None, dict(w.model_args))
    return ModelSource(name, init, hub.split_name(name)[0])


def build_model(src: ModelSource, num_classes: int, in_chans: int, input_size: int | None = None,
                reset_head: bool = False, note: Callable[[str], None] | None = None, **kwargs: Any) -> nn.Module:
    """The model ``src`` describes: fresh, with its hub weights (a classifier for another class count replaced,
    said through ``note``), or with a checkpoint's weights (another classifier only with ``reset_head``)."""
    from . import hub

    kwargs = {**src.model_args, **kwargs}
    if src.weights is not None:
        model = hub.create_pretrained(src.weights, num_classes, in_chans, input_size, **kwargs)
        theirs = src.weights.num_classes
        if theirs and theirs != num_classes and note is not None:
            note(f"note: {src.name}'s classifier for {theirs} classes is replaced by a new one for {num_classes}")
        return model
    model = create_model(src.arch, num_classes, in_chans, input_size=input_size, **kwargs)
    if src.init.startswith("checkpoint:"):
        load_weights(model, src.init.split(":", 1)[1], src.arch, reset_head=reset_head)
    return model


def safe_load(path: str | Path, what: str = "checkpoint", fix: str = "write it again (or restore it)") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for missing, truncated and hostile files (``fix``:
    what to do about a damaged one)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist", "check the path")
    kind = file_kind(path)  # by its bytes: a file is not taken at its name's word
    if kind in ("hdf5", "safetensors"):
        found, fix = (("a targets store (HDF5)", "a store goes to distill --targets; pass a checkpoint here")
                      if kind == "hdf5" else ("a safetensors file of bare weights",
                                              "bare weights go to --init checkpoint:PATH or precompute --checkpoint"))
        raise ArtifactError(f"{what} {path} is {found}, not a PyTorch checkpoint", fix)
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle's protocol before it refuses it
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            with open(path, "rb") as f:  # a file object: torch.load would take a name ending .safetensors at its word
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects the safe loader refuses, or bytes that are no pickle at all
        if "Unsupported global" in str(e) or is_pickle_stream(path):
            raise ArtifactError(f"{what} {path} holds pickled Python objects, which are never loaded",
                                "save a plain state dict (tensors, numbers, strings) instead") from None
        raise ArtifactError(f"{what} {path} is corrupt: neither a PyTorch file nor a whole pickle", fix) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ArtifactError(f"{what} {path} is corrupt or truncated ({first[:80]})", fix) from None


def check_finite(weights: Any, path: str | Path, what: str = "checkpoint") -> None:
    """Refuse weights holding NaN or Inf values (a dict of tensors, or dicts of them): a model that could only
    give NaN, whatever the settings of the stage that loads it."""
    tensors = [v for v in weights.values() if isinstance(v, torch.Tensor)] if isinstance(weights, dict) else []
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point() or t.is_complex())
    if bad:
        raise ArtifactError(f"{what} {path} holds {bad:,} NaN/Inf weight values",
                            "retrain it, or restore a good copy")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.pt``/``.pth`` (bare or wrapped state dict) or ``.safetensors`` file."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        if not path.is_file():
            raise ArtifactError(f"checkpoint {path} does not exist", "check the path")
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"checkpoint {path} is not a readable safetensors file ({e.__class__.__name__})",
                                "write it again") from None
    else:
        obj = safe_load(path)
        sd = obj
        if isinstance(obj, dict):
            for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
                if isinstance(obj.get(key), dict):
                    sd = obj[key]
                    break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ArtifactError(f"checkpoint {path} holds no state dict of tensors", "pass a timm/PyTorch weights file")
    check_finite(sd, path)
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | Path, arch: str, reset_head: bool = False) -> None:
    """Load weights into ``model``; a classifier of another size only with ``reset_head``. A first convolution for
    another number of input channels (RGB weights, grey images) is adapted as timm's loader does."""
    sd = load_state_dict_file(path)
    own = model.state_dict()
    _adapt_first_conv(model, sd, own)
    head_keys = {k for k in own if _is_head_key(model, k)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    body_missing = [k for k in missing if k not in head_keys]
    if body_missing or [k for k in unexpected if not _looks_like_head(k)]:
        example = (body_missing or unexpected)[0]
        raise ArtifactError(
            f"checkpoint {path} does not fit model {arch!r} ({len(body_missing)} missing and {len(unexpected)} "
            f"unexpected keys, e.g. {example!r})", "pass the architecture the checkpoint was trained with")
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    body_mismatch = [k for k in mismatched if k not in head_keys]
    if body_mismatch:
        k = body_mismatch[0]
        raise ArtifactError(
            f"checkpoint {path} does not fit model {arch!r}: {k} has shape {tuple(sd[k].shape)}, the model "
            f"{tuple(own[k].shape)}", "pass the architecture (and in_chans) the checkpoint was trained with")
    head_problem = mismatched or [k for k in missing if k in head_keys]
    if head_problem and not reset_head:
        k = head_problem[0]
        shape = tuple(sd[k].shape) if k in sd else "none"
        raise ArtifactError(
            f"checkpoint {path} has a classifier for another number of classes ({k}: {shape}, "
            f"model: {tuple(own[k].shape)})", "allow a new classifier for this data: --reset-head (train_large.reset_head, "
            "distill.reset_head)")
    keep = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    if reset_head:
        keep = {k: v for k, v in keep.items() if k not in head_keys or not head_problem}
    model.load_state_dict(keep, strict=False)


def _adapt_first_conv(model: nn.Module, sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    from timm.models import adapt_input_conv

    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    for name in [first] if isinstance(first, str) else (first or []):
        key = f"{name}.weight"
        theirs, mine = sd.get(key), own.get(key)
        if theirs is not None and mine is not None and theirs.ndim == 4 and theirs.shape[1] != mine.shape[1] \
                and theirs.shape[0] == mine.shape[0]:
            sd[key] = adapt_input_conv(mine.shape[1], theirs)


def _is_head_key(model: nn.Module, key: str) -> bool:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return any(key.startswith(n + ".") for n in names)


def _looks_like_head(key: str) -> bool:
    return key.split(".")[0] in ("fc", "head", "classifier", "last_linear") or key.startswith("head.fc.")


ARTIFACT_KEYS = ("kind", "state_dict", "arch", "num_classes", "in_chans", "preprocess", "class_names",
                 "data", "data_fingerprints", "config", "metrics", "tool_version")


def load_artifact(path: str | Path, kind: str) -> dict:
    """Load a ``teacher.pt``/``student.pt`` artifact and check it has what later stages need."""
    obj = safe_load(path, what=f"{kind} artifact")
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind") if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(f"{path} is not a reducedmpl {kind} artifact (found {found!r})",
                            f"pass the {kind}.pt written by reducedmpl, or use --model/--checkpoint for plain weights")
    missing = [k for k in ARTIFACT_KEYS if k not in obj]
    if missing:
        raise ArtifactError(f"{kind} artifact {path} lacks {', '.join(missing)}", "write it again with this version")
    check_finite(obj["state_dict"], path, kind)
    return obj


def model_from_artifact(art: dict) -> nn.Module:
    from .data.loading import Preprocess

    prep = Preprocess.from_dict(art["preprocess"])
    model = create_model(art["arch"], art["num_classes"], art["in_chans"], input_size=prep.input_size,
                         **art.get("model_args", {}))
    model.load_state_dict(art["state_dict"])
    return model


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict of ``model`` (of the module inside a ``torch.compile`` wrapper)."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_artifact(kind: str, model: nn.Module, src: ModelSource, data: Any, config: dict, metrics: dict,
                   **extra: Any) -> dict:
    """The plain-dict artifact of DESIGN §4 (``teacher.pt``, ``student.pt``): weights plus everything a later
    stage checks. ``data`` is a :class:`~reducedmpl.data.setup.DataSetup`."""
    from . import __version__

    return {
        "kind": kind,
        "state_dict": weights_of(model),
        "arch": src.arch,
        "model_name": src.name,
        "model_args": dict(src.model_args),
        "weights": src.record(),
        "num_classes": data.source.num_classes,
        "in_chans": data.prep.in_chans,
        "input_size": [data.prep.in_chans, data.prep.input_size, data.prep.input_size],
        "preprocess": data.prep.to_dict(),
        "mean": list(data.prep.mean),
        "std": list(data.prep.std),
        "class_names": list(data.source.class_names),
        "data": config["data"],
        "data_fingerprints": dict(data.splits.fingerprints),
        "split_sizes": data.splits.sizes(),
        "config": config,
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "tool_version": __version__,
        **extra,
    }


def check_artifact_data(art: dict, fingerprints: dict[str, str], path: Path) -> None:
    """Refuse an artifact made for other data than the splits whose ``fingerprints`` are given."""
    theirs = art.get("data_fingerprints", {})
    for name, fp in fingerprints.items():
        if name in theirs and theirs[name] != fp:
            raise ArtifactError(f"{path} was made for other data (split {name!r} differs)",
                                "use the same data settings, or rerun the earlier stage on this data")
