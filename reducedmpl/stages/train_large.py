"""``reducedmpl train-large``: train (or load) the large teacher on the labeled split.

Reads top to bottom: set up data and model, ``train_one_epoch``, ``validate``, checkpoint, repeat; then write
``teacher.pt``. ``last.pt`` holds everything needed to resume (weights, optimizer, scheduler, EMA, RNG state),
so an interrupted run continued with ``--resume`` ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from .. import __version__, distributed
from ..config import TrainLargeConfig, to_dict
from ..data.loading import Batcher, Preprocess, default_preprocess
from ..data.sources import Source, load_source
from ..data.splits import Splits, check_same_data, make_splits
from ..engine import (MetricsLog, StopRequest, Throughput, autocast, create_optimizer, create_scheduler, evaluate,
                      graceful_stop, grad_scaler, prepare_model, prepare_run, progress, rank_rng_states,
                      rank_output, resolve_device, restore_rank_rng, seed_everything, to_device, wrap_ddp,
                      write_config)
from ..errors import ArtifactError
from ..models import (atomic_save, check_model_fits, check_model_name, create_model, load_weights,
                      safe_load)

ARTIFACT = "teacher.pt"


@dataclass
class DataSetup:
    source: Source
    splits: Splits
    prep: Preprocess


def setup_data(cfg: TrainLargeConfig) -> DataSetup:
    source = load_source(cfg.data.source)
    splits = make_splits(source, cfg.data)
    train_rows = splits.indices["labeled"]
    prep = default_preprocess(source, train_rows, cfg.data)
    return DataSetup(source, splits, prep)


@dataclass
class EpochState:
    """How far an epoch got: the next batch and the running sums (what a mid-epoch checkpoint keeps)."""

    batch: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


def train_one_epoch(model, batcher: Batcher, epoch: int, optimizer, scheduler, scaler, ema, cfg: TrainLargeConfig,
                    device, step: int, bar=None, task=None, dist: distributed.Dist | None = None,
                    at: EpochState | None = None, stop: StopRequest | None = None) -> tuple[dict, int]:
    """One epoch from batch ``at.batch`` on (``at`` is updated); stops early, after a whole step, when ``stop`` is
    requested (then ``at.batch < len(batcher)``)."""
    model.train()
    use_amp = cfg.amp and device.type == "cuda"
    at = at if at is not None else EpochState()
    loss_sum, correct, seen = at.loss_sum, at.correct, at.seen
    speed = Throughput()
    for x, y, _ in batcher.epoch(epoch, start=at.batch):
        x, y = to_device(x, device, cfg.channels_last), y.to(device)
        with autocast(device, use_amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        scheduler.step_update(step)
        if ema is not None:
            ema.update(getattr(model, "module", model), step=step)  # the plain module inside DDP
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        ips = speed.add(len(y))
        if bar is not None:
            bar.update(task, advance=1, info=f"loss {loss_sum / seen:.3f}  acc {correct / seen:.3f}  {ips:.0f} img/s")
        at.batch += 1
        if stop is not None and at.batch < len(batcher) and stop.requested:
            break  # Ctrl-C: the caller writes a mid-epoch checkpoint
    at.loss_sum, at.correct, at.seen = loss_sum, correct, seen
    ips = speed.add(0)
    if dist is not None and dist.enabled:  # the epoch's figures over all ranks
        loss_sum, correct, seen, ips = dist.sum([loss_sum, correct, seen, ips])
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": ips, "lr": optimizer.param_groups[0]["lr"]}, step


def run(cfg: TrainLargeConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        console: Console | None = None, quiet: bool = False) -> dict:
    """Train (or load) the large teacher and write ``OUT/teacher.pt``; returns its metrics."""
    check_model_name(cfg.model)
    device = resolve_device(cfg.device)
    dist = distributed.setup(device)
    console, quiet = rank_output(dist, console, quiet)
    main = dist.is_main
    distributed.check_divisible("train_large.batch_size", cfg.batch_size, dist)
    data = setup_data(cfg)
    check_model_fits(cfg.model, data.source.num_classes, data.prep.in_chans, data.prep.input_size,
                     "train_large.model", drop_rate=cfg.drop_rate)
    config_dict = to_dict(cfg)
    out, state = prepare_run(out, ARTIFACT, resume, overwrite, config_dict, dist)
    check_same_data(state, data.splits.fingerprints, out)
    last_path = out / "last.pt"

    seed_everything(cfg.seed)
    model = create_model(cfg.model, data.source.num_classes, data.prep.in_chans, input_size=data.prep.input_size,
                         drop_rate=cfg.drop_rate)
    if cfg.init.startswith("checkpoint:"):
        load_weights(model, cfg.init.split(":", 1)[1], cfg.model, reset_head=cfg.reset_head)
    model = prepare_model(model, device, cfg.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    train_model = wrap_ddp(model, device, dist)  # DDP under torchrun; `model` stays the plain module
    seed_everything(cfg.seed, dist.rank)

    rows = data.splits.indices
    train_batches = Batcher(data.source, rows["labeled"], data.prep, cfg.data, batch_size=cfg.batch_size,
                            train=True, seed=cfg.seed, drop_last=True, dist=dist)
    eval_bs = max(cfg.batch_size, 256)
    val_batches = Batcher(data.source, rows["val"], data.prep, cfg.data, batch_size=eval_bs, train=False,
                          seed=cfg.seed, dist=dist) if len(rows["val"]) else None
    test_batches = Batcher(data.source, rows["test"], data.prep, cfg.data, batch_size=eval_bs, train=False,
                           seed=cfg.seed, dist=dist) if len(rows["test"]) else None

    optimizer = create_optimizer(model, cfg.optim)
    steps_per_epoch = len(train_batches)
    scheduler = create_scheduler(optimizer, cfg.optim, cfg.epochs * steps_per_epoch,
                                 int(cfg.optim.warmup_epochs * steps_per_epoch))
    scaler = grad_scaler(device, cfg.amp)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)

    start_epoch, step, best, resume_at = 0, 0, {"val_acc": -1.0, "epoch": -1}, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best"]
        restore_rank_rng(state["rng"], dist)
        resume_at = _rank_partial(state.get("partial"), dist)  # stopped inside an epoch
        inside = f", batch {resume_at.batch + 1}/{steps_per_epoch}" if resume_at else ""
        console.print(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs}{inside}")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until=("epoch", start_epoch - 1) if state else None,
                         enabled=main)
    if main:
        write_config(out, config_dict)

    def save_last(epoch_done: int, partial: EpochState | None = None) -> None:
        """``last.pt``: everything to go on after epoch ``epoch_done`` (and ``partial`` into the next one)."""
        rng = rank_rng_states(dist)  # every rank takes part
        partial = asdict(partial) if partial is not None else None
        if dist.enabled and partial is not None:
            partial = dist.gather(partial)  # each rank's own running sums
        if main:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "ema": ema.state_dict() if ema is not None else None, "epoch": epoch_done, "step": step,
                         "best": best, "rng": rng, "config": config_dict,
                         "partial": partial, "data_fingerprints": dict(data.splits.fingerprints)}, last_path)

    eval_model = (lambda: ema.module) if ema is not None else (lambda: model)
    use_amp = cfg.amp and device.type == "cuda"
    t_start = time.perf_counter()
    with graceful_stop(dist.any) as stop, progress(disable=quiet) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            at, resume_at = resume_at or EpochState(), None
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, completed=at.batch, info="")
            train_stats, step = train_one_epoch(train_model, train_batches, epoch, optimizer, scheduler, scaler, ema,
                                                cfg, device, step, bar, task, dist, at, stop)
            if at.batch < steps_per_epoch:  # Ctrl-C inside the epoch
                save_last(epoch - 1, at)
                stop.stop(f"epoch {epoch + 1}/{cfg.epochs}, batch {at.batch}/{steps_per_epoch}", last_path)
            val = evaluate(eval_model(), val_batches.epoch(0), device, use_amp, cfg.channels_last, dist) \
                if val_batches else {"loss": float("nan"), "acc": float("nan")}
            row = {"epoch": epoch, "step": step, **train_stats, "val_loss": val["loss"], "val_acc": val["acc"]}
            metrics.write(**row)
            if val["acc"] > best["val_acc"]:
                best = {"val_acc": val["acc"], "epoch": epoch}
                if main:
                    atomic_save({"state_dict": _weights(eval_model()), "epoch": epoch, "val_acc": val["acc"]},
                                out / "best.pt")
            save_last(epoch)
            if main:
                bar.console.print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_stats['train_loss']:.4f}  "
                                  f"acc {train_stats['train_acc']:.4f}  val acc {val['acc']:.4f}  "
                                  f"{train_stats['images_per_s']:.0f} img/s")
            if stop.requested:
                stop.stop(f"the end of epoch {epoch + 1}/{cfg.epochs}", last_path)

    dist.barrier()  # best.pt is written
    final = eval_model()
    if cfg.select == "best" and (out / "best.pt").exists():
        final.load_state_dict(safe_load(out / "best.pt")["state_dict"])
    val = evaluate(final, val_batches.epoch(0), device, use_amp, cfg.channels_last, dist) if val_batches else {}
    test = evaluate(final, test_batches.epoch(0), device, use_amp, cfg.channels_last, dist) if test_batches else {}
    result = {"val_acc": val.get("acc"), "val_loss": val.get("loss"), "test_acc": test.get("acc"),
              "test_loss": test.get("loss"), "epochs": cfg.epochs, "best_epoch": best["epoch"],
              "train_seconds": time.perf_counter() - t_start}
    if main:
        artifact = build_artifact("teacher", final, cfg.model, data, config_dict, result, epoch=cfg.epochs)
        atomic_save(artifact, out / ARTIFACT)
        metrics.write(final=True, **result)
        last_path.unlink(missing_ok=True)  # last: a run is finished once teacher.pt is there and last.pt is not
    dist.barrier()  # teacher.pt is written before any rank goes on to use it
    return result


def _rank_partial(saved: dict | list | None, dist: distributed.Dist) -> EpochState | None:
    """This rank's :class:`EpochState` from a mid-epoch checkpoint (a list of every rank's under torchrun)."""
    if saved is None:
        return None
    if isinstance(saved, list):
        if len(saved) != dist.world_size:  # written by another number of processes: the position is shared,
            return EpochState(batch=saved[0]["batch"])  # the running sums are not
        saved = saved[dist.rank]
    elif dist.enabled:
        return EpochState(batch=saved["batch"])
    return EpochState(**saved)


def _weights(model) -> dict:
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_artifact(kind: str, model, arch: str, data: DataSetup, config: dict, metrics: dict, **extra) -> dict:
    """The plain-dict artifact of DESIGN §4: weights plus everything a later stage checks."""
    num_classes = data.source.num_classes
    return {
        "kind": kind,
        "state_dict": _weights(model),
        "arch": arch,
        "num_classes": num_classes,
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


def check_artifact_data(art: dict, splits: Splits, path: Path) -> None:
    """Refuse an artifact made for other data than ``splits``."""
    theirs = art.get("data_fingerprints", {})
    for name, fp in splits.fingerprints.items():
        if name in theirs and theirs[name] != fp:
            raise ArtifactError(f"{path} was made for other data (split {name!r} differs)",
                                "use the same data settings, or rerun the earlier stage on this data")
