"""One training step per distillation method, composed of the math in :mod:`reducedmpl.mpl`.

A step is a small callable: ``step(batch, measure) -> StepOutput``. Its ``needs`` say which parts of a
:class:`Batch` it reads, so the distill loop draws only those and never asks which method it runs. The parts
every method shares are :class:`Student` (the network being distilled, its optimizer and forward passes) and
:class:`Teacher` (the reduced teacher and its optimizer).

Adding a method: write a step class here, register it with ``@method("NAME")`` and add ``NAME`` to the
``mode`` literal of :class:`~reducedmpl.config.DistillConfig`. A new teacher gradient for ``reducedmpl`` is
registered with ``@teacher_gradient("NAME")`` and named in the ``teacher_grad`` literal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, mpl
from .config import DistillConfig
from .data.loading import match_channels, resize
from .data.views import batch_mixup, mixup
from .engine.device import autocast, to_device

# A batch's parts: the labeled images and labels, the pseudo-label batch, the stored q_L of the pseudo-label
# batch, and q_L of the labeled batch (which only the reduced teacher's supervised loss reads).
LABELED, UNLABELED, UNLABELED_TARGETS, LABELED_TARGETS = "labeled", "unlabeled", "unlabeled_targets", "labeled_targets"

# The finite difference of the exact gradient moves θ by this norm along v (relative to ‖θ‖ of a small
# network ~10-100, small enough that the loss is locally linear, large enough to stay above float32 noise).
FD_STEP_NORM = 1e-2
# The exact surrogate is divided by the learning rate, so mpl_weight does not follow the schedule; this floor
# keeps the division finite at a zero learning rate (the surrogate is then zero anyway).
MIN_LR = 1e-12


@dataclass
class StepOutput:
    """What one training step reports (floats; NaN where a method has no such quantity)."""

    student_loss: float
    teacher_loss: float = math.nan
    h: float = math.nan
    baseline: float = math.nan
    flip_rate: float = math.nan
    entropy_teacher: float = math.nan
    entropy_large: float = math.nan
    train_acc_student: float = math.nan
    train_acc_teacher: float = math.nan


@dataclass
class Batch:
    """One step's inputs on the device; the parts a step does not need are None."""

    x_l: torch.Tensor | None = None
    y_l: torch.Tensor | None = None
    log_q_l: torch.Tensor | None = None
    x_u: torch.Tensor | None = None
    log_q_u: torch.Tensor | None = None


class Step(Protocol):
    needs: frozenset[str]

    def __call__(self, batch: Batch, measure: bool) -> StepOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------- the two sides
class Student:
    """The network being distilled with its optimizer: the forward passes and the update every method uses.

    ``train_model`` is what the training forward runs (DDP and/or compiled); ``model`` is the plain module,
    used for the extra forwards that must not touch BatchNorm's running statistics or DDP's gradient hooks.
    """

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, clip_grad: float | None, device: torch.device, use_amp: bool,
                 channels_last: bool, dist: distributed.Dist):
        self.model, self.train_model, self.optimizer, self.scaler = model, train_model, optimizer, scaler
        self.clip_grad, self.device, self.use_amp, self.channels_last = clip_grad, device, use_amp, channels_last
        self.dist = dist
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward (updates BatchNorm statistics; gradients flow)."""
        with autocast(self.device, self.use_amp):
            return self.train_model(x).float()

    def forward_keep_stats(self, x: torch.Tensor) -> torch.Tensor:
        """A train-mode forward with batch statistics that leaves BatchNorm's running statistics alone, so that
        only the training forward updates them."""
        with mpl.frozen_norm_stats(self.model), autocast(self.device, self.use_amp):
            return self.model(x).float()

    @torch.no_grad()
    def labeled_loss(self, x_l: torch.Tensor, y_l: torch.Tensor) -> tuple[float, float]:
        """Cross-entropy and accuracy on the labeled batch, value only."""
        logits = self.forward_keep_stats(x_l)
        return F.cross_entropy(logits, y_l).item(), accuracy(logits, y_l)

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def loss_gradient(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """∇θ of ``loss`` by name (averaged over the ranks: the gradient of the global batch's loss)."""
        grads = [g.detach() for g in torch.autograd.grad(loss, self.params)]
        self.dist.average_(grads)
        return dict(zip(self.param_names, grads))

    def step_scale(self, theta: dict[str, torch.Tensor], lr: float) -> float:
        """∂(θ - θ')/∂g of the step just taken: exact for SGD (plain, heavy-ball or Nesterov momentum, read from
        the optimizer itself), a least-squares fit of the actual update for adaptive optimizers."""
        if isinstance(self.optimizer, torch.optim.SGD):
            group = self.optimizer.param_groups[0]
            return mpl.sgd_step_scale(lr, group["momentum"], group["dampening"], group["nesterov"])
        grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
        current = {n: p.detach() for n, p in self.model.named_parameters()}
        return mpl.fitted_step_scale(theta, current, grads)


class Teacher:
    """The reduced teacher and its optimizer; identical on every rank (its gradients are averaged)."""

    def __init__(self, model: mpl.ReducedTeacher, optimizer: torch.optim.Optimizer, clip_grad: float | None,
                 cfg: DistillConfig, dist: distributed.Dist):
        self.model, self.optimizer, self.clip_grad, self.cfg, self.dist = model, optimizer, clip_grad, cfg, dist

    def supervised(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits on the labeled batch and its supervised loss there."""
        t_logits_l = self.model(batch.log_q_l)
        return t_logits_l, F.cross_entropy(t_logits_l, batch.y_l, label_smoothing=self.cfg.label_smoothing)

    def loss(self, loss_mpl: torch.Tensor, loss_sup: torch.Tensor, batch: Batch,
             t_logits_u: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return mpl.reduced_teacher_loss(loss_mpl, loss_sup, t_logits_u, batch.log_q_u, cfg.mpl_weight,
                                        cfg.supervised_weight, cfg.kl_weight)

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_(p.grad for p in self.model.parameters())
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.optimizer.step()


# ---------------------------------------------------------------------------------------------- registries
METHODS: dict[str, Callable[..., Step]] = {}
TEACHER_GRADIENTS: dict[str, Callable[..., Step]] = {}


def method(name: str):
    def register(factory):
        METHODS[name] = factory
        return factory
    return register


def teacher_gradient(name: str):
    def register(factory):
        TEACHER_GRADIENTS[name] = factory
        return factory
    return register


def build_step(cfg: DistillConfig, student: Student, teacher: Teacher | None, **parts) -> Step:
    """The step of ``cfg.mode`` (for ``reducedmpl``: of ``cfg.teacher_grad``); ``parts`` are what a method needs
    beyond the student and the reduced teacher (``large`` for online-kd)."""
    return METHODS[cfg.mode](cfg, student, teacher, **parts)


class _Stateless:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the steps
@method("supervised")
class SupervisedStep(_Stateless):
    """The student on the labeled batch only."""

    needs = frozenset({LABELED})

    def __init__(self, cfg: DistillConfig, student: Student, teacher: Teacher | None = None):
        self.student, self.label_smoothing = student, cfg.label_smoothing

    def __call__(self, b: Batch, measure: bool) -> StepOutput:
        logits = self.student.forward(b.x_l)
        loss = F.cross_entropy(logits, b.y_l, label_smoothing=self.label_smoothing)
        self.student.update(loss)
        return StepOutput(loss.item(), train_acc_student=accuracy(logits, b.y_l))


class FinetuneStep:
    """After the main loop: the student on the labeled batch with its own small-lr SGD (no clipping)."""

    needs = frozenset({LABELED})
    MOMENTUM = 0.9  # the usual SGD momentum; the finetune's learning rate is the setting

    def __init__(self, cfg: DistillConfig, student: Student):
        self.student, self.label_smoothing = student, cfg.label_smoothing
        self.optimizer = torch.optim.SGD(student.model.parameters(), lr=cfg.finetune_lr, momentum=self.MOMENTUM)
        self.started = False  # the state is saved once the finetune has begun

    def __call__(self, b: Batch, measure: bool) -> StepOutput:
        self.started = True
        logits = self.student.forward(b.x_l)
        loss = F.cross_entropy(logits, b.y_l, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepOutput(loss.item(), train_acc_student=accuracy(logits, b.y_l))

    def state_dict(self) -> dict | None:
        return self.optimizer.state_dict() if self.started else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.optimizer.load_state_dict(state)
            self.started = True


@method("kd")
class KDStep(_Stateless):
    """The student on the large teacher's stored distribution q_L of the pseudo-label batch, optionally mixed
    with label cross-entropy on the labeled batch: the heuristics ReducedMPL replaces."""

    def __init__(self, cfg: DistillConfig, student: Student, teacher: Teacher | None = None):
        self.student, self.cfg = student, cfg
        self.needs = frozenset({UNLABELED, UNLABELED_TARGETS} | ({LABELED} if cfg.kd_label_weight > 0 else set()))

    def __call__(self, b: Batch, measure: bool) -> StepOutput:
        cfg = self.cfg
        logits_l = None
        if b.x_l is not None:  # one forward over both batches
            logits = self.student.forward(torch.cat([b.x_u, b.x_l]))
            logits_u, logits_l = logits[:len(b.x_u)], logits[len(b.x_u):]
        else:
            logits_u = self.student.forward(b.x_u)
        loss = mpl.kd_student_loss(logits_u, b.log_q_u, cfg.kd_temperature, logits_l, b.y_l,
                                   cfg.kd_label_weight, cfg.label_smoothing)
        self.student.update(loss)
        out = StepOutput(loss.item())
        if measure:
            out.entropy_large = mpl.mean_entropy(b.log_q_u)
        return out


@method("online-kd")
class OnlineKDStep(KDStep):
    """KD with the large teacher in memory, run each step on the student's own augmented view: the consistent
    teacher (Beyer et al., CVPR 2022), the anchor that stored targets are measured against. With ``online_mix``
    (function matching) each row of the pseudo-label batch is first mixed with a partner from the same batch
    (:func:`views.batch_mixup` of the seed and the step), and both the teacher and the student see the mixed image."""

    def __init__(self, cfg: DistillConfig, student: Student, teacher: Teacher | None = None, *,
                 large: LargeTeacher):
        super().__init__(cfg, student)
        self.large = large
        self.needs = self.needs - {UNLABELED_TARGETS}
        self.mix, self.seed, self.alpha = cfg.online_mix != "none", cfg.seed, cfg.mix_alpha
        self.mixes = 0  # batches mixed so far: the next one's key, saved so that a resume replays it

    def __call__(self, b: Batch, measure: bool) -> StepOutput:
        if self.mix:
            b.x_u = self.mixed(b.x_u)
        b.log_q_u = self.large.log_probs(b.x_u)
        return super().__call__(b, measure)

    def mixed(self, x: torch.Tensor) -> torch.Tensor:
        """The next batch's mixup: each row with its partner in ``x``, weights drawn from (seed, batch, rank)."""
        perm, lam = batch_mixup(self.seed, self.mixes, len(x), self.alpha, self.student.dist.rank)
        self.mixes += 1
        return mixup(x, x[torch.from_numpy(perm).to(x.device)], torch.from_numpy(lam))

    def state_dict(self) -> dict:
        return {"mixes": self.mixes} if self.mix else {}

    def load_state_dict(self, state: dict) -> None:
        self.mixes = int(state.get("mixes", 0))


class LargeTeacher:
    """The large teacher, frozen in eval mode, on the student's inputs: they are brought from the student's
    preprocessing (normalisation, size, channels) to the teacher's before its forward."""

    def __init__(self, model: nn.Module, student_prep, teacher_prep, device: torch.device, use_amp: bool):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.use_amp = device, use_amp
        self.size, self.in_chans, self.interpolation = (teacher_prep.input_size, teacher_prep.in_chans,
                                                        teacher_prep.interpolation)
        self.s_mean, self.s_std = _norm_stats(student_prep, device)
        self.t_mean, self.t_std = _norm_stats(teacher_prep, device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.s_std + self.s_mean  # the student's view, back in [0, 1] pixels
        x = match_channels(x, self.in_chans)  # as the batches do: grey repeated, colour averaged
        x = resize(x, self.size, self.interpolation)  # at the teacher's size, with its interpolation
        return (x - self.t_mean) / self.t_std

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.use_amp):
            return F.log_softmax(self.model(self.inputs(x)).float(), -1)


def _norm_stats(prep, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a preprocessing as (1, C, 1, 1); a count other than the channels' is averaged, as the
    batches do."""
    mean, std = torch.tensor(prep.mean, device=device), torch.tensor(prep.std, device=device)
    if len(mean) != prep.in_chans:
        mean, std = mean.mean().view(1), std.mean().view(1)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


@method("reducedmpl")
def reducedmpl_step(cfg: DistillConfig, student: Student, teacher: Teacher) -> Step:
    return TEACHER_GRADIENTS[cfg.teacher_grad](cfg, student, teacher)


def _diagnostics(out: StepOutput, b: Batch, pseudo: torch.Tensor, t_logits_u: torch.Tensor,
                 t_logits_l: torch.Tensor, acc_old: float) -> StepOutput:
    """The measured extras of a ReducedMPL step: label flips, sharpening, train accuracy of both."""
    with torch.no_grad():
        out.flip_rate = mpl.label_flip_rate(pseudo, b.log_q_u)
        out.entropy_teacher = mpl.mean_entropy(t_logits_u.detach())
        out.entropy_large = mpl.mean_entropy(b.log_q_u)
        out.train_acc_student = acc_old
        out.train_acc_teacher = accuracy(t_logits_l, b.y_l)
    return out


@teacher_gradient("reinforce")
class ReinforceStep:
    """ReducedMPL as in the paper: hard pseudo labels, and the teacher follows h = L_old - L_new (REINFORCE)."""

    needs = frozenset({LABELED, UNLABELED, UNLABELED_TARGETS, LABELED_TARGETS})

    def __init__(self, cfg: DistillConfig, student: Student, teacher: Teacher):
        self.student, self.teacher, self.kind = student, teacher, cfg.pseudo_label
        self.baseline = mpl.MovingBaseline(cfg.baseline_decay) if cfg.baseline_decay is not None else None

    def __call__(self, b: Batch, measure: bool) -> StepOutput:
        student, dist = self.student, self.student.dist
        t_logits_u = self.teacher.model(b.log_q_u)
        pseudo = mpl.pseudo_labels(t_logits_u, self.kind)
        loss_old, acc_old = student.labeled_loss(b.x_l, b.y_l)  # same batch and augmentation as L_new
        student_loss = F.cross_entropy(student.forward(b.x_u), pseudo)
        student.update(student_loss)
        loss_new, _ = student.labeled_loss(b.x_l, b.y_l)
        if dist.enabled:  # the losses of the global labeled batch
            loss_old, loss_new = dist.mean([loss_old, loss_new])
        h = mpl.mpl_signal(loss_old, loss_new)
        baseline, advantage = math.nan, h
        if self.baseline is not None:
            baseline = self.baseline.value
            advantage = self.baseline.update(h)
        t_logits_l, loss_sup = self.teacher.supervised(b)
        loss_mpl = mpl.reinforce_teacher_loss(t_logits_u, pseudo, advantage)
        loss_t = self.teacher.loss(loss_mpl, loss_sup, b, t_logits_u)
        self.teacher.update(loss_t)
        out = StepOutput(student_loss.item(), loss_t.item(), h, baseline)
        return _diagnostics(out, b, pseudo, t_logits_u, t_logits_l, acc_old) if measure else out

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.state_dict() if self.baseline is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.baseline is not None:
            self.baseline.load_state_dict(state["baseline"])


@teacher_gradient("exact")
class ExactStep(_Stateless):
    """ReducedMPL with soft pseudo labels and the exact first-order teacher gradient (DESIGN §2):
    the teacher minimises -(s/B) Σ stopgrad(J) · t(ψ), J = vᵀ∇θ ℓ(x_u; θ), v = ∇θ' L_l(θ')."""

    needs = frozenset({LABELED, UNLABELED, UNLABELED_TARGETS, LABELED_TARGETS})

    def __init__(self, cfg: DistillConfig, student: Student, teacher: Teacher):
        self.student, self.teacher, self.method = student, teacher, cfg.exact_method
        self.theta: dict[str, torch.Tensor] | None = None  # θ before the step, in tensors reused every step

    def __call__(self, b: Batch, measure: bool) -> StepOutput:
        student, dist = self.student, self.student.dist
        t_logits_u = self.teacher.model(b.log_q_u)
        targets = mpl.pseudo_labels(t_logits_u, "soft")
        loss_old, acc_old = student.labeled_loss(b.x_l, b.y_l) if measure else (math.nan, math.nan)

        theta = self.theta = mpl.snapshot_params(student.model, into=self.theta)
        rng = torch.get_rng_state() if self.method == "fd" else None  # the training forward's dropout masks
        logits_u = student.forward(b.x_u)
        student_loss = mpl.soft_cross_entropy(logits_u, targets)
        lr = student.lr
        student.update(student_loss)

        loss_new_t = F.cross_entropy(student.forward_keep_stats(b.x_l), b.y_l)
        v = student.loss_gradient(loss_new_t)  # v = ∇θ' L_l(θ'), one backward
        J = mpl.directional_loss_derivative(student.model, theta, b.x_u, v, method=self.method,
                                            eps=FD_STEP_NORM, base_logits=logits_u.detach(), rng_state=rng,
                                            forward_context=lambda: autocast(student.device, student.use_amp))
        step_scale = student.step_scale(theta, lr)
        h = math.nan
        if measure:
            loss_new = loss_new_t.item()
            if dist.enabled:
                loss_old, loss_new = dist.mean([loss_old, loss_new])
            h = mpl.mpl_signal(loss_old, loss_new)

        t_logits_l, loss_sup = self.teacher.supervised(b)
        # per unit of the student's learning rate, so mpl_weight does not depend on the lr schedule
        loss_mpl = mpl.exact_teacher_loss(F.softmax(t_logits_u, -1), J, step_scale / max(lr, MIN_LR))
        if math.isnan(h):
            h = -loss_mpl.item() * lr  # the surrogate's value is -h to first order: an estimate for free
        loss_t = self.teacher.loss(loss_mpl, loss_sup, b, t_logits_u)
        self.teacher.update(loss_t)
        out = StepOutput(student_loss.item(), loss_t.item(), h)
        return _diagnostics(out, b, targets, t_logits_u, t_logits_l, acc_old) if measure else out
