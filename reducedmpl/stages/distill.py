"""``reducedmpl distill``: co-train a reduced teacher with the student (or run a baseline on the same loop).

The loop below reads top to bottom: draw the batch the method needs, take one step, log, evaluate, checkpoint.
What a step does is the method's business (:mod:`reducedmpl.methods`: ``supervised``, ``kd``, ``reducedmpl``
with the ``exact`` or ``reinforce`` teacher gradient), so every method runs on the same student, data, batches,
optimizer and steps, and their comparison is fair. The large teacher is never loaded: every q_L comes from the
targets store.

The pseudo-label batch is drawn from all training rows (unlabeled and labeled; ``pseudo_pool=unlabeled``: the
unlabeled ones only); the labeled batch from the labeled rows. With a store of several views each drawn row
trains on one of its stored views, rebuilt exactly, with that view's q_L (:mod:`reducedmpl.data.views`). All
randomness is a function of the seed, and ``last.pt`` holds every state, so ``--resume`` reproduces an
uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from .. import __version__, distributed, mpl
from ..config import DataConfig, DistillConfig, merge_data, model_input, to_dict
from ..data.loading import Batcher, BatchStream
from ..data.setup import DataSetup, setup_data
from ..data.views import ViewMaker, ViewPolicy
from ..engine import stage
from ..engine.device import grad_scaler, prepare_model, wrap_ddp
from ..engine.evaluation import EVAL_BATCH_SIZE, evaluate
from ..engine.optim import create_optimizer, create_scheduler
from ..engine.rng import rank_rng_states, restore_rank_rng, seed_everything
from ..engine.runs import drop_run
from ..errors import ArtifactError, ConfigError, UserError
from ..methods import (LABELED, LABELED_TARGETS, UNLABELED, UNLABELED_TARGETS, Batch, FinetuneStep, LargeTeacher, Step,
                       StepOutput, Student, Teacher, build_step)
from ..data.loading import model_preprocess
from ..models import (ModelSource, build_artifact, build_model, check_model_fits, load_artifact, model_from_artifact,
                      model_source, weights_of)
from ..targets import TargetStore, check_class_names, file_sha256

ARTIFACT = "student.pt"
PROBE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The pseudo-label stream's seed is the run's seed plus this prime, so its order never repeats the labeled one's.
UNLABELED_SEED_OFFSET = 7919


class Distiller:
    """The student and (for ``reducedmpl``) the reduced teacher, their schedules, the batch streams and the
    method's step; ``step()`` runs one training step, then the finetune steps once ``steps`` are done.

    Under torchrun the student is DistributedDataParallel over the ranks' shares of each global batch; the
    reduced teacher is a plain replica on every rank that stays identical: it starts from rank 0's parameters,
    its MPL signal comes from losses averaged over the ranks, and its gradients are averaged.
    """

    def __init__(self, cfg: DistillConfig, data: DataSetup, store: TargetStore, device: torch.device,
                 dist: distributed.Dist | None = None, student: ModelSource | None = None, note=None):
        self.cfg, self.data, self.store, self.device = cfg, data, store, device
        self.dist = dist = dist or distributed.Dist()
        src, rows, prep = data.source, data.splits.indices, data.prep
        large = load_large_teacher(cfg, data, device) if cfg.large_teacher is not None else None
        seed_everything(cfg.seed)
        student = student or model_source(cfg.student, cfg.student_init)
        model = prepare_model(build_model(student, src.num_classes, prep.in_chans, prep.input_size,
                                          reset_head=cfg.reset_head, note=note), device, cfg.channels_last)
        train_model = wrap_ddp(model, device, dist)
        if cfg.compile:
            train_model = torch.compile(train_model)
        reduced = None
        if cfg.mode == "reducedmpl":
            rt = cfg.reduced_teacher
            reduced = mpl.ReducedTeacher(src.num_classes, rt.hidden, rt.depth, rt.extra_features,
                                         rt.learn_temperature).to(device)
            dist.broadcast_([*reduced.parameters(), *reduced.buffers()])
        seed_everything(cfg.seed, dist.rank)  # the ranks' own randomness (dropout) differs from here on

        opt_s = create_optimizer(model, cfg.student_optim)
        self.schedulers = [create_scheduler(opt_s, cfg.student_optim, cfg.steps,
                                            int(cfg.student_optim.warmup_epochs * cfg.steps))]
        self.student = Student(model, train_model, opt_s, grad_scaler(device, cfg.amp), cfg.clip_grad, device,
                               cfg.amp and device.type == "cuda", cfg.channels_last, dist)
        self.teacher = None
        if reduced is not None:
            opt_t = create_optimizer(reduced, cfg.teacher_optim)
            self.schedulers.append(create_scheduler(opt_t, cfg.teacher_optim, cfg.steps,
                                                    int(cfg.teacher_optim.warmup_epochs * cfg.steps)))
            self.teacher = Teacher(reduced, opt_t, cfg.teacher_clip_grad, cfg, dist)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        self.method: Step = build_step(cfg, self.student, self.teacher, **({"large": large} if large else {}))
        self.finetune = FinetuneStep(cfg, self.student)
        pool = rows["unlabeled"] if cfg.pseudo_pool == "unlabeled" else np.union1d(rows["labeled"],
                                                                                     rows["unlabeled"])
        replay = view_replay(cfg, data, store, self.method.needs)
        self.labeled = BatchStream(Batcher(src, rows["labeled"], prep, data.config, batch_size=cfg.batch_size,
                                           train=True, seed=cfg.seed, drop_last=True, dist=dist,
                                           replay=labeled_replay(replay)))
        self.unlabeled = BatchStream(Batcher(src, pool, prep, data.config, batch_size=cfg.unlabeled_batch_size,
                                             train=True, seed=cfg.seed + UNLABELED_SEED_OFFSET, drop_last=True,
                                             dist=dist, replay=replay))
        self.step_count = 0

    def log_q(self, ids: torch.Tensor, views: np.ndarray | None = None) -> torch.Tensor:
        return torch.from_numpy(self.store.log_probs(ids.numpy(), views=views)).to(self.device)

    def batch(self, needs: frozenset[str]) -> Batch:
        """The parts of the next batch that a step ``needs``, on the device (with stored views: each row's q_L
        is that of the view its input was rebuilt from)."""
        b = Batch()
        if LABELED in needs:
            x_l, y_l, ids_l = self.labeled.next()
            b.x_l, b.y_l = self.student.to_input(x_l), y_l.to(self.device)
            if LABELED_TARGETS in needs:
                b.log_q_l = self.log_q(ids_l, self.labeled.views(ids_l))
        if UNLABELED in needs:
            x_u, _, ids_u = self.unlabeled.next()
            b.x_u = self.student.to_input(x_u)
            if UNLABELED_TARGETS in needs:
                b.log_q_u = self.log_q(ids_u, self.unlabeled.views(ids_u))
        return b

    def step(self, measure: bool) -> StepOutput:
        """One step of the method (or of the finetune); ``measure`` asks for the diagnostics that cost extra."""
        step = self.finetune if self.step_count >= self.cfg.steps else self.method
        out = step(self.batch(step.needs), measure)
        if self.dist.enabled:  # every rank reports (and checks) the same numbers: the means over the ranks
            fields = dataclasses.fields(out)
            out = StepOutput(*self.dist.mean([getattr(out, f.name) for f in fields]))
        self.step_count += 1
        if self.step_count <= self.cfg.steps:
            for scheduler in self.schedulers:
                scheduler.step_update(self.step_count)
        if self.ema is not None:
            self.ema.update(self.student.model, step=self.step_count)
        return out

    @property
    def lr(self) -> float:
        return self.student.lr

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.student.model

    def state_dict(self) -> dict:
        """Every state of the run; every rank takes part (each rank's RNG state is gathered)."""
        s = self.student
        return {"student": s.model.state_dict(), "opt_s": s.optimizer.state_dict(), "scaler": s.scaler.state_dict(),
                "teacher": self.teacher.model.state_dict() if self.teacher else None,
                "opt_t": self.teacher.optimizer.state_dict() if self.teacher else None,
                "schedulers": [sched.state_dict() for sched in self.schedulers],
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "method": self.method.state_dict(), "finetune_opt": self.finetune.state_dict(),
                "labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict(),
                "step": self.step_count, "rng": rank_rng_states(self.dist)}

    def load_state_dict(self, state: dict) -> None:
        s = self.student
        s.model.load_state_dict(state["student"])
        s.optimizer.load_state_dict(state["opt_s"])
        s.scaler.load_state_dict(state["scaler"])
        if self.teacher is not None:
            self.teacher.model.load_state_dict(state["teacher"])
            self.teacher.optimizer.load_state_dict(state["opt_t"])
        for sched, saved in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(saved)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.method.load_state_dict(state["method"])
        self.finetune.load_state_dict(state["finetune_opt"])
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])
        self.step_count = state["step"]
        restore_rank_rng(state["rng"], self.dist)


def view_replay(cfg: DistillConfig, data: DataSetup, store: TargetStore, needs: frozenset[str]) -> ViewMaker | None:
    """The stored views the training streams replay: for a store of several views, a method that reads stored
    targets, and ``replay_views`` on; else None (the student's own augmentation, the clean view's targets)."""
    if store.views <= 1 or not cfg.replay_views or not needs & {LABELED_TARGETS, UNLABELED_TARGETS}:
        return None
    return ViewMaker(data.source, data.prep, ViewPolicy.from_dict(store.meta.view_policy), store.ids)


def labeled_replay(replay: ViewMaker | None) -> ViewMaker | None:
    """The views the labeled stream replays: none from a store of mixed views. A mixed view of a labeled row is
    partly another row, so the row's label is not its label; the labeled losses (the student's, the reduced
    teacher's, the MPL feedback) take the row's own image under the student's augmentation and the clean view's
    target instead."""
    return replay if replay is None or replay.policy.view_mix == "none" else None


def load_large_teacher(cfg: DistillConfig, data: DataSetup, device: torch.device) -> LargeTeacher:
    """The large teacher of online-kd (``teacher.pt``), checked against the data's classes."""
    from ..data.loading import Preprocess

    art = load_artifact(cfg.large_teacher, "teacher")
    if art["num_classes"] != data.source.num_classes or list(art["class_names"]) != list(data.source.class_names):
        raise ArtifactError(f"teacher {cfg.large_teacher} predicts other classes than the data "
                            f"({art['num_classes']} vs {data.source.num_classes})",
                            "pass the teacher.pt trained on this data")
    return LargeTeacher(model_from_artifact(art), data.prep, Preprocess.from_dict(art["preprocess"]), device,
                        cfg.amp and device.type == "cuda")


# ---------------------------------------------------------------------------------------------- evaluation
def eval_sample(rows: np.ndarray, size: int | None) -> np.ndarray:
    """At most ``size`` of ``rows``, evenly spaced (all of them for None): the labeled rows a periodic evaluation
    reads, so its cost does not grow with the labeled set (a million labeled rows would be a full pass each time)."""
    if size is None or len(rows) <= size:
        return rows
    return rows[np.linspace(0, len(rows) - 1, size).round().astype(np.int64)]


class Evaluation:
    """Validation, labeled-train and test accuracy of the student, and of both teachers from the store. The labeled
    figures read a fixed sample of ``labeled_eval_size`` labeled rows (:func:`eval_sample`); val and test all."""

    def __init__(self, d: Distiller, data: DataSetup, store: TargetStore):
        self.d, self.data, self.store = d, data, store
        self.rows = rows = {**data.splits.indices,
                            "labeled": eval_sample(data.splits.indices["labeled"], d.cfg.labeled_eval_size)}
        self.batches = {name: Batcher(data.source, rows[name], data.prep, data.config, batch_size=EVAL_BATCH_SIZE,
                                      train=False, seed=0, dist=d.dist)
                        for name in ("val", "labeled", "test") if len(rows[name])}

    def accuracy(self, split: str, model: torch.nn.Module) -> dict[str, float]:
        if split not in self.batches:
            return {}
        d = self.d
        return evaluate(model, self.batches[split].epoch(0), d.device, d.student.use_amp, d.cfg.channels_last,
                        d.dist)

    def now(self) -> dict:
        """The periodic evaluation row."""
        model = self.d.eval_model()
        row = {}
        if "val" in self.batches:
            row["val_acc"] = self.accuracy("val", model)["acc"]
        row["labeled_acc_student"] = self.accuracy("labeled", model)["acc"]
        return {**row, **self.teachers()}

    @torch.no_grad()
    def teachers(self) -> dict:
        """Accuracy of the reduced and the large teacher on labeled and val rows (from stored targets)."""
        out, teacher = {}, self.d.teacher
        if teacher is None:
            return out
        for split in ("labeled", "val"):
            ids = self.rows[split]
            if not len(ids) or split not in self.store.meta.fingerprints:
                continue
            log_q = torch.from_numpy(self.store.log_probs(ids)).to(self.d.device)
            y = torch.from_numpy(self.data.source.labels[ids]).to(self.d.device)
            out[f"{split}_acc_teacher"] = (teacher.model(log_q).argmax(1) == y).float().mean().item()
            out[f"{split}_acc_large"] = (log_q.argmax(1) == y).float().mean().item()
        return out


class Probes:
    """The reduced teacher's distributions on a fixed set of examples at 0/25/50/75/100 % of training."""

    def __init__(self, data: DataSetup, store: TargetStore, cfg: DistillConfig):
        rows = data.splits.indices
        pool = rows["unlabeled"] if len(rows["unlabeled"]) else rows["labeled"]
        n = min(cfg.probe_size, len(pool))
        ids = pool[np.linspace(0, len(pool) - 1, n).astype(int)] if n else np.zeros(0, np.int64)
        self.data = {"ids": ids.tolist(), "labels": data.source.labels[ids].tolist(),
                     "large": store.log_probs(ids).tolist() if len(ids) else [], "snapshots": {}}
        self.at = {int(round(p * cfg.steps)): p for p in PROBE_POINTS}

    @torch.no_grad()
    def snapshot(self, d: Distiller) -> None:
        if d.teacher is None or not self.data["ids"] or d.step_count not in self.at:
            return
        log_q = torch.tensor(self.data["large"], dtype=torch.float32, device=d.device)
        self.data["snapshots"][str(self.at[d.step_count])] = F.log_softmax(d.teacher.model(log_q), -1).cpu().tolist()


# ---------------------------------------------------------------------------------------------- the stage
def resolve_data(cfg: DistillConfig, store: TargetStore) -> DataConfig:
    """The data settings recorded in the store, with the config's ``data`` settings over them."""
    recorded = store.meta.config.get("data") if isinstance(store.meta.config, dict) else None
    if not isinstance(recorded, dict) and not cfg.data:
        raise ArtifactError(f"targets store {store.path} does not record its data settings",
                            "pass --data (and the split settings) explicitly")
    return merge_data(recorded if isinstance(recorded, dict) else None, cfg.data, "data")


def open_store(path: str | Path, memory_budget_mb: int) -> TargetStore:
    return TargetStore.open(path, memory_budget_bytes=memory_budget_mb * 2**20)


def check_store(store: TargetStore, data: DataSetup, needed: dict[str, np.ndarray]) -> None:
    """Refuse targets computed for other data, another class count, or missing the rows we need."""
    fps = store.meta.fingerprints
    for name, fp in data.splits.fingerprints.items():
        if name in fps and fps[name] != fp:
            raise ArtifactError(
                f"targets store {store.path} was computed for other data (split {name!r} differs)",
                "run `reducedmpl precompute` for this data, or use the data the store records")
    if store.meta.num_classes != data.source.num_classes:
        raise ArtifactError(f"targets store {store.path} has {store.meta.num_classes} classes, the data "
                            f"{data.source.num_classes}", "precompute targets with a teacher for this data")
    check_class_names(store.meta.class_names, data.source.class_names, store.path)
    for name, ids in needed.items():
        if name not in fps and len(ids):
            raise ArtifactError(f"targets store {store.path} has no rows for split {name!r}",
                                f"rerun precompute with the {name} split included")


REPLAYED_DATA = ("crop_padding", "hflip", "randaugment")  # the student's augmentation, which stored views replace


def check_store_settings(cfg: DistillConfig, store: TargetStore) -> None:
    """Refuse settings the store would silently override: an augmentation setting (given in ``cfg.data``) other
    than the one the replayed views were made with, and an online-kd teacher other than the store's."""
    if cfg.mode == "online-kd" and cfg.large_teacher is not None:
        load_artifact(cfg.large_teacher, "teacher")  # a missing, damaged or NaN teacher is named as such first
        mine, theirs = file_sha256(cfg.large_teacher), store.meta.teacher_sha256
        if mine != theirs:
            raise ArtifactError(f"--teacher {cfg.large_teacher} is not the teacher that made the store {store.path} "
                                f"(sha256 {mine[:12]}, the store's {theirs[:12]})",
                                "pass the teacher the store was computed with, or precompute a store with this teacher")
    if not (store.views > 1 and cfg.replay_views and cfg.mode in ("kd", "reducedmpl")):
        return
    policy = store.meta.view_policy
    for key in REPLAYED_DATA:
        if key in (cfg.data or {}) and cfg.data[key] != policy.get(key):
            raise ConfigError(f"data.{key}={cfg.data[key]!r} would be ignored: the student trains on the store's "
                              f"{store.views} stored views, made with {key}={policy.get(key)!r}",
                              f"leave out data.{key}, or set distill.replay_views=false to augment on the fly")


def run(cfg: DistillConfig, targets: str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        console: Console | None = None, quiet: bool = False) -> dict:
    """Run one distillation and write ``OUT/student.pt`` (and ``OUT/reduced_teacher.pt``); returns the result."""
    student = model_source(cfg.student, cfg.student_init)
    if cfg.mode == "online-kd" and cfg.large_teacher is None:
        raise ConfigError("distill mode online-kd needs the large teacher", "pass --teacher PATH/teacher.pt")
    sizes = {"distill.batch_size": cfg.batch_size}
    if cfg.mode != "supervised":
        sizes["distill.unlabeled_batch_size"] = cfg.unlabeled_batch_size
    device, dist, console, quiet = stage.setup(cfg.device, console, quiet, sizes)
    store = open_store(targets, cfg.memory_budget_mb)
    try:
        check_store_settings(cfg, store)
        data_cfg = resolve_data(cfg, store)
        cfg = dataclasses.replace(cfg, data=to_dict(data_cfg))
        data = student_data(cfg, data_cfg, student)
        needed = {"labeled": data.splits.indices["labeled"]}
        if cfg.mode != "supervised":
            needed["unlabeled"] = data.splits.indices["unlabeled"]
            if cfg.pseudo_pool == "unlabeled" and not len(needed["unlabeled"]):
                raise ConfigError("distill.pseudo_pool=unlabeled but the data has no unlabeled rows",
                                  "set distill.pseudo_pool=all, or keep some rows unlabeled (data.labeled_per_class)")
        check_store(store, data, needed)
        if store.views > 1 and cfg.replay_views and cfg.mode != "supervised":
            # views this version cannot rebuild, or mixed views whose partner rows the store lacks: refused here
            ViewMaker(data.source, data.prep, ViewPolicy.from_dict(store.meta.view_policy), store.ids)
        check_model_fits(student.arch, data.source.num_classes, data.prep.in_chans, data.prep.input_size,
                         "distill.student", **student.model_args)
        return train(cfg, data, store, device, dist, Path(out), resume=resume, overwrite=overwrite,
                     console=console, quiet=quiet, student=student)
    finally:
        store.close()


def student_data(cfg: DistillConfig, data_cfg: DataConfig, student: ModelSource) -> DataSetup:
    """The data, with the student's own preprocessing: its settings, else ``data.input_size``, else its pretrained
    configuration, else the data's."""
    data = setup_data(data_cfg)
    prep = model_preprocess(data.prep, data_cfg.input_size, model_input(cfg), student.pretrained_cfg)
    return dataclasses.replace(data, prep=prep)


def train(cfg: DistillConfig, data: DataSetup, store: TargetStore, device: torch.device, dist: distributed.Dist,
          out: Path, *, resume: bool, overwrite: bool, console: Console, quiet: bool, student: ModelSource) -> dict:
    """The distill loop: batch, step, log, evaluate, checkpoint; then the final evaluation and the artifacts."""
    config_dict = {**to_dict(cfg), "targets": str(store.path), "targets_run_key": store.meta.run_key,
                   "weights": student.record()}
    # the store is the same one when its run key is: a run and its store may move before --resume
    job = stage.StageRun(out, ARTIFACT, config_dict, dist, console, resume=resume, overwrite=overwrite,
                         ignore=("targets",), inputs={"--teacher": cfg.large_teacher, "--targets": store.path})
    d = Distiller(cfg, data, store, device, dist, student, note=console.print if job.state is None else None)
    probes = Probes(data, store, cfg)
    ev = Evaluation(d, data, store)
    if job.state is not None:
        d.load_state_dict(job.state["distiller"])
        probes.data = job.state["probes"]
        console.print(f"resuming {job.out} at step {d.step_count}/{cfg.steps + cfg.finetune_steps}")
    metrics = job.start(("step", d.step_count), {"val_acc": -1.0, "step": -1})
    total = cfg.steps + cfg.finetune_steps
    if job.state is None:
        probes.snapshot(d)
        metrics.write(step=0, **ev.now())
    t0 = time.perf_counter()
    with job.loop(quiet) as (stop, bar):
        lines = not quiet and not bar.console.is_terminal  # piped to a log: a line per logged step
        task = bar.add_task(f"distill {cfg.mode}", total=total, completed=d.step_count, info="")
        while d.step_count < total:
            measure = (d.step_count + 1) % cfg.log_every == 0
            o = d.step(measure)
            step = d.step_count
            _check_finite(o.student_loss, step, job)
            probes.snapshot(d)
            if measure or step == total:
                row = {"step": step, "lr": d.lr, **_finite(vars(o))}
                if step % cfg.eval_every == 0 or step == total:
                    row.update(ev.now())
                    job.track_best(row.get("val_acc"), {"step": step}, lambda: weights_of(d.eval_model()),
                                   save=cfg.select == "best")
                metrics.write(**row)
                bar.update(task, info=_progress_info(row))
                if lines and job.main:
                    bar.console.print(f"distill {cfg.mode} step {step}/{total}  {_progress_info(row)}")
            bar.update(task, completed=step)
            stopping = stop.requested  # Ctrl-C: a checkpoint at this step, then stop
            if step % cfg.checkpoint_every == 0 and step < total or stopping:
                job.save_last({"distiller": d.state_dict(), "probes": probes.data})
            if stopping:
                stop.stop(f"step {step}/{total}", job.last_path)

    final = job.final_model(d.eval_model(), cfg.select)
    val, test = ev.accuracy("val", final), ev.accuracy("test", final)
    result = {"mode": cfg.mode, "student": cfg.student, "seed": cfg.seed, "steps": cfg.steps,
              "val_acc": val.get("acc"), "test_acc": test.get("acc"), "test_loss": test.get("loss"),
              "best_step": job.best["step"], "train_seconds": time.perf_counter() - t0,
              **{f"final_{k}": v for k, v in ev.teachers().items()}}
    extra = {"reduced_teacher.pt": _reduced_teacher_artifact(d, store)} if d.teacher is not None else {}
    extra.update({"probes.json": probes.data, "result.json": result})
    job.finish(build_artifact("student", final, student, data, config_dict, result, step=total), result, extra)
    return result


def _check_finite(loss: float, step: int, job: stage.StageRun) -> None:
    """A non-finite student loss stops the run; a --resume would only reach this step again, so the run is dropped
    and a plain rerun may start afresh."""
    if not math.isfinite(loss):
        if job.main:
            drop_run(job.out, ARTIFACT)
        raise UserError(f"the student's loss became {loss} at step {step}",
                        "lower the learning rate (distill.student_optim.lr) or enable clip_grad")


def _reduced_teacher_artifact(d: Distiller, store: TargetStore) -> dict:
    return {"kind": "reduced_teacher", "state_dict": weights_of(d.teacher.model),
            "num_classes": d.data.source.num_classes, "config": to_dict(d.cfg.reduced_teacher),
            "targets_run_key": store.meta.run_key, "tool_version": __version__}


def _finite(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}


def _progress_info(row: dict) -> str:
    parts = [f"loss {row['student_loss']:.3f}"]
    if "h" in row:
        parts.append(f"h {row['h']:+.2e}")
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.3f}")
    return "  ".join(parts)
