"""``reducedmpl distill``: co-train a reduced teacher with the student (or run a baseline on the same loop).

One loop serves three modes, so their comparison is fair (same student, data, batches, optimizer, steps):

* ``supervised``: the student on the labeled batch only.
* ``kd``: the student on the large teacher's stored distribution q_L of the pseudo-label batch
  (temperature, optional label CE) — the heuristics ReducedMPL replaces.
* ``reducedmpl``: the student on the reduced teacher's pseudo labels; the reduced teacher learns from the
  MPL signal and from the labeled data (DESIGN §2). The large teacher is never loaded: every q_L comes from
  the targets store.

The pseudo-label batch is drawn from all training rows (unlabeled and labeled); the labeled batch from the
labeled rows. All randomness is a function of the seed, and ``last.pt`` holds every state, so ``--resume``
reproduces an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from .. import __version__, distributed, mpl
from ..config import DataConfig, DistillConfig, from_dict, to_dict
from ..data.loading import Batcher, BatchStream, default_preprocess
from ..data.sources import load_source
from ..data.splits import make_splits
from ..engine import (MetricsLog, autocast, create_optimizer, create_scheduler, evaluate, graceful_stop, grad_scaler,
                      prepare_model, prepare_run, progress, rank_output, rank_rng_states, resolve_device,
                      restore_rank_rng, seed_everything, to_device, wrap_ddp, write_config, write_text_atomic)
from ..errors import ArtifactError, UserError
from ..models import atomic_save, check_model_fits, check_model_name, create_model, safe_load
from ..run_folder import drop_run
from ..targets import TargetStore, check_class_names
from .train_large import DataSetup, _weights, build_artifact

ARTIFACT = "student.pt"
PROBE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class StepOutput:
    """What one training step reports (floats; NaN where a mode has no such quantity)."""

    student_loss: float
    teacher_loss: float = math.nan
    h: float = math.nan
    baseline: float = math.nan
    flip_rate: float = math.nan
    entropy_teacher: float = math.nan
    entropy_large: float = math.nan
    train_acc_student: float = math.nan
    train_acc_teacher: float = math.nan


class Distiller:
    """Holds the models, optimizers and batch streams; ``step()`` runs one training step.

    Under torchrun (``dist``) the student is DistributedDataParallel over the ranks' shares of each global
    batch; the reduced teacher is a plain replica on every rank that stays identical: it starts from rank 0's
    parameters, its MPL signal comes from losses averaged over the ranks, and its gradients are averaged.
    """

    def __init__(self, cfg: DistillConfig, data: DataSetup, store: TargetStore, device: torch.device,
                 dist: distributed.Dist | None = None):
        self.cfg, self.data, self.store, self.device = cfg, data, store, device
        self.dist = dist = dist or distributed.Dist()
        self.use_amp = cfg.amp and device.type == "cuda"
        src, rows, prep = data.source, data.splits.indices, data.prep
        seed_everything(cfg.seed)
        student = create_model(cfg.student, src.num_classes, prep.in_chans, input_size=prep.input_size)
        self.student = prepare_model(student, device, cfg.channels_last)
        self.train_model = wrap_ddp(self.student, device, dist)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.teacher = mpl.ReducedTeacher(src.num_classes, cfg.reduced_teacher.hidden, cfg.reduced_teacher.depth,
                                          cfg.reduced_teacher.extra_features,
                                          cfg.reduced_teacher.learn_temperature).to(device)
        dist.broadcast_([*self.teacher.parameters(), *self.teacher.buffers()])
        seed_everything(cfg.seed, dist.rank)  # the ranks' own randomness (dropout) differs from here on
        self.opt_s = create_optimizer(self.student, cfg.student_optim)
        self.opt_t = create_optimizer(self.teacher, cfg.teacher_optim)
        warm = int(cfg.student_optim.warmup_epochs * cfg.steps)
        self.sched_s = create_scheduler(self.opt_s, cfg.student_optim, cfg.steps, warm)
        self.sched_t = create_scheduler(self.opt_t, cfg.teacher_optim, cfg.steps,
                                        int(cfg.teacher_optim.warmup_epochs * cfg.steps))
        self.scaler = grad_scaler(device, cfg.amp)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=cfg.ema_decay)
        self.baseline = mpl.MovingBaseline(cfg.baseline_decay) if cfg.baseline_decay is not None else None
        pool = np.union1d(rows["labeled"], rows["unlabeled"])
        data_cfg = from_dict(DataConfig, cfg.data, "data")
        self.labeled = BatchStream(Batcher(src, rows["labeled"], prep, data_cfg, batch_size=cfg.batch_size,
                                           train=True, seed=cfg.seed, drop_last=True, dist=dist))
        self.unlabeled = BatchStream(Batcher(src, pool, prep, data_cfg,
                                             batch_size=cfg.unlabeled_batch_size, train=True,
                                             seed=cfg.seed + 7919, drop_last=True, dist=dist))
        self.finetune_opt = None
        self.step_count = 0

    # ------------------------------------------------------------------------------------------ helpers
    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.store.log_probs(ids.numpy())).to(self.device)

    def _x(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device, self.cfg.channels_last)

    def _student_update(self, loss: torch.Tensor) -> None:
        self.opt_s.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.opt_s)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.opt_s)
        self.scaler.update()

    def _teacher_update(self, loss: torch.Tensor) -> None:
        self.opt_t.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_(p.grad for p in self.teacher.parameters())
        torch.nn.utils.clip_grad_norm_(self.teacher.parameters(), 5.0)
        self.opt_t.step()

    def _forward_keep_stats(self, x: torch.Tensor) -> torch.Tensor:
        """The student's train-mode output (batch statistics) that leaves the BatchNorm running statistics
        alone, so that only the real training forward updates them."""
        with mpl.frozen_norm_stats(self.student), autocast(self.device, self.use_amp):
            return self.student(x).float()

    def _labeled_loss(self, x_l: torch.Tensor, y_l: torch.Tensor) -> tuple[float, float]:
        """CE of the student on the labeled batch and its accuracy; no gradient."""
        with torch.no_grad():
            logits = self._forward_keep_stats(x_l)
        return F.cross_entropy(logits, y_l).item(), (logits.argmax(1) == y_l).float().mean().item()

    # ------------------------------------------------------------------------------------------ steps
    def step(self, measure: bool) -> StepOutput:
        """One step of the configured mode; ``measure`` asks for the diagnostics that cost extra work."""
        cfg = self.cfg
        if self.step_count >= cfg.steps:
            out = self._finetune_step()
        elif cfg.mode == "supervised":
            out = self._supervised_step()
        elif cfg.mode == "kd":
            out = self._kd_step()
        else:
            out = self._mpl_step(measure)
        if self.dist.enabled:  # every rank reports (and checks) the same numbers: the means over the ranks
            fields = dataclasses.fields(out)
            means = self.dist.mean([getattr(out, f.name) for f in fields])
            out = StepOutput(**{f.name: v for f, v in zip(fields, means)})
        self.step_count += 1
        if self.step_count <= cfg.steps:
            self.sched_s.step_update(self.step_count)
            self.sched_t.step_update(self.step_count)
        if self.ema is not None:
            self.ema.update(self.student, step=self.step_count)
        return out

    def _supervised_step(self) -> StepOutput:
        x_l, y_l, _ = self.labeled.next()
        x_l, y_l = self._x(x_l), y_l.to(self.device)
        with autocast(self.device, self.use_amp):
            logits = self.train_model(x_l).float()
        loss = F.cross_entropy(logits, y_l, label_smoothing=self.cfg.label_smoothing)
        self._student_update(loss)
        return StepOutput(loss.item(), train_acc_student=(logits.argmax(1) == y_l).float().mean().item())

    def _finetune_step(self) -> StepOutput:
        if self.finetune_opt is None:
            self.finetune_opt = torch.optim.SGD(self.student.parameters(), lr=self.cfg.finetune_lr, momentum=0.9)
        x_l, y_l, _ = self.labeled.next()
        x_l, y_l = self._x(x_l), y_l.to(self.device)
        with autocast(self.device, self.use_amp):
            logits = self.train_model(x_l).float()
        loss = F.cross_entropy(logits, y_l, label_smoothing=self.cfg.label_smoothing)
        self.finetune_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.finetune_opt.step()
        return StepOutput(loss.item(), train_acc_student=(logits.argmax(1) == y_l).float().mean().item())

    def _kd_step(self) -> StepOutput:
        cfg = self.cfg
        x_u, _, ids_u = self.unlabeled.next()
        log_q = self.log_q(ids_u)
        x_u = self._x(x_u)
        if cfg.kd_label_weight > 0:
            x_l, y_l, _ = self.labeled.next()
            x_l, y_l = self._x(x_l), y_l.to(self.device)
            with autocast(self.device, self.use_amp):
                logits = self.train_model(torch.cat([x_u, x_l])).float()
            logits_u, logits_l = logits[:len(x_u)], logits[len(x_u):]
            loss = (1 - cfg.kd_label_weight) * mpl.kd_loss(logits_u, log_q, cfg.kd_temperature) + \
                cfg.kd_label_weight * F.cross_entropy(logits_l, y_l, label_smoothing=cfg.label_smoothing)
        else:
            with autocast(self.device, self.use_amp):
                logits_u = self.train_model(x_u).float()
            loss = mpl.kd_loss(logits_u, log_q, cfg.kd_temperature)
        self._student_update(loss)
        return StepOutput(loss.item(), entropy_large=mpl.mean_entropy(log_q))

    def _mpl_step(self, measure: bool) -> StepOutput:
        """ReducedMPL (DESIGN §2 steps 1-6)."""
        cfg = self.cfg
        x_l, y_l, ids_l = self.labeled.next()
        x_u, _, ids_u = self.unlabeled.next()
        log_q_u, log_q_l = self.log_q(ids_u), self.log_q(ids_l)
        x_l, y_l, x_u = self._x(x_l), y_l.to(self.device), self._x(x_u)

        # 1. the reduced teacher's distribution on the pseudo-label batch
        t_logits_u = self.teacher(log_q_u)
        exact = cfg.teacher_grad == "exact"
        if exact:
            targets = mpl.pseudo_labels(t_logits_u, "soft")
        else:
            targets = mpl.pseudo_labels(t_logits_u, cfg.pseudo_label)

        # 2. L_old: value only, same labeled batch and augmentation as L_new
        need_h = measure or not exact
        loss_old, acc_old = self._labeled_loss(x_l, y_l) if need_h else (math.nan, math.nan)

        # 3. the student's step on the pseudo labels
        theta = mpl.snapshot_params(self.student) if exact else None
        rng = torch.get_rng_state() if exact and cfg.exact_method == "fd" else None
        with autocast(self.device, self.use_amp):
            logits_u = self.train_model(x_u).float()
        student_loss = mpl.soft_cross_entropy(logits_u, targets) if exact else F.cross_entropy(logits_u, targets)
        lr = self.opt_s.param_groups[0]["lr"]
        self._student_update(student_loss)

        # 4-5. L_new and the MPL signal h = L_old - L_new
        if exact:
            # v = grad of the labeled loss at θ' (one backward); L_new comes with it
            loss_new_t = F.cross_entropy(self._forward_keep_stats(x_l), y_l)
            params = [p for p in self.student.parameters() if p.requires_grad]
            names = [n for n, p in self.student.named_parameters() if p.requires_grad]
            grads = [g.detach() for g in torch.autograd.grad(loss_new_t, params)]
            self.dist.average_(grads)  # v is the gradient of the global labeled batch's loss
            v = dict(zip(names, grads))
            loss_new = loss_new_t.item()
            J = self._directional(theta, x_u, v, logits_u.detach(), rng)
            step_scale = self._step_scale(theta, lr)
        else:
            loss_new, _ = self._labeled_loss(x_l, y_l)
        if need_h and self.dist.enabled:  # the losses of the global labeled batch
            loss_old, loss_new = self.dist.mean([loss_old, loss_new])
        h = mpl.mpl_signal(loss_old, loss_new) if need_h else math.nan

        # 6. the teacher's update
        t_logits_l = self.teacher(log_q_l)
        loss_sup = F.cross_entropy(t_logits_l, y_l, label_smoothing=cfg.label_smoothing)
        baseline = math.nan
        if exact:
            probs_u = F.softmax(t_logits_u, -1)
            # per unit of student learning rate, so mpl_weight does not depend on the lr schedule
            loss_mpl = mpl.exact_teacher_loss(probs_u, J, step_scale / max(lr, 1e-12))
            if math.isnan(h):
                h = -loss_mpl.item() * lr  # first-order estimate of h, free
        else:
            advantage = h
            if self.baseline is not None:
                baseline = self.baseline.value
                advantage = self.baseline.update(h)
            loss_mpl = mpl.reinforce_teacher_loss(t_logits_u, targets, advantage)
        loss_t = cfg.mpl_weight * loss_mpl + cfg.supervised_weight * loss_sup
        if cfg.kl_weight > 0:
            loss_t = loss_t + cfg.kl_weight * mpl.kd_loss(t_logits_u, log_q_u)
        self._teacher_update(loss_t)

        out = StepOutput(student_loss.item(), loss_t.item(), h, baseline)
        if measure:
            with torch.no_grad():
                out.flip_rate = mpl.label_flip_rate(targets, log_q_u)
                out.entropy_teacher = mpl.mean_entropy(t_logits_u.detach())
                out.entropy_large = mpl.mean_entropy(log_q_u)
                out.train_acc_student = acc_old
                out.train_acc_teacher = (t_logits_l.argmax(1) == y_l).float().mean().item()
        return out

    def _directional(self, theta, x_u, v, logits_u, rng) -> torch.Tensor:
        """J = vᵀ∇θ ℓ(x_u; θ); the finite difference reuses the training forward's output at θ."""
        if self.cfg.exact_method == "jvp":
            return mpl.directional_loss_derivative(self.student, theta, None, x_u, v, method="jvp")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in v.values()])).item()
        if norm == 0.0:
            return torch.zeros_like(logits_u)
        eps = 1e-2 / norm
        shifted = {k: theta[k] + eps * v[k] for k in v}
        buffers = {k: b.detach().clone() for k, b in self.student.named_buffers()}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.set_rng_state(rng)  # same dropout masks as the training forward
            with autocast(self.device, self.use_amp):
                moved = torch.func.functional_call(self.student, ({**theta, **shifted}, buffers), (x_u,)).float()
        return (F.log_softmax(logits_u, -1) - F.log_softmax(moved, -1)) / eps

    def _step_scale(self, theta, lr: float) -> float:
        """∂(θ - θ')/∂g: the learning rate for SGD (with or without momentum), fitted for adaptive ones."""
        opt = self.cfg.student_optim.opt.lower()
        if opt in ("sgd", "momentum", "nesterov"):
            return mpl.sgd_step_scale(lr, 0.0)
        grads = {n: p.grad for n, p in self.student.named_parameters() if p.grad is not None}
        current = {n: p.detach() for n, p in self.student.named_parameters()}
        return mpl.fitted_step_scale(theta, current, grads)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "opt_s": self.opt_s.state_dict(), "opt_t": self.opt_t.state_dict(),
            "sched_s": self.sched_s.state_dict(), "sched_t": self.sched_t.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "baseline": self.baseline.state_dict() if self.baseline is not None else None,
            "finetune_opt": self.finetune_opt.state_dict() if self.finetune_opt is not None else None,
            "labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict(),
            "step": self.step_count, "rng": rank_rng_states(self.dist),
        }

    def load_state_dict(self, s: dict) -> None:
        self.student.load_state_dict(s["student"])
        self.teacher.load_state_dict(s["teacher"])
        self.opt_s.load_state_dict(s["opt_s"])
        self.opt_t.load_state_dict(s["opt_t"])
        self.sched_s.load_state_dict(s["sched_s"])
        self.sched_t.load_state_dict(s["sched_t"])
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        if self.baseline is not None:
            self.baseline.load_state_dict(s["baseline"])
        if s["finetune_opt"] is not None:
            self.finetune_opt = torch.optim.SGD(self.student.parameters(), lr=self.cfg.finetune_lr, momentum=0.9)
            self.finetune_opt.load_state_dict(s["finetune_opt"])
        self.labeled.load_state_dict(s["labeled"])
        self.unlabeled.load_state_dict(s["unlabeled"])
        self.step_count = s["step"]
        restore_rank_rng(s["rng"], self.dist)

    def eval_model(self):
        return self.ema.module if self.ema is not None else self.student


# ---------------------------------------------------------------------------------------------- the stage
def resolve_data(cfg: DistillConfig, store: TargetStore) -> DataConfig:
    """The data settings recorded in the store, with the config's ``data`` settings over them."""
    recorded = store.meta.config.get("data") if isinstance(store.meta.config, dict) else None
    if not isinstance(recorded, dict):
        if not cfg.data:
            raise ArtifactError(f"targets store {store.path} does not record its data settings",
                                "pass --data (and the split settings) explicitly")
        recorded = {}
    data_cfg = from_dict(DataConfig, {**recorded, **(cfg.data or {})}, "data")
    data_cfg.validate()
    return data_cfg


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


def run(cfg: DistillConfig, targets: str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        console: Console | None = None, quiet: bool = False) -> dict:
    """Run one distillation and write ``OUT/student.pt``, ``OUT/reduced_teacher.pt``; returns the result."""
    check_model_name(cfg.student)
    device = resolve_device(cfg.device)
    dist = distributed.setup(device)
    console, quiet = rank_output(dist, console, quiet)
    distributed.check_divisible("distill.batch_size", cfg.batch_size, dist)
    if cfg.mode != "supervised":
        distributed.check_divisible("distill.unlabeled_batch_size", cfg.unlabeled_batch_size, dist)
    store = open_store(targets, cfg.memory_budget_mb)
    try:
        data_cfg = resolve_data(cfg, store)
        cfg = dataclasses.replace(cfg, data=to_dict(data_cfg))
        source = load_source(data_cfg.source)
        splits = make_splits(source, data_cfg)
        data = DataSetup(source, splits, default_preprocess(source, splits.indices["labeled"], data_cfg))
        needed = {"labeled": splits.indices["labeled"]}
        if cfg.mode != "supervised":
            needed["unlabeled"] = splits.indices["unlabeled"]
        check_store(store, data, needed)
        check_model_fits(cfg.student, data.source.num_classes, data.prep.in_chans, data.prep.input_size,
                         "distill.student")
        return _run(cfg, data, store, device, dist, Path(out), resume, overwrite, console, quiet)
    finally:
        store.close()


def _run(cfg, data, store, device, dist, out, resume, overwrite, console, quiet) -> dict:
    config_dict = {**to_dict(cfg), "targets": str(store.path),
                   "targets_run_key": store.meta.run_key}
    # the store is the same one when its run key is: a run and its store may move before --resume
    out, state = prepare_run(out, ARTIFACT, resume, overwrite, config_dict, dist, ignore=("targets",))
    last_path = out / "last.pt"
    main = dist.is_main

    d = Distiller(cfg, data, store, device, dist)
    rows = data.splits.indices
    data_cfg = from_dict(DataConfig, cfg.data, "data")
    eval_bs = 256
    val_b = Batcher(data.source, rows["val"], data.prep, data_cfg, batch_size=eval_bs, train=False,
                    seed=0, dist=dist) if len(rows["val"]) else None
    lab_b = Batcher(data.source, rows["labeled"], data.prep, data_cfg, batch_size=eval_bs, train=False,
                    seed=0, dist=dist)
    probe_ids = _probe_ids(rows, cfg.probe_size)
    probes = {"ids": probe_ids.tolist(), "labels": data.source.labels[probe_ids].tolist(),
              "large": store.log_probs(probe_ids).tolist() if len(probe_ids) else [], "snapshots": {}}
    if state is not None:
        d.load_state_dict(state["distiller"])
        probes = state["probes"]
        console.print(f"resuming {out} at step {d.step_count}/{cfg.steps + cfg.finetune_steps}")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until=("step", d.step_count) if state else None,
                         enabled=main)
    if main:
        write_config(out, config_dict)

    total = cfg.steps + cfg.finetune_steps
    probe_steps = {int(round(p * cfg.steps)): p for p in PROBE_POINTS}
    best = state["best"] if state else {"val_acc": -1.0, "step": -1}
    t0 = time.perf_counter()

    def evaluate_now() -> dict:
        row = {}
        model = d.eval_model()
        if val_b is not None:
            row["val_acc"] = evaluate(model, val_b.epoch(0), device, d.use_amp, cfg.channels_last, dist)["acc"]
        row["labeled_acc_student"] = evaluate(model, lab_b.epoch(0), device, d.use_amp, cfg.channels_last,
                                              dist)["acc"]
        if cfg.mode == "reducedmpl":
            row.update(_teacher_accuracy(d, store, rows))
        return row

    def snapshot_probes() -> None:
        if cfg.mode == "reducedmpl" and len(probe_ids) and d.step_count in probe_steps:
            with torch.no_grad():
                lp = F.log_softmax(d.teacher(torch.from_numpy(np.asarray(probes["large"], np.float32))
                                             .to(device)), -1)
            probes["snapshots"][str(probe_steps[d.step_count])] = lp.cpu().tolist()

    if state is None:
        snapshot_probes()
        metrics.write(step=0, **evaluate_now())
    with graceful_stop(dist.any) as stop, progress(disable=quiet) as bar:
        task = bar.add_task(f"distill {cfg.mode}", total=total, completed=d.step_count, info="")
        while d.step_count < total:
            measure = (d.step_count + 1) % cfg.log_every == 0
            o = d.step(measure)
            if not math.isfinite(o.student_loss):
                if main:  # a --resume would only reach this step again: a plain rerun may start afresh
                    drop_run(out, ARTIFACT)
                raise UserError(f"the student's loss became {o.student_loss} at step {d.step_count}",
                                "lower the learning rate (distill.student_optim.lr) or enable clip_grad")
            step = d.step_count
            snapshot_probes()
            if measure or step == total:
                row = {"step": step, "lr": d.opt_s.param_groups[0]["lr"], **_finite(vars(o))}
                if step % cfg.eval_every == 0 or step == total:
                    row.update(evaluate_now())
                    if row.get("val_acc", -1) > best["val_acc"]:
                        best = {"val_acc": row["val_acc"], "step": step}
                        if cfg.select == "best" and main:
                            atomic_save({"state_dict": _weights(d.eval_model()), "step": step}, out / "best.pt")
                metrics.write(**row)
                bar.update(task, info=_progress_info(row))
            bar.update(task, completed=step)
            stopping = stop.requested  # Ctrl-C: a checkpoint at this step, then stop
            if step % cfg.checkpoint_every == 0 and step < total or stopping:
                state_now = d.state_dict()  # every rank takes part: it gathers their RNG states
                if main:
                    atomic_save({"distiller": state_now, "probes": probes, "best": best, "config": config_dict},
                                last_path)
            if stopping:
                stop.stop(f"step {step}/{total}", last_path)

    dist.barrier()  # best.pt is written
    final = d.eval_model()
    if cfg.select == "best" and (out / "best.pt").exists():
        final.load_state_dict(safe_load(out / "best.pt")["state_dict"])
    test_b = Batcher(data.source, rows["test"], data.prep, data_cfg, batch_size=eval_bs, train=False,
                     seed=0, dist=dist) if len(rows["test"]) else None
    val = evaluate(final, val_b.epoch(0), device, d.use_amp, cfg.channels_last, dist) if val_b else {}
    test = evaluate(final, test_b.epoch(0), device, d.use_amp, cfg.channels_last, dist) if test_b else {}
    result = {"mode": cfg.mode, "student": cfg.student, "seed": cfg.seed, "steps": cfg.steps,
              "val_acc": val.get("acc"), "test_acc": test.get("acc"), "test_loss": test.get("loss"),
              "best_step": best["step"], "train_seconds": time.perf_counter() - t0}
    if cfg.mode == "reducedmpl":
        result.update({f"final_{k}": v for k, v in _teacher_accuracy(d, store, rows).items()})
    if main:
        _write_outputs(cfg, data, store, d, final, config_dict, result, probes, metrics, out, total)
    dist.barrier()  # the artifacts are written before any rank goes on to use them
    return result


def _write_outputs(cfg, data, store, d, final, config_dict, result, probes, metrics, out, total) -> None:
    """student.pt, reduced_teacher.pt, probes.json, result.json and the final metrics row (rank 0)."""
    artifact = build_artifact("student", final, cfg.student, data, config_dict, result, step=total)
    atomic_save(artifact, out / ARTIFACT)
    if cfg.mode == "reducedmpl":
        atomic_save({"kind": "reduced_teacher", "state_dict": {k: v.detach().cpu() for k, v in
                                                                d.teacher.state_dict().items()},
                     "num_classes": data.source.num_classes, "config": to_dict(cfg.reduced_teacher),
                     "targets_run_key": store.meta.run_key, "tool_version": __version__},
                    out / "reduced_teacher.pt")
    _write_json(out / "probes.json", probes)
    _write_json(out / "result.json", result)
    metrics.write(final=True, **result)
    (out / "last.pt").unlink(missing_ok=True)


def _probe_ids(rows: dict[str, np.ndarray], n: int) -> np.ndarray:
    pool = rows["unlabeled"] if len(rows["unlabeled"]) else rows["labeled"]
    if n == 0 or len(pool) == 0:
        return np.zeros(0, np.int64)
    return pool[np.linspace(0, len(pool) - 1, min(n, len(pool))).astype(int)]


@torch.no_grad()
def _teacher_accuracy(d: Distiller, store: TargetStore, rows: dict[str, np.ndarray]) -> dict:
    """Accuracy of the reduced and the large teacher on labeled and val rows (from stored targets)."""
    out = {}
    for split in ("labeled", "val"):
        ids = rows[split]
        if not len(ids) or split not in store.meta.fingerprints:
            continue
        log_q = torch.from_numpy(store.log_probs(ids)).to(d.device)
        y = torch.from_numpy(d.data.source.labels[ids]).to(d.device)
        out[f"{split}_acc_teacher"] = (d.teacher(log_q).argmax(1) == y).float().mean().item()
        out[f"{split}_acc_large"] = (log_q.argmax(1) == y).float().mean().item()
    return out


def _finite(row: dict) -> dict:
    return {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}


def _progress_info(row: dict) -> str:
    parts = [f"loss {row['student_loss']:.3f}"]
    if "h" in row:
        parts.append(f"h {row['h']:+.2e}")
    if "val_acc" in row:
        parts.append(f"val {row['val_acc']:.3f}")
    return "  ".join(parts)


def _write_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj))
