"""The steps that ``distill`` runs (reducedmpl/methods.py), checked against autograd on a tiny student.

These drive the real step objects — the code the distill loop calls — not a recipe written in the test.
"""
from __future__ import annotations

import copy
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from reducedmpl import distributed, methods, mpl
from reducedmpl.config import DistillConfig, OptimConfig
from reducedmpl.engine.device import grad_scaler

IN, CLASSES = 6, 4
CPU = torch.device("cpu")


def tiny_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def random_teacher(seed: int = 1) -> mpl.ReducedTeacher:
    torch.manual_seed(seed)
    teacher = mpl.ReducedTeacher(CLASSES, hidden=16, extra_features=True)
    nn.init.normal_(teacher.mlp[-1].weight, std=0.5)  # away from the identity, so ∂/∂ψ is not trivial
    nn.init.normal_(teacher.mlp[-1].bias, std=0.5)
    return teacher


def make_batch(seed: int, n_l: int = 8, n_u: int = 16) -> methods.Batch:
    g = torch.Generator().manual_seed(seed)
    return methods.Batch(x_l=torch.randn(n_l, IN, generator=g), y_l=torch.randint(0, CLASSES, (n_l,), generator=g),
                         log_q_l=F.log_softmax(2 * torch.randn(n_l, CLASSES, generator=g), -1),
                         x_u=torch.randn(n_u, IN, generator=g),
                         log_q_u=F.log_softmax(2 * torch.randn(n_u, CLASSES, generator=g), -1))


def build(cfg: DistillConfig, optimizer: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """A real step of ``cfg`` with a tiny student under ``optimizer`` and a reduced teacher whose own optimizer
    does not move it (lr 0), so its gradient can be read after the step."""
    model = tiny_student()
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=lr, weight_decay=weight_decay),
           "heavy-ball": lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, weight_decay=weight_decay),
           "nesterov": lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum, nesterov=True,
                                                 weight_decay=weight_decay)}[optimizer](model.parameters())
    dist = distributed.Dist()
    student = methods.Student(model, model, opt, grad_scaler(CPU, False), None, CPU, False, False, dist)
    reduced = random_teacher()
    teacher = methods.Teacher(reduced, torch.optim.SGD(reduced.parameters(), lr=0.0), None, cfg, dist)
    return methods.build_step(cfg, student, teacher), student, teacher


def teacher_grad(teacher: methods.Teacher) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in teacher.model.parameters()])


def reference_teacher_grad(student_before: nn.Module, buf: dict | None, teacher: mpl.ReducedTeacher,
                           b: methods.Batch, lr: float, momentum: float, nesterov: bool,
                           weight_decay: float) -> torch.Tensor:
    """∇ψ L_l(θ'(ψ)) by autograd through one differentiable SGD step (with the optimizer's momentum buffer)."""
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in student_before.named_parameters()}
    targets = F.softmax(teacher(b.log_q_u), -1)
    inner = mpl.soft_cross_entropy(functional_call(student_before, theta, (b.x_u,)), targets)
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    theta_new = {}
    for (k, p), g in zip(theta.items(), grads):
        g = g + weight_decay * p.detach()
        if momentum:
            new_buf = g if buf is None else momentum * buf[k] + g
            g = g + momentum * new_buf if nesterov else new_buf
        theta_new[k] = p.detach() - lr * g
    outer = F.cross_entropy(functional_call(student_before, theta_new, (b.x_l,)), b.y_l)
    return torch.cat([g.flatten() for g in torch.autograd.grad(outer, list(teacher.parameters()))])


def momentum_buffers(opt: torch.optim.Optimizer, model: nn.Module) -> dict | None:
    bufs = {n: opt.state[p].get("momentum_buffer") for n, p in model.named_parameters() if p in opt.state}
    if not bufs or any(v is None for v in bufs.values()):
        return None
    return {k: v.clone() for k, v in bufs.items()}


@pytest.mark.parametrize("method", ["fd", "jvp"])
@pytest.mark.parametrize("optimizer", ["sgd", "heavy-ball", "nesterov"])
def test_exact_step_teacher_gradient_matches_autograd(optimizer: str, method: str) -> None:
    lr, momentum, wd = 0.05, 0.9, 1e-3
    cfg = DistillConfig(teacher_grad="exact", exact_method=method, mpl_weight=1.0, supervised_weight=0.0,
                        kl_weight=0.0, teacher_clip_grad=None)
    step, student, teacher = build(cfg, optimizer, lr, momentum, wd)
    assert isinstance(step, methods.ExactStep)
    for seed in (10, 11):  # two steps first, so that the momentum buffer holds history
        step(make_batch(seed), measure=False)
    b = make_batch(12)
    before = copy.deepcopy(student.model)
    buf = momentum_buffers(student.optimizer, student.model)
    assert (buf is None) == (optimizer == "sgd")
    out = step(b, measure=True)
    expected = reference_teacher_grad(before, buf, teacher.model, b, lr, momentum if optimizer != "sgd" else 0.0,
                                      optimizer == "nesterov", wd)
    got = teacher_grad(teacher) * lr  # the step's surrogate is per unit of learning rate
    assert expected.norm() > 0
    cos = F.cosine_similarity(got, expected, dim=0).item()
    assert cos > 0.999, cos
    assert got.norm().item() == pytest.approx(expected.norm().item(), rel=0.01)
    # h is measured (L_old - L_new) on the very batch the step used
    with torch.no_grad():
        h = F.cross_entropy(before(b.x_l), b.y_l).item() - F.cross_entropy(student.model(b.x_l), b.y_l).item()
    assert out.h == pytest.approx(h, rel=1e-5, abs=1e-7)


def test_exact_step_scale_follows_the_optimizer() -> None:
    """The Nesterov step moves θ by lr·(1+μ)·g per unit of g: dropping the factor would shrink the MPL term."""
    cfg = DistillConfig(teacher_grad="exact", teacher_clip_grad=None)
    for optimizer, factor in (("sgd", 1.0), ("heavy-ball", 1.0), ("nesterov", 1.9)):
        _, student, _ = build(cfg, optimizer, lr=0.1)
        assert student.step_scale({}, 0.1) == pytest.approx(0.1 * factor), optimizer


@pytest.mark.parametrize("lr", [1e-3])
def test_reinforce_step_h_matches_autograd(lr: float) -> None:
    cfg = DistillConfig(teacher_grad="reinforce", pseudo_label="argmax", baseline_decay=None, mpl_weight=1.0,
                        supervised_weight=0.0, kl_weight=0.0, teacher_clip_grad=None)
    step, student, teacher = build(cfg, "sgd", lr)
    assert isinstance(step, methods.ReinforceStep)
    b = make_batch(3)
    before = copy.deepcopy(student.model)
    with torch.no_grad():
        y_hat = teacher.model(b.log_q_u).argmax(-1)
    out = step(b, measure=True)
    # h is the labeled loss before minus after the real step
    params = dict(before.named_parameters())
    loss_old = F.cross_entropy(functional_call(before, params, (b.x_l,)), b.y_l)
    loss_new = F.cross_entropy(student.model(b.x_l), b.y_l)
    assert out.h == pytest.approx(loss_old.item() - loss_new.item(), rel=1e-5, abs=1e-9)
    # and, to first order, η · ∇θ'L_l(θ')ᵀ ∇θ CE(ŷ, S(x_u; θ)) by autograd
    g_u = torch.autograd.grad(F.cross_entropy(functional_call(before, params, (b.x_u,)), y_hat),
                              list(params.values()))
    v = torch.autograd.grad(loss_new, list(student.model.parameters()))
    predicted = lr * sum(float((a * c).sum()) for a, c in zip(v, g_u))
    assert abs(predicted) > 1e-8
    assert out.h == pytest.approx(predicted, rel=0.02)
    # the teacher followed advantage h (no baseline): its gradient is h · ∇ψ CE(ŷ, T)
    ref = copy.deepcopy(teacher.model)
    expected = torch.autograd.grad(out.h * F.cross_entropy(ref(b.log_q_u), y_hat), list(ref.parameters()))
    torch.testing.assert_close(teacher_grad(teacher), torch.cat([e.flatten() for e in expected]))


def test_steps_read_only_what_they_need_and_registry_covers_the_modes() -> None:
    hints = typing.get_type_hints(DistillConfig)
    assert set(typing.get_args(hints["mode"])) == set(methods.METHODS)
    assert set(typing.get_args(hints["teacher_grad"])) == set(methods.TEACHER_GRADIENTS)
    cfg = DistillConfig(mode="supervised")
    step, _, _ = build(cfg, "sgd", 0.1)
    assert step.needs == {methods.LABELED}
    out = step(methods.Batch(x_l=make_batch(0).x_l, y_l=make_batch(0).y_l), measure=True)
    assert math.isfinite(out.student_loss) and math.isnan(out.h)
    kd, _, _ = build(DistillConfig(mode="kd"), "sgd", 0.1)
    assert kd.needs == {methods.UNLABELED, methods.UNLABELED_TARGETS}
    kd_mixed, _, _ = build(DistillConfig(mode="kd", kd_label_weight=0.5), "sgd", 0.1)
    assert kd_mixed.needs == {methods.UNLABELED, methods.UNLABELED_TARGETS, methods.LABELED}
    b = make_batch(1)
    assert math.isfinite(kd_mixed(b, measure=True).entropy_large)


def test_kd_step_loss_is_the_pure_kd_loss() -> None:
    cfg = DistillConfig(mode="kd", kd_temperature=2.0)
    step, student, _ = build(cfg, "sgd", 0.0)
    b = make_batch(4)
    with torch.no_grad():
        expected = mpl.kd_loss(student.model(b.x_u), b.log_q_u, 2.0).item()
    assert step(methods.Batch(x_u=b.x_u, log_q_u=b.log_q_u), measure=False).student_loss == pytest.approx(expected)


def test_optim_config_names_reach_the_step_scale() -> None:
    """timm's 'sgd'/'nesterov' are Nesterov momentum, 'momentum' heavy-ball: the scale is read off the optimizer."""
    from reducedmpl.engine.optim import create_optimizer

    model = tiny_student()
    for name, factor in (("sgd", 1.9), ("nesterov", 1.9), ("momentum", 1.0)):
        opt = create_optimizer(model, OptimConfig(opt=name, lr=0.1, momentum=0.9, weight_decay=0.0))
        student = methods.Student(model, model, opt, grad_scaler(CPU, False), None, CPU, False, False,
                                  distributed.Dist())
        assert student.step_scale({}, 0.1) == pytest.approx(0.1 * factor), name


def test_online_kd_teacher_sees_the_students_view_and_matches_the_store(tiny_teacher, tiny_targets):
    """Without augmentation the student's view is the clean input, so the teacher run on it reproduces the
    logits precompute stored (from the same teacher on the same images, through the teacher's own
    normalisation)."""
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    cfg = stage_config("distill", flags={"mode": "online-kd", "large_teacher": str(tiny_teacher), "steps": 3,
                                         "data": {"crop_padding": 0}, "device": "cpu"})
    store = open_store(tiny_targets, 64)
    data_cfg = resolve_data(cfg, store)
    d = Distiller(cfg, setup_data(data_cfg), store, CPU)
    assert isinstance(d.method, methods.OnlineKDStep) and d.teacher is None
    assert methods.UNLABELED_TARGETS not in d.method.needs  # no stored targets are read
    x_u, _, ids = d.unlabeled.batcher.batch(0, 0)
    online = d.method.large.log_probs(x_u)
    torch.testing.assert_close(online, torch.from_numpy(store.log_probs(ids.numpy())), rtol=1e-4, atol=1e-4)
    assert math.isfinite(d.step(measure=True).student_loss)
    store.close()


def test_online_kd_teacher_runs_on_the_students_augmented_view(tiny_teacher, tiny_targets, monkeypatch):
    """With augmentation on (random crop, flip), the target of each row is the teacher's output on the very input
    the student trains on in that step, not on the clean image: the two differ here."""
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    cfg = stage_config("distill", flags={"mode": "online-kd", "large_teacher": str(tiny_teacher), "steps": 3,
                                         "data": {"crop_padding": 2, "hflip": True}, "device": "cpu"})
    store = open_store(tiny_targets, 64)
    d = Distiller(cfg, setup_data(resolve_data(cfg, store)), store, CPU)
    x_u, _, ids = d.unlabeled.batcher.batch(0, 0)  # the first step's pseudo-label batch (a function of its seed)
    seen = {}
    forward, kd_loss = d.method.student.forward, mpl.kd_student_loss

    def student_forward(x):
        seen["student"] = x.detach().clone()
        return forward(x)

    def spy_kd_loss(logits_u, log_q_u, *args):
        seen["target"] = log_q_u.detach().clone()
        return kd_loss(logits_u, log_q_u, *args)

    monkeypatch.setattr(d.method.student, "forward", student_forward)
    monkeypatch.setattr(mpl, "kd_student_loss", spy_kd_loss)
    d.step(measure=True)
    student_view = seen["student"][:len(x_u)]
    assert torch.equal(student_view, x_u)
    torch.testing.assert_close(seen["target"], d.method.large.log_probs(student_view), rtol=0, atol=1e-6)
    clean = torch.from_numpy(store.log_probs(ids.numpy()))
    assert (seen["target"] - clean).abs().amax() > 1e-2  # the clean image's target is another one
    store.close()


def test_online_kd_needs_a_teacher_of_the_datas_classes(tiny_targets, tmp_path):
    from conftest import assert_one_line_error, cli

    r = cli("distill", "--targets", tiny_targets, "--mode", "online-kd", "--out", tmp_path / "a", check=False)
    assert_one_line_error(r, "online-kd needs the large teacher", "--teacher")
    r = cli("distill", "--targets", tiny_targets, "--mode", "kd", "--teacher", tiny_targets, "--out", tmp_path / "b",
            check=False)
    assert_one_line_error(r, "only by --mode online-kd")
    r = cli("distill", "--targets", tiny_targets, "--mode", "online-kd", "--teacher", tiny_targets,
            "--out", tmp_path / "c", check=False)
    assert r.exit_code == 2 and not (tmp_path / "c" / "student.pt").exists()
