"""``reducedmpl train-large``: train (or load) the large teacher on the labeled split.

Reads top to bottom: set up data and model, ``train_one_epoch``, ``validate``, checkpoint, repeat; then write
``teacher.pt``. ``last.pt`` holds everything needed to resume (weights, optimizer, scheduler, EMA, RNG state),
so an interrupted run continued with ``--resume`` ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from .. import distributed
from ..config import TrainLargeConfig, model_input, to_dict
from ..data.loading import Batcher, model_preprocess
from ..data.setup import DataSetup, setup_data
from ..engine import stage
from ..engine.device import autocast, grad_scaler, prepare_model, to_device, wrap_ddp
from ..engine.evaluation import EVAL_BATCH_SIZE, evaluate
from ..engine.interrupt import StopRequest
from ..engine.optim import create_optimizer, create_scheduler
from ..engine.progress import Throughput
from ..engine.rng import rank_rng_states, restore_rank_rng, seed_everything
from ..data.splits import check_same_data
from ..errors import ConfigError
from ..models import ModelSource, build_artifact, build_model, check_model_fits, model_source, weights_of

ARTIFACT = "teacher.pt"


@dataclass
class EpochState:
    """How far an epoch got: the next batch and the running sums (what a mid-epoch checkpoint keeps)."""

    batch: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0


class Trainer:
    """The large teacher with its optimizer, schedule, EMA and batches: one epoch at a time."""

    def __init__(self, cfg: TrainLargeConfig, data: DataSetup, device: torch.device, dist: distributed.Dist,
                 src: ModelSource, note=None):
        self.cfg, self.data, self.device, self.dist = cfg, data, device, dist
        self.use_amp = cfg.amp and device.type == "cuda"
        seed_everything(cfg.seed)
        model = build_model(src, data.source.num_classes, data.prep.in_chans, data.prep.input_size,
                            reset_head=cfg.reset_head, note=note, drop_rate=cfg.drop_rate)
        model = prepare_model(model, device, cfg.channels_last)
        self.model = torch.compile(model) if cfg.compile else model
        self.train_model = wrap_ddp(self.model, device, dist)  # DDP under torchrun; `model` stays the plain one
        seed_everything(cfg.seed, dist.rank)

        rows = data.splits.indices
        self.batches = Batcher(data.source, rows["labeled"], data.prep, cfg.data, batch_size=cfg.batch_size,
                               train=True, seed=cfg.seed, drop_last=True, dist=dist)
        eval_bs = max(cfg.batch_size, EVAL_BATCH_SIZE)
        self.eval_batches = {name: Batcher(data.source, rows[name], data.prep, cfg.data, batch_size=eval_bs,
                                           train=False, seed=cfg.seed, dist=dist)
                             for name in ("val", "test") if len(rows[name])}
        self.steps_per_epoch = len(self.batches)
        self.optimizer = create_optimizer(self.model, cfg.optim)
        self.scheduler = create_scheduler(self.optimizer, cfg.optim, cfg.epochs * self.steps_per_epoch,
                                          int(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.scaler = grad_scaler(device, cfg.amp)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        self.step = 0

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, split: str, model: nn.Module | None = None) -> dict[str, float]:
        """Loss and accuracy on ``split`` (an empty dict when the split is empty)."""
        batches = self.eval_batches.get(split)
        if batches is None:
            return {}
        return evaluate(model or self.eval_model(), batches.epoch(0), self.device, self.use_amp,
                        self.cfg.channels_last, self.dist)

    def train_one_epoch(self, epoch: int, at: EpochState, stop: StopRequest, bar=None, task=None) -> dict:
        """One epoch from batch ``at.batch`` on (``at`` is updated); stops early, after a whole step, when
        ``stop`` is requested (then ``at.batch < steps_per_epoch``)."""
        cfg, model = self.cfg, self.train_model
        model.train()
        loss_sum, correct, seen = at.loss_sum, at.correct, at.seen
        speed = Throughput()
        for x, y, _ in self.batches.epoch(epoch, start=at.batch):
            x, y = to_device(x, self.device, cfg.channels_last), y.to(self.device)
            with autocast(self.device, self.use_amp):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            self._update(loss)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            ips = speed.add(len(y))
            if bar is not None:
                bar.update(task, advance=1, info=f"loss {loss_sum / seen:.3f}  acc {correct / seen:.3f}  "
                                                 f"{ips:.0f} img/s")
            at.batch += 1
            if at.batch < self.steps_per_epoch and stop.requested:
                break  # Ctrl-C: the caller writes a mid-epoch checkpoint
        at.loss_sum, at.correct, at.seen = loss_sum, correct, seen
        ips = speed.add(0)
        if self.dist.enabled:  # the epoch's figures over all ranks
            loss_sum, correct, seen, ips = self.dist.sum([loss_sum, correct, seen, ips])
        return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "images_per_s": ips, "lr": self.optimizer.param_groups[0]["lr"]}

    def _update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def state_dict(self, epoch_done: int, partial: EpochState | None = None) -> dict:
        """Everything to go on after epoch ``epoch_done`` (and ``partial`` into the next one); every rank takes
        part (each rank's RNG state and running sums are gathered)."""
        rng = rank_rng_states(self.dist)
        part = asdict(partial) if partial is not None else None
        if self.dist.enabled and part is not None:
            part = self.dist.gather(part)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None, "epoch": epoch_done,
                "step": self.step, "rng": rng, "partial": part,
                "data_fingerprints": dict(self.data.splits.fingerprints)}

    def load_state_dict(self, state: dict) -> tuple[int, EpochState | None]:
        """Restore a checkpoint; returns the epoch to start and where inside it (None: at its start)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        restore_rank_rng(state["rng"], self.dist)
        return state["epoch"] + 1, _rank_partial(state.get("partial"), self.dist)


def run(cfg: TrainLargeConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        console: Console | None = None, quiet: bool = False) -> dict:
    """Train (or load) the large teacher and write ``OUT/teacher.pt``; returns its metrics."""
    src = model_source(cfg.model, cfg.init)
    device, dist, console, quiet = stage.setup(cfg.device, console, quiet,
                                               {"train_large.batch_size": cfg.batch_size})
    data = teacher_data(cfg, src)
    check_model_fits(src.arch, data.source.num_classes, data.prep.in_chans, data.prep.input_size,
                     "train_large.model", drop_rate=cfg.drop_rate, **src.model_args)
    config_dict = {**to_dict(cfg), "weights": src.record()}
    init = cfg.init.removeprefix("checkpoint:") if cfg.init.startswith("checkpoint:") else None
    job = stage.StageRun(out, ARTIFACT, config_dict, dist, console, resume=resume, overwrite=overwrite,
                         inputs={"the --init checkpoint": init})
    check_same_data(job.state, data.splits.fingerprints, job.out)
    t = Trainer(cfg, data, device, dist, src, note=console.print if job.main and not resume else None)
    start_epoch, resume_at = 0, None
    if job.state is not None:
        start_epoch, resume_at = t.load_state_dict(job.state)
        inside = f", batch {resume_at.batch + 1}/{t.steps_per_epoch}" if resume_at else ""
        console.print(f"resuming {job.out} at epoch {start_epoch + 1}/{cfg.epochs}{inside}")
    metrics = job.start(("epoch", start_epoch - 1), {"val_acc": -1.0, "epoch": -1})

    t_start = time.perf_counter()
    with job.loop(quiet) as (stop, bar):
        for epoch in range(start_epoch, cfg.epochs):
            at, resume_at = resume_at or EpochState(), None
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=t.steps_per_epoch, completed=at.batch,
                                info="")
            train_stats = t.train_one_epoch(epoch, at, stop, bar, task)
            if at.batch < t.steps_per_epoch:  # Ctrl-C inside the epoch
                job.save_last(t.state_dict(epoch - 1, at))
                stop.stop(f"epoch {epoch + 1}/{cfg.epochs}, batch {at.batch}/{t.steps_per_epoch}", job.last_path)
            val = t.evaluate("val") or {"loss": float("nan"), "acc": float("nan")}
            metrics.write(epoch=epoch, step=t.step, **train_stats, val_loss=val["loss"], val_acc=val["acc"])
            job.track_best(val["acc"], {"epoch": epoch}, lambda: weights_of(t.eval_model()))
            job.save_last(t.state_dict(epoch))
            if job.main:
                bar.console.print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_stats['train_loss']:.4f}  "
                                  f"acc {train_stats['train_acc']:.4f}  val acc {val['acc']:.4f}  "
                                  f"{train_stats['images_per_s']:.0f} img/s")
            if stop.requested:
                stop.stop(f"the end of epoch {epoch + 1}/{cfg.epochs}", job.last_path)

    final = job.final_model(t.eval_model(), cfg.select)
    val, test = t.evaluate("val", final), t.evaluate("test", final)
    result = {"val_acc": val.get("acc"), "val_loss": val.get("loss"), "test_acc": test.get("acc"),
              "test_loss": test.get("loss"), "epochs": cfg.epochs, "best_epoch": job.best["epoch"],
              "train_seconds": time.perf_counter() - t_start}
    job.finish(build_artifact("teacher", final, src, data, config_dict, result, epoch=cfg.epochs), result)
    return result


def teacher_data(cfg: TrainLargeConfig, src: ModelSource) -> DataSetup:
    """The data, with the teacher's own preprocessing (its settings, else its pretrained configuration's); a
    pretrained classifier that would be replaced and never trained (``epochs: 0``) is refused."""
    data = setup_data(cfg.data)
    theirs = src.weights.num_classes if src.weights is not None else 0
    if theirs and theirs != data.source.num_classes and cfg.epochs == 0:
        raise ConfigError(f"{cfg.model!r} predicts {theirs} classes, the data {data.source.num_classes}: its classifier "
                          "would be replaced by a new one and never trained (train_large.epochs is 0)",
                          "fine-tune it: pass --epochs N (N >= 1)")
    prep = model_preprocess(data.prep, cfg.data.input_size, model_input(cfg), src.pretrained_cfg)
    return dataclasses.replace(data, prep=prep)


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
