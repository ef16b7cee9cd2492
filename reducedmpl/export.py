"""``reducedmpl export``: a teacher or student out of the tool's format, into the runtimes people deploy with.

* ``onnx``: ``torch.onnx.export`` (the ``torch.export``-based exporter when ``onnxscript`` is installed, else the
  TorchScript-based one), with a dynamic batch dimension or a fixed ``batch``. Where ``onnxruntime`` is installed
  the exported file is run on real images of the artifact's test split and its logits must match PyTorch's
  within 1e-4 (absolute, plus 1e-4 relative), else nothing is written.
* ``torchscript``: ``torch.jit.trace``; checked the same way with ``torch.jit.load``.
* ``safetensors``: the weights alone (``timm.create_model(arch, num_classes=..., in_chans=...,
  checkpoint_path=FILE)`` loads them), with the artifact's description in the file's metadata; checked by loading
  them back into the timm model.

Beside every export a sidecar ``FILE.json`` says what the model needs without this tool: class names, input
size, mean/std and whether the normalisation is inside the graph (``normalize=True``: the model takes pixels in
[0, 1]; default: it takes ``(pixels - mean) / std``, as the artifact's model does). Files are written under a
temporary name and renamed once checked.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import ArtifactError, ConfigError, writing
from .files import HDF5_SIGNATURE, check_writable, file_head, publish, refuse_overwrite, temp_path, write_json

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-4
ONNX_MIN_OPSET = 7  # the oldest opset torch.onnx writes
MAX_EXAMPLE_BYTES = 1 << 30  # inputs of a fixed --batch, made to export and check the graph
CHECK_ROWS = 64


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    batch: int | None  # None: dynamic
    exporter: str
    check: dict[str, Any] = field(default_factory=dict)  # checked, inputs, max_abs_diff, note

    def summary(self) -> str:
        batch = "" if self.format != "onnx" else ", dynamic batch" if self.batch is None else f", batch {self.batch}"
        c = self.check
        if c.get("checked"):
            checked = (f"checked against PyTorch on {c['inputs']}: max |Δ logit| {c['max_abs_diff']:.2g}"
                       if "max_abs_diff" in c else f"checked: {c['inputs']}")
        else:
            checked = f"not checked ({c.get('note', 'no runtime')})"
        size = self.path.stat().st_size
        return (f"exported {self.format} ({self.exporter}{batch}, {size / 1e6:.2f} MB) -> {self.path}; "
                f"{checked}; sidecar {self.sidecar}")


class Normalized(nn.Module):
    """``model((x - mean) / std)``: an exported graph that takes pixels in [0, 1]."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


# ---------------------------------------------------------------------------------------------- input
def load_exportable(path: str | Path) -> dict:
    """A teacher/student artifact; a targets store, a reduced teacher or a damaged file is an ArtifactError."""
    from .models import ARTIFACT_KEYS, check_finite, safe_load

    path = Path(path)
    if path.is_dir() or path.suffix in (".h5", ".hdf5") or file_head(path) == HDF5_SIGNATURE:
        raise ArtifactError(f"{path} is a targets store (logits, no model) and cannot be exported",
                            "pass the teacher.pt or student.pt of a run")
    art = safe_load(path, what="artifact")
    kind = art.get("kind") if isinstance(art, dict) else None
    if kind not in ("teacher", "student"):
        found = f"kind {kind!r}" if isinstance(art, dict) else type(art).__name__
        hint = " (the reduced teacher only works on stored targets)" if kind == "reduced_teacher" else ""
        raise ArtifactError(f"{path} is not a reducedmpl teacher or student artifact ({found}){hint}",
                            "pass the teacher.pt or student.pt of a run")
    missing = [k for k in ARTIFACT_KEYS if k not in art]
    if missing:
        raise ArtifactError(f"{kind} artifact {path} lacks {', '.join(missing)}", "write it again with this version")
    check_finite(art["state_dict"], path, kind)
    return art


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask



def check_inputs(art: dict, rows: int = CHECK_ROWS) -> tuple[torch.Tensor, str]:
    """Normalised images of the artifact's test split (rebuilt from its recorded data), else random inputs;
    and a description of which they are."""
    from .config import DataConfig, from_dict
    from .data.loading import Batcher, Preprocess
    from .data.sources import load_source
    from .data.splits import make_splits
    from .errors import UserError

    prep = Preprocess.from_dict(art["preprocess"])
    try:
        cfg = from_dict(DataConfig, dict(art["data"]), "data")
        source = load_source(cfg.source, cfg)
        splits = make_splits(source, cfg)
        split = next(s for s in ("test", "val", "labeled", "unlabeled") if len(splits.indices.get(s, ())))
        indices = splits.indices[split][:rows]
        x = Batcher(source, indices, prep, cfg, batch_size=len(indices), train=False, seed=0).batch(0, 0)[0]
        return x, f"{len(x)} {split} images of {cfg.source}"
    except (UserError, OSError, StopIteration, KeyError, TypeError, ValueError) as e:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, prep.in_chans, prep.input_size, prep.input_size, generator=g)
        return x, f"{rows} random inputs (the recorded data could not be loaded: {str(e)[:80]})"


def _fit_batch(x: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None:
        return x
    reps = -(-batch // len(x))
    return x.repeat(reps, 1, 1, 1)[:batch]


# ---------------------------------------------------------------------------------------------- export
def export_artifact(path: str | Path, fmt: str, out: str | Path | None = None, *, batch: int | None = None,
                    normalize: bool = False, opset: int | None = None, check: bool = True) -> ExportResult:
    """Export the model of ``path`` (teacher.pt / student.pt) as ``fmt`` to ``out`` and write ``out.json``."""
    from .models import model_from_artifact

    check_options(fmt, batch, normalize, opset)
    path = Path(path)
    art = load_exportable(path)
    check_batch_size(art, batch)
    out = Path(out) if out is not None else path.with_name(path.stem + SUFFIX[fmt])
    if out.is_dir():
        out = out / (path.stem + SUFFIX[fmt])
    if not out.parent.is_dir():
        raise ConfigError(f"the folder of --out {out} does not exist", "create it first or choose another --out")
    sidecar = out.with_name(out.name + ".json")
    refuse_overwrite({"the artifact": path}, [out, sidecar], "choose another --out: the artifact is the input")
    check_writable(out)
    try:
        model = model_from_artifact(art).eval()
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ArtifactError(f"the weights in {path} do not fit {art['arch']!r} ({first[:120]})",
                            "write the artifact again") from None
    prep = art["preprocess"]
    graph: nn.Module = Normalized(model, prep["mean"], prep["std"]).eval() if normalize else model
    inputs, described = check_inputs(art) if fmt != "safetensors" else (None, "")
    if inputs is not None and normalize:  # the graph takes pixels: undo the normalisation of the check images
        inputs = inputs * torch.tensor(prep["std"]).view(1, -1, 1, 1) + torch.tensor(prep["mean"]).view(1, -1, 1, 1)
    tmp = temp_path(out).with_suffix(f".tmp{SUFFIX[fmt]}" if fmt == "onnx" else ".tmp")  # exporters want .onnx
    try:
        with writing(out):
            if fmt == "onnx":
                exporter, opset_used = _export_onnx(graph, inputs, tmp, batch, opset)
                result = _check_onnx(graph, tmp, inputs, batch, described) if check else \
                    {"checked": False, "note": "--no-check"}
            elif fmt == "torchscript":
                exporter, opset_used = "torch.jit.trace", None
                _export_torchscript(graph, inputs, tmp)
                result = _check_torchscript(graph, tmp, inputs, described) if check else \
                    {"checked": False, "note": "--no-check"}
            else:
                exporter, opset_used = "safetensors", None
                _export_safetensors(model, art, tmp)
                result = _check_safetensors(art, tmp) if check else {"checked": False, "note": "--no-check"}
            meta = sidecar_dict(art, path, out, fmt, batch, normalize, exporter, opset_used, result)
            os.chmod(tmp, 0o666 & ~_umask())
            publish(tmp, out, sync=True)
            write_json(sidecar, meta, indent=1)
    finally:
        tmp.unlink(missing_ok=True)
        for extra in tmp.parent.glob(tmp.name + ".data"):  # external weights of a very large ONNX graph
            extra.unlink(missing_ok=True)
    return ExportResult(out, sidecar, fmt, batch, exporter, result)


def check_options(fmt: str, batch: int | None, normalize: bool, opset: int | None) -> None:
    """Refuse a format this tool has not, and an option the format would ignore."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch must be >= 1 (got {batch})", "leave it out for a dynamic batch")
    for flag, given in (("--batch", batch is not None), ("--opset", opset is not None)):
        if given and fmt != "onnx":
            raise ConfigError(f"{flag} applies to onnx only (a {fmt} export has none)",
                              f"leave out {flag}, or use --format onnx")
    if normalize and fmt == "safetensors":
        raise ConfigError("--normalize needs a graph; safetensors holds weights only",
                          "apply the sidecar's mean/std yourself, or use --format onnx or torchscript")
    check_opset(opset)


def check_batch_size(art: dict, batch: int | None) -> None:
    """Refuse a fixed ``--batch`` whose example input would not fit in memory, before it is allocated."""
    prep = art["preprocess"]
    per_image = 4 * int(prep["in_chans"]) * int(prep["input_size"]) ** 2
    if batch is not None and batch * per_image > MAX_EXAMPLE_BYTES:
        most = max(1, MAX_EXAMPLE_BYTES // per_image)
        raise ConfigError(f"--batch {batch} would make inputs of {batch * per_image / 2**30:.1f} GiB to export and "
                          f"check (at most {MAX_EXAMPLE_BYTES >> 30} GiB)", f"choose --batch {most:,} or less")


@contextlib.contextmanager
def _quiet_exporters():
    """torch's exporters warn about their own deprecations (TorchScript) and tracing details, and log (with
    tracebacks) what they try and give up; none of it is the user's to act on: the outcome is checked and
    reported instead. Python's warnings, logging and both output streams (the file descriptors too) are held."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with warnings.catch_warnings(), tempfile.TemporaryFile() as sink, \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.disable(logging.CRITICAL)
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        logging.disable(logging.NOTSET)
        for fd, copy in ((1, saved[0]), (2, saved[1])):
            os.dup2(copy, fd)
            os.close(copy)


def _onnxscript_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def check_opset(opset: int | None) -> None:
    """Refuse an ``--opset`` no exporter writes, before anything is exported."""
    if opset is None:
        return
    try:
        import onnx

        newest = int(onnx.defs.onnx_opset_version())
    except Exception:  # noqa: BLE001 - without onnx the export itself names the package
        newest = None
    if opset < ONNX_MIN_OPSET or (newest is not None and opset > newest):
        known = f"{ONNX_MIN_OPSET}..{newest}" if newest is not None else f"{ONNX_MIN_OPSET} or newer"
        raise ConfigError(f"--opset {opset} is not an ONNX opset the exporters write ({known})",
                          "choose an --opset in that range, or leave it out for the exporter's default")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0][:100]


def _export_onnx(model: nn.Module, x: torch.Tensor, tmp: Path, batch: int | None,
                 opset: int | None) -> tuple[str, int | None]:
    """(exporter name, opset read back from the file); the dynamo exporter first where onnxscript is installed.
    A file at another opset than the requested one counts as a failure of that exporter."""
    example = _fit_batch(x[:2], batch if batch is not None else 2).contiguous()
    errors = []
    if _onnxscript_available():
        try:
            with _quiet_exporters():
                shapes = None if batch is not None else ({0: torch.export.Dim("batch", min=1)},)
                program = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"],
                                            output_names=["logits"], dynamic_shapes=shapes, opset_version=opset,
                                            verbose=False, external_data=False)
                program.save(str(tmp))
            written = _opset_of(tmp)
            if opset is None or written == opset:
                return "torch.onnx (dynamo)", written
            errors.append(f"dynamo: wrote opset {written}, not {opset}")
        except Exception as e:  # noqa: BLE001 - fall back to the TorchScript-based exporter
            errors.append(f"dynamo: {_first_line(e)}")
    try:
        with _quiet_exporters():
            axes = None if batch is not None else {"input": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset or 17)
        written = _opset_of(tmp) or opset or 17
        if opset is None or written == opset:
            return "torch.onnx (TorchScript)", written
        errors.append(f"torchscript: wrote opset {written}, not {opset}")
    except ModuleNotFoundError as e:
        raise ArtifactError(f"ONNX export needs the {e.name!r} package", "pip install 'reducedmpl[export]'") from None
    except Exception as e:  # noqa: BLE001 - an operator the exporters cannot express
        errors.append(f"torchscript: {_first_line(e)}")
    raise ArtifactError(f"torch.onnx could not export this model{f' at --opset {opset}' if opset else ''} "
                        f"({'; '.join(errors)}); nothing was written",
                        "try another --opset, or --format torchscript")


def _opset_of(path: Path) -> int | None:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # noqa: BLE001 - informational only
        return None


def _reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).float().numpy()


def _compare(expected: np.ndarray, got: np.ndarray, what: str, inputs: str) -> dict[str, Any]:
    diff = float(np.abs(expected - got).max()) if expected.size else 0.0
    if got.shape != expected.shape or not np.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
        raise ArtifactError(f"the {what} export's logits differ from PyTorch's on {inputs} (max |Δ| {diff:.3g}, "
                            f"shape {got.shape} vs {expected.shape}); nothing was written",
                            "try another --opset or format, and report the model's name")
    return {"checked": True, "inputs": inputs, "max_abs_diff": diff, "tolerance": TOLERANCE}


def _check_onnx(model: nn.Module, path: Path, x: torch.Tensor, batch: int | None, inputs: str) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"checked": False, "note": "onnxruntime is not installed: pip install 'reducedmpl[export]'"}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if batch is None:
        got = session.run(None, {name: x.numpy()})[0]
    else:  # a fixed batch: every check image, in batches of that size (the last one padded)
        padded = _fit_batch(x, -(-len(x) // batch) * batch) if len(x) % batch else x
        got = np.concatenate([session.run(None, {name: padded[i:i + batch].numpy()})[0]
                              for i in range(0, len(padded), batch)])[:len(x)]
    result = _compare(_reference(model, x), got, "ONNX", inputs if batch is None else f"{inputs} in batches of {batch}")
    if batch is None and len(x) > 1:  # a dynamic batch must also take a single image
        _compare(_reference(model, x[:1]), session.run(None, {name: x[:1].numpy()})[0], "ONNX", "one image")
    return {**result, "runtime": f"onnxruntime {ort.__version__}"}


def _export_torchscript(model: nn.Module, x: torch.Tensor, tmp: Path) -> None:
    with _quiet_exporters(), torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model, x[:2].contiguous(), check_trace=False)
        traced.save(str(tmp))


def _check_torchscript(model: nn.Module, path: Path, x: torch.Tensor, inputs: str) -> dict:
    with _quiet_exporters():
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        got = loaded(x).float().numpy()
    return {**_compare(_reference(model, x), got, "TorchScript", inputs), "runtime": f"torch.jit {torch.__version__}"}


def _export_safetensors(model: nn.Module, art: dict, tmp: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in _description(art).items()})


def _check_safetensors(art: dict, path: Path) -> dict:
    from safetensors.torch import load_file

    from .models import create_model

    sd = load_file(str(path))
    model = create_model(art["arch"], art["num_classes"], art["in_chans"],
                         input_size=int(art["preprocess"]["input_size"]))
    model.load_state_dict(sd, strict=True)
    same = all(torch.equal(sd[k], v) for k, v in art["state_dict"].items() if k in sd)
    if not same or set(sd) != set(art["state_dict"]):
        raise ArtifactError("the safetensors export does not hold the artifact's weights; nothing was written",
                            "report this with the model's name")
    return {"checked": True, "inputs": f"{len(sd)} tensors equal to the artifact's, strict load into timm "
                                       f"{art['arch']!r}"}


# ---------------------------------------------------------------------------------------------- sidecar
def _description(art: dict) -> dict[str, Any]:
    prep = art["preprocess"]
    size = int(prep["input_size"])
    return {"kind": art["kind"], "arch": art["arch"], "num_classes": int(art["num_classes"]),
            "class_names": [str(c) for c in art.get("class_names") or []], "in_chans": int(art["in_chans"]),
            "input_size": [int(prep["in_chans"]), size, size], "mean": [float(m) for m in prep["mean"]],
            "std": [float(s) for s in prep["std"]]}


def sidecar_dict(art: dict, source: Path, out: Path, fmt: str, batch: int | None, normalize: bool, exporter: str,
                 opset: int | None, check: dict) -> dict[str, Any]:
    """What a user of the exported file needs to feed it and read its output."""
    desc = _description(art)
    c, h, w = desc["input_size"]
    meta: dict[str, Any] = {"file": out.name, "format": fmt, "exporter": exporter, **desc}
    if fmt == "safetensors":
        meta["load"] = (f"timm.create_model({desc['arch']!r}, num_classes={desc['num_classes']}, "
                        f"in_chans={desc['in_chans']}, checkpoint_path={out.name!r})")
    else:
        meta["input"] = {
            "name": "input", "shape": [batch if batch is not None else "batch", c, h, w], "dtype": "float32",
            "layout": "NCHW", "normalized_inside": normalize,
            "expects": "pixels in [0, 1]" if normalize else "(pixels in [0, 1] - mean) / std, per channel"}
        meta["output"] = {"name": "logits", "shape": [batch if batch is not None else "batch", desc["num_classes"]],
                          "meaning": "unnormalised class scores; softmax gives probabilities in class_names order"}
    if opset is not None:
        meta["opset"] = opset
    meta.update(check=check, source={"path": str(source), "sha256": _sha256(source)},
                metrics=art.get("metrics") or {}, tool_version=__version__)
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
