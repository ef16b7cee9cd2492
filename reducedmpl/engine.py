"""What every stage shares: device, seeding, RNG state, metrics, evaluation, run folders, progress."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

import numpy as np
import torch
import yaml
from torch import nn

from .errors import ConfigError, Interrupted, UserError, writing


# ------------------------------------------------------------------------------------------------ device
def resolve_device(name: str) -> torch.device:
    from .distributed import local_device

    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked, but CUDA is not available here", "use --device cpu or auto")
    try:
        return local_device(torch.device(name))
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from None


def autocast(device: torch.device, enabled: bool):
    """bfloat16/float16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda")


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ------------------------------------------------------------------------------------------------ seeding
def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _plain(state)


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj: Any) -> Any:
    """Convert RNG states to types that ``torch.load(weights_only=True)`` accepts."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64))
    if isinstance(obj, (tuple, list)):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ------------------------------------------------------------------------------------------------ run folders
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "reduced_teacher.pt", "probes.json", "result.json")


def prepare_out_dir(out: str | Path, artifact: str, resume: bool, overwrite: bool) -> Path:
    """Make ``out`` ready for a run, refusing to mix two runs in one folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder", "choose another --out")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", "pass only one of them")
    holds_run = out.is_dir() and any((out / n).exists() for n in (artifact, "last.pt", "config.yaml"))
    if holds_run and not (resume or overwrite):
        if (out / artifact).exists() and not (out / "last.pt").exists():
            raise UserError(f"output folder {out} already holds a run, a finished one",
                            "pass --overwrite to replace it, or choose another --out")
        raise UserError(f"output folder {out} already holds a run, an unfinished one",
                        "pass --resume to continue it, --overwrite to replace it, or choose another --out")
    if overwrite and holds_run:
        for name in (artifact, "last.pt", "best.pt", "config.yaml", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    if holds_run:  # temporary files of an interrupted write (they are never read)
        for name in (artifact, *RUN_FILES):
            (out / f".{name}.tmp").unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out} ({e.strerror or e})",
                        "choose a writable --out or fix its permissions") from None
    return out


def resume_state(out: Path, artifact: str, resume: bool, config: dict, ignore: tuple[str, ...] = ()) -> dict | None:
    """The ``last.pt`` state to continue from with ``--resume`` (None: start from the beginning).

    Refuses a folder with no run, a finished run, and a run started with other settings."""
    if not resume:
        return None
    from .models import safe_load

    last = out / "last.pt"
    if not (out / "config.yaml").exists():
        raise UserError(f"there is no run to resume in {out}", "drop --resume to start a new run there")
    if (out / artifact).exists() and not last.exists():
        raise UserError(f"{out} holds a finished run", "pass --overwrite to run it again")
    if not last.exists():
        return None  # interrupted before its first checkpoint
    state = safe_load(last, what="resume checkpoint")
    saved = state.get("config")
    if not isinstance(saved, dict) or _without(saved, ignore) != _without(config, ignore):
        differ = _differing_keys(saved if isinstance(saved, dict) else {}, config, ignore)
        raise UserError(f"the run in {out} was started with other settings ({', '.join(differ[:5])}"
                        f"{', ...' if len(differ) > 5 else ''} differ)",
                        "resume with the same settings, or pass --overwrite to start again")
    return state


def _differing_keys(a: dict, b: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested settings dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing_keys(x, y, (), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


def _without(config: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


def prepare_run(out: str | Path, artifact: str, resume: bool, overwrite: bool, config: dict,
                dist: Any, ignore: tuple[str, ...] = ()) -> tuple[Path, dict | None]:
    """:func:`prepare_out_dir` and :func:`resume_state` on rank 0 (every rank gets their verdict); the other
    ranks then read the same ``last.pt`` themselves."""
    from .models import safe_load

    state = None

    def check() -> tuple[Path, bool]:
        nonlocal state
        folder = prepare_out_dir(out, artifact, resume, overwrite)
        state = resume_state(folder, artifact, resume, config, ignore)
        return folder, state is not None

    folder, has_state = dist.on_main(check)
    if has_state and state is None:
        state = safe_load(folder / "last.pt", what="resume checkpoint")
    return folder, state


def rank_rng_states(dist: Any) -> Any:
    """What a checkpoint keeps of the RNG: this process's state, or every rank's (a list) under torchrun."""
    return dist.gather(rng_state()) if dist.enabled else rng_state()


def restore_rank_rng(saved: Any, dist: Any) -> bool:
    """Restore this rank's RNG from :func:`rank_rng_states`; False (RNG left as seeded) when the checkpoint was
    written by another number of processes."""
    if isinstance(saved, list):
        saved = saved[dist.rank] if len(saved) == dist.world_size else None
    elif dist.enabled:
        saved = None
    if saved is None:
        return False
    set_rng_state(saved)
    return True


def wrap_ddp(model: nn.Module, device: torch.device, dist: Any) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun (itself otherwise); parameters come from rank 0."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (:func:`models.atomic_file`)."""
    from .models import atomic_file

    with atomic_file(path, "w") as f:
        f.write(text)


def write_config(out: Path, config: dict) -> None:
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path, keep_until: tuple[str, float] | None = None, enabled: bool = True):
        from .logsinks import sinks_for

        self.path, self.enabled, self.sinks = path, enabled, []
        if not enabled:  # not rank 0: writes nothing
            return
        if keep_until is not None and path.exists():
            key, last = keep_until  # rows without the key (the final row) come after every checkpoint
            rows = [r for r in read_jsonl(path) if key in r and r[key] <= last]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        elif keep_until is None:
            write_text_atomic(path, "")
        self.sinks = sinks_for(path, keep_until)  # e.g. TensorBoard (--log), fed every row below

    def write(self, **row: Any) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a") as f:  # a torn row is dropped on resume
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        for sink in self.sinks:
            sink.write({k: _jsonable(v) for k, v in row.items()})


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash
    return rows


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: bool = False,
             channels_last: bool = False, dist: Any = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches``; restores the model's mode.

    With ``dist`` each rank evaluates its share of the batches and the sums are added over the ranks; the
    model's buffers (BatchNorm statistics, which each rank updates from its own batches) are rank 0's first."""
    if dist is not None:
        dist.broadcast_(model.buffers())
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y, _ in batches:
        if not len(y):
            continue
        x, y = to_device(x, device, channels_last), y.to(device)
        with autocast(device, amp):
            logits = model(x)
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    if dist is not None:
        loss_sum, correct, n = dist.sum([loss_sum, correct, n])
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, device: torch.device, amp: bool = False,
                   channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(float32 logits on CPU, labels, ids) per batch, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        for x, y, ids in batches:
            with autocast(device, amp):
                logits = model(to_device(x, device, channels_last))
            yield logits.float().cpu(), y, ids
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ optim
def create_optimizer(model_or_params: Any, cfg: Any) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(model_or_params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"optimizer {cfg.opt!r} is not available ({e})",
                          "use one of timm's names, e.g. sgd, momentum, adamw, lamb") from None


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int, warmup_steps: int):
    """A per-step scheduler from timm's factory (``step_update`` each step)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=max(total_steps, 1), decay_epochs=max(total_steps // 3, 1),
        warmup_epochs=warmup_steps, warmup_lr=cfg.lr * 0.01 if warmup_steps else 0.0, min_lr=cfg.min_lr,
        cooldown_epochs=0, step_on_epochs=False, updates_per_epoch=1)
    return scheduler


# ------------------------------------------------------------------------------------------------ progress
def rank_output(dist: Any, console: Any, quiet: bool) -> tuple[Any, bool]:
    """The console and ``quiet`` a stage uses: the given ones (stderr by default) on rank 0, silence elsewhere."""
    from rich.console import Console

    if not dist.is_main:
        return Console(quiet=True), True
    return console or Console(stderr=True), quiet


class Throughput:
    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.n += n
        return self.n / max(time.perf_counter() - self.t0, 1e-9)


def progress(disable: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable, transient=True)


# ------------------------------------------------------------------------------------------------ Ctrl-C
REPEAT_WINDOW_S = 5.0

class StopRequest:
    """Whether Ctrl-C asked the run to stop; the training loops look at :attr:`requested` between steps.

    The first Ctrl-C (SIGINT) inside :func:`graceful_stop` only sets :attr:`local`; the loop then writes its
    checkpoint and calls :meth:`stop`. ``agree`` turns the local flag into the decision: the identity for one
    process, e.g. ``Dist.any`` under torchrun so that every rank stops at the same step. Once true it stays true
    (and ``agree`` is no longer called)."""

    def __init__(self, agree: Callable[[bool], bool] | None = None):
        self.local = False
        self.agree = agree or bool
        self._decided = False

    @property
    def requested(self) -> bool:
        if not self._decided:
            self._decided = bool(self.agree(self.local))
        return self._decided

    def stop(self, where: str, checkpoint: Path) -> NoReturn:
        """Raise :class:`~reducedmpl.errors.Interrupted` (exit code 130 in the CLI) after the checkpoint is written."""
        raise Interrupted(f"interrupted at {where}; the checkpoint {checkpoint} is kept — continue with --resume")


@contextlib.contextmanager
def graceful_stop(agree: Callable[[bool], bool] | None = None) -> Iterator[StopRequest]:
    """Within the block, the first Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, or torchrun passing
    a stop on) sets ``requested`` instead of ending the process; a second one acts at once (Python's default).
    Under torchrun a Ctrl-C reaches a worker twice, from the terminal and from torchrun, so there repeats
    within :data:`REPEAT_WINDOW_S` count as one. The previous handlers are restored on leaving. Outside the main
    thread nothing is installed (``requested`` then stays false unless ``agree`` says otherwise)."""
    import signal
    import sys
    import threading

    request = StopRequest(agree)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    signals = [sig for sig in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(sig) not in (None, signal.SIG_IGN)]
    previous = {sig: signal.getsignal(sig) for sig in signals}
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    first: dict[str, float] = {}

    def on_signal(signum, frame):
        now = time.monotonic()
        if "t" in first:
            if under_torchrun and now - first["t"] < REPEAT_WINDOW_S:
                return  # the same stop, delivered twice
            for sig, handler in previous.items():  # a second request: act at once
                signal.signal(sig, handler)
            signal.raise_signal(signum)
            return
        first["t"] = now
        request.local = True
        if not under_torchrun:  # one process: a second signal should not wait
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if os.environ.get("RANK", "0") == "0":  # once, not once per rank
            print("stopping after this step to write a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr,
                  flush=True)

    for sig in signals:
        signal.signal(sig, on_signal)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
