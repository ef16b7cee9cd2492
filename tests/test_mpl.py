"""Tests for reducedmpl.mpl: MPL signal, exact teacher gradient, reduced teacher, losses."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from reducedmpl.mpl import (
    MovingBaseline,
    ReducedTeacher,
    directional_loss_derivative,
    exact_teacher_loss,
    fitted_step_scale,
    frozen_norm_stats,
    kd_loss,
    kd_student_loss,
    label_flip_rate,
    mean_entropy,
    mpl_signal,
    pseudo_labels,
    reinforce_teacher_loss,
    sgd_step_scale,
    snapshot_params,
    soft_cross_entropy,
)

DIM, CLASSES = 5, 4


def tiny_student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def batch(seed: int, n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def labeled_loss(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads])


def grad_dict(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------ 1. MPL signal vs Taylor


def mpl_signal_and_prediction(
    x_l: Tensor, y_l: Tensor, x_u: Tensor, y_hat: Tensor, lr: float
) -> tuple[float, float]:
    """Run one real SGD step; return h = L_old - L_new and η · v(θ')ᵀ g(θ)."""
    model = tiny_student()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with torch.no_grad():
        loss_old = F.cross_entropy(model(x_l), y_l)
    opt.zero_grad()
    F.cross_entropy(model(x_u), y_hat).backward()
    g = grad_dict(model)
    opt.step()
    opt.zero_grad()
    loss_new = F.cross_entropy(model(x_l), y_l)
    loss_new.backward()
    v = grad_dict(model)
    predicted = lr * sum(float((v[k] * g[k]).sum()) for k in g)
    return mpl_signal(loss_old, loss_new.detach()), predicted


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mpl_signal_matches_first_order_taylor(seed: int) -> None:
    x_l, y_l = batch(seed)
    x_u, y_hat = batch(seed + 100)
    h, predicted = mpl_signal_and_prediction(x_l, y_l, x_u, y_hat, lr=1e-4)
    assert abs(predicted) > 1e-10
    assert math.copysign(1.0, h) == math.copysign(1.0, predicted)
    assert abs(h - predicted) <= 1e-2 * abs(predicted)
    # the remainder is second order: 10x smaller η, ~100x smaller error
    h_big, predicted_big = mpl_signal_and_prediction(x_l, y_l, x_u, y_hat, lr=1e-3)
    assert abs(h - predicted) < 0.03 * abs(h_big - predicted_big)


def test_mpl_signal_positive_when_pseudo_labels_are_the_true_labels() -> None:
    x_l, y_l = batch(7)
    h, predicted = mpl_signal_and_prediction(x_l, y_l, x_l, y_l, lr=1e-2)
    assert h > 0 and predicted > 0
    assert abs(h - predicted) <= 2e-2 * predicted
    # wrong labels on the same inputs: the step hurts the labeled loss
    h_bad, _ = mpl_signal_and_prediction(x_l, y_l, x_l, (y_l + 1) % CLASSES, lr=1e-2)
    assert h_bad < 0


def test_mpl_signal_accepts_floats_and_tensors() -> None:
    assert mpl_signal(2.0, 1.5) == pytest.approx(0.5)
    assert mpl_signal(torch.tensor(1.0), torch.tensor(3.0)) == pytest.approx(-2.0)


# ------------------------------------------------------------------ 2. exact teacher gradient


def random_teacher(seed: int) -> ReducedTeacher:
    torch.manual_seed(seed)
    teacher = ReducedTeacher(CLASSES, hidden=16, extra_features=True, learn_temperature=True)
    nn.init.normal_(teacher.mlp[-1].weight, std=0.5)  # break the zero init so ∂/∂ψ is non-trivial
    nn.init.normal_(teacher.mlp[-1].bias, std=0.5)
    return teacher.double()


def true_teacher_grad(
    teacher: ReducedTeacher, log_q_u: Tensor, x_u: Tensor, x_l: Tensor, y_l: Tensor, lr: float
) -> Tensor:
    """∇ψ L_l(θ'(ψ)) through one differentiable SGD step on soft pseudo labels."""
    student = tiny_student()
    theta = dict(student.named_parameters())
    t_u = F.softmax(teacher(log_q_u), -1)
    inner = soft_cross_entropy(functional_call(student, theta, (x_u,)), t_u)
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    theta_new = {k: p - lr * g for (k, p), g in zip(theta.items(), grads)}
    outer = labeled_loss(student, theta_new, x_l, y_l)
    return flat(list(torch.autograd.grad(outer, list(teacher.parameters()))))


def surrogate_teacher_grad(
    teacher: ReducedTeacher,
    log_q_u: Tensor,
    x_u: Tensor,
    x_l: Tensor,
    y_l: Tensor,
    lr: float,
    method: str,
) -> tuple[Tensor, float, float]:
    """The training-loop recipe; returns (∇ψ surrogate, surrogate value, h)."""
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    teacher_logits = teacher(log_q_u)
    targets = pseudo_labels(teacher_logits, "soft")
    with torch.no_grad():
        loss_old = F.cross_entropy(student(x_l), y_l)
    theta = snapshot_params(student)
    opt.zero_grad()
    soft_cross_entropy(student(x_u), targets).backward()
    opt.step()
    opt.zero_grad()
    loss_new = F.cross_entropy(student(x_l), y_l)
    loss_new.backward()
    v = grad_dict(student)
    J = directional_loss_derivative(student, theta, x_u, v, method=method, eps=1e-7)
    surrogate = exact_teacher_loss(F.softmax(teacher_logits, -1), J, lr)
    grad = flat(list(torch.autograd.grad(surrogate, list(teacher.parameters()))))
    return grad, float(surrogate.detach()), mpl_signal(loss_old, loss_new.detach())


@pytest.mark.parametrize("method", ["jvp", "fd"])
@pytest.mark.parametrize("lr", [1e-3, 0.3])
def test_exact_teacher_gradient_matches_autograd_through_sgd_step(method: str, lr: float) -> None:
    teacher = random_teacher(0)
    g = torch.Generator().manual_seed(5)
    log_q_u = F.log_softmax(2 * torch.randn(8, CLASSES, generator=g, dtype=torch.float64), -1)
    x_u, _ = batch(11, n=8)
    x_l, y_l = batch(12)
    expected = true_teacher_grad(teacher, log_q_u, x_u, x_l, y_l, lr)
    got, value, h = surrogate_teacher_grad(teacher, log_q_u, x_u, x_l, y_l, lr, method)
    assert expected.norm() > 0
    assert cosine(got, expected) > 0.999
    assert got.norm() == pytest.approx(float(expected.norm()), rel=0.03)
    if lr == 1e-3:  # surrogate value ≈ L_new - L_old = -h to first order
        assert value == pytest.approx(-h, rel=0.02)


def test_exact_teacher_loss_sign_and_shape_check() -> None:
    probs = torch.tensor([[0.5, 0.5]], requires_grad=True)
    # J > 0: a step on class 0 lowers L_l by ≈ η·J, so descent must raise t_0 and lower t_1
    J = torch.tensor([[1.0, -1.0]])
    exact_teacher_loss(probs, J, 0.1).backward()
    assert probs.grad[0, 0] < 0 < probs.grad[0, 1]
    with pytest.raises(ValueError):
        exact_teacher_loss(probs, torch.zeros(2, 2), 0.1)


# ------------------------------------------------------------------ 3. J: jvp == fd == autograd


def test_directional_derivative_jvp_fd_and_autograd_agree() -> None:
    student = tiny_student(3)
    x_u, _ = batch(21, n=3)
    theta = snapshot_params(student)
    g = torch.Generator().manual_seed(9)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in theta.items()}
    j_jvp = directional_loss_derivative(student, theta, x_u, v, method="jvp")
    j_fd = directional_loss_derivative(student, theta, x_u, v, method="fd", eps=1e-7)
    params = dict(student.named_parameters())
    losses = -F.log_softmax(functional_call(student, params, (x_u,)), -1)
    expected = torch.empty_like(losses)
    for u in range(losses.shape[0]):
        for c in range(losses.shape[1]):
            grads = torch.autograd.grad(losses[u, c], list(params.values()), retain_graph=True)
            expected[u, c] = sum((v[k] * gr).sum() for k, gr in zip(params, grads))
    assert j_jvp.shape == (3, CLASSES)
    torch.testing.assert_close(j_jvp, expected.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(j_fd, expected.detach(), rtol=1e-5, atol=1e-5)


def test_directional_derivative_uses_theta_not_live_params_and_subset_of_v() -> None:
    student = tiny_student(4)
    x_u, _ = batch(22, n=3)
    theta = snapshot_params(student)
    v = {"2.weight": torch.ones_like(theta["2.weight"])}
    before = directional_loss_derivative(student, theta, x_u, v)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # the live model moves to θ'; J must still be taken at θ
    after = directional_loss_derivative(student, theta, x_u, v)
    torch.testing.assert_close(before, after)
    fd = directional_loss_derivative(student, theta, x_u, v, method="fd", eps=1e-7)
    torch.testing.assert_close(fd, before, rtol=1e-5, atol=1e-5)
    zero = {"2.weight": torch.zeros_like(theta["2.weight"])}
    assert directional_loss_derivative(student, theta, x_u, zero, method="fd").abs().max() == 0
    with pytest.raises(ValueError):
        directional_loss_derivative(student, theta, x_u, v, method="nope")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def timm_student() -> nn.Module:
    timm = pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        # zero_init_last=False: zero BN gammas put ReLU inputs exactly on their kink at init,
        # where a one-sided finite difference legitimately differs from the (sub)gradient
        return timm.create_model("test_resnet", num_classes=10, in_chans=1, zero_init_last=False)


def test_jvp_on_timm_batchnorm_model_keeps_running_stats(timm_student: nn.Module) -> None:
    model = timm_student.double().train()
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    theta = snapshot_params(model)
    g = torch.Generator().manual_seed(0)
    v = {k: 1e-2 * torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in theta.items()}
    buffers_before = {k: b.clone() for k, b in model.named_buffers()}
    assert any(k.endswith("running_mean") for k in buffers_before)
    J = directional_loss_derivative(model, theta, x, v, method="jvp")
    J_fd = directional_loss_derivative(model, theta, x, v, method="fd", eps=1e-6)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers_before[k]), k
    assert model.training
    assert J.shape == (4, 10) and torch.isfinite(J).all()
    torch.testing.assert_close(J, J_fd, rtol=1e-4, atol=1e-4)
    # train mode: J is the derivative of the batch-statistics forward, checked against autograd
    c = 3
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    params = dict(model.named_parameters())
    loss = -F.log_softmax(functional_call(model, (params, buffers), (x,)), -1)[:, c].sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    expected = sum(float((v[k] * gr).sum()) for k, gr in zip(params, grads))
    assert float(J[:, c].sum()) == pytest.approx(expected, rel=1e-6)
    model.float()


def test_jvp_on_timm_float32_eval_mode(timm_student: nn.Module) -> None:
    model = timm_student.float().eval()
    x = torch.randn(2, 1, 16, 16)
    theta = snapshot_params(model)
    v = {k: torch.randn_like(p) for k, p in theta.items()}
    J = directional_loss_derivative(model, theta, x, v)
    J_fd = directional_loss_derivative(model, theta, x, v, method="fd")
    assert cosine(J, J_fd) > 0.99
    model.train()


def test_frozen_norm_stats_uses_batch_statistics_and_keeps_running_ones(timm_student: nn.Module) -> None:
    model = timm_student.float().train()
    x = torch.randn(4, 1, 16, 16)
    before = {k: b.clone() for k, b in model.named_buffers()}
    with frozen_norm_stats(model):
        inside = model(x)
        assert all(not m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k  # running statistics and batch counters untouched
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    plain = model(x)  # the same train-mode output (batch statistics), which now updates the running ones
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    assert any(not torch.equal(b, before[k]) for k, b in model.named_buffers())
    eval_before = model.eval()(x)
    with frozen_norm_stats(model):  # eval mode: running statistics are read as usual
        torch.testing.assert_close(model(x), eval_before, rtol=0, atol=0)
    model.train()
    loss = model(x).sum()
    with frozen_norm_stats(model):  # safe under autograd: nothing modified in place
        (loss + model(x).sum()).backward()
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ 4. untrained teacher = identity


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("temp", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_untrained_teacher_is_identity(extra: bool, temp: bool, depth: int) -> None:
    torch.manual_seed(0)
    teacher = ReducedTeacher(7, hidden=32, depth=depth, extra_features=extra, learn_temperature=temp)
    log_q = F.log_softmax(3 * torch.randn(10, 7), -1)
    out = teacher(log_q)
    assert torch.equal(out, log_q)
    torch.testing.assert_close(F.softmax(out, -1), log_q.exp(), rtol=0, atol=1e-7)
    assert teacher.temperature == 1.0


def test_teacher_handles_zero_probabilities_and_rejects_bad_shapes() -> None:
    teacher = ReducedTeacher(3, extra_features=True)
    log_q = torch.tensor([[0.0, -math.inf, -math.inf]])
    out = teacher(log_q)
    assert torch.isfinite(out).all()
    assert F.softmax(out, -1)[0, 0] > 0.999
    with pytest.raises(ValueError):
        teacher(torch.zeros(2, 4))
    with pytest.raises(ValueError):
        ReducedTeacher(1)


# ------------------------------------------------------------------ 5. learnable correction


def confused_teacher_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """6 classes; the large teacher swaps classes 0 and 1 whenever q_4 > q_5 (learnable from q)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.where(
        torch.rand(n, generator=g) < 0.7,
        torch.randint(0, 2, (n,), generator=g),
        torch.randint(2, 6, (n,), generator=g),
    )
    logits = torch.randn(n, 6, generator=g)
    logits[torch.arange(n), y] += 3.0
    swap = logits[:, 4] > logits[:, 5]
    logits[swap] = logits[swap][:, [1, 0, 2, 3, 4, 5]]
    return F.log_softmax(logits, -1), y


def test_reduced_teacher_learns_to_fix_systematic_confusion() -> None:
    log_q, y = confused_teacher_data(3000, 0)
    train_q, train_y = log_q[:1000], y[:1000]
    test_q, test_y = log_q[1000:], y[1000:]
    large_train = float((train_q.argmax(-1) == train_y).float().mean())
    large_test = float((test_q.argmax(-1) == test_y).float().mean())
    flipped = 1 - large_test
    assert 0.25 < flipped < 0.45  # the large teacher is wrong on a sizeable learnable fraction
    torch.manual_seed(0)
    teacher = ReducedTeacher(6, hidden=64, extra_features=True)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(teacher(train_q), train_y).backward()
        opt.step()
    with torch.no_grad():
        acc_train = float((teacher(train_q).argmax(-1) == train_y).float().mean())
        acc_test = float((teacher(test_q).argmax(-1) == test_y).float().mean())
    assert acc_train > large_train + 0.15
    assert acc_test > large_test + 0.15


# ------------------------------------------------------------------ 6. reinforce sign


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_reinforce_teacher_loss_sign(advantage: float) -> None:
    torch.manual_seed(0)
    teacher = ReducedTeacher(5, hidden=16)
    nn.init.normal_(teacher.mlp[-1].weight, std=0.1)
    log_q = F.log_softmax(torch.randn(8, 5), -1)
    labels = pseudo_labels(teacher(log_q), "sample", generator=torch.Generator().manual_seed(1))
    before = F.softmax(teacher(log_q), -1).gather(1, labels[:, None]).detach()
    opt = torch.optim.SGD(teacher.parameters(), lr=0.1)
    reinforce_teacher_loss(teacher(log_q), labels, torch.tensor(advantage)).backward()
    opt.step()
    after = F.softmax(teacher(log_q), -1).gather(1, labels[:, None]).detach()
    change = float((after - before).mean())
    assert change * advantage > 0


def test_reinforce_rejects_soft_labels() -> None:
    with pytest.raises(ValueError):
        reinforce_teacher_loss(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), 1.0)


# ------------------------------------------------------------------ 7. KD, baseline, helpers


def test_kd_loss_zero_iff_same_distribution() -> None:
    logits = torch.randn(6, 5)
    log_q = F.log_softmax(logits, -1)
    for tau in (1.0, 4.0):
        assert float(kd_loss(logits + 2.0, log_q, tau)) == pytest.approx(0.0, abs=1e-6)
        assert float(kd_loss(torch.randn(6, 5), log_q, tau)) > 1e-4
    hard_q = torch.tensor([[0.0, -math.inf, -math.inf]])
    assert torch.isfinite(kd_loss(torch.randn(1, 3), hard_q, 2.0))
    # τ² scaling keeps the gradient magnitude comparable: KL at τ matches τ² · KL of tempered dists
    s = torch.randn(6, 5)
    tau = 3.0
    direct = F.kl_div(F.log_softmax(s / tau, -1), F.softmax(logits / tau, -1), reduction="batchmean")
    assert float(kd_loss(s, log_q, tau)) == pytest.approx(tau**2 * float(direct), rel=1e-5)


def test_kd_student_loss_mixes_label_ce_on_the_labeled_batch() -> None:
    s, log_q = torch.randn(4, 3), F.log_softmax(torch.randn(4, 3), -1)
    s_l, y = torch.randn(2, 3), torch.tensor([0, 2])
    assert float(kd_student_loss(s, log_q)) == pytest.approx(float(kd_loss(s, log_q)))
    mixed = kd_student_loss(s, log_q, 2.0, s_l, y, label_weight=0.25, label_smoothing=0.1)
    expected = 0.75 * kd_loss(s, log_q, 2.0) + 0.25 * F.cross_entropy(s_l, y, label_smoothing=0.1)
    assert float(mixed) == pytest.approx(float(expected))
    with pytest.raises(ValueError):
        kd_student_loss(s, log_q, label_weight=0.5)
    with pytest.raises(ValueError):
        kd_student_loss(s, log_q, label_weight=1.5)


def test_moving_baseline_updates_and_round_trips() -> None:
    b = MovingBaseline(decay=0.9)
    assert b.update(1.0) == pytest.approx(1.0)
    assert b.value == pytest.approx(0.1)
    assert b.update(torch.tensor(2.0)) == pytest.approx(1.9)
    state = b.state_dict()
    assert all(isinstance(x, (int, float)) for x in state.values())
    restored = MovingBaseline(decay=0.5)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.update(0.5) == b.update(0.5)
    with pytest.raises(ValueError):
        MovingBaseline(decay=1.0)
    with pytest.raises(KeyError):
        restored.load_state_dict({"decay": 0.9})


def test_soft_cross_entropy_matches_hard_ce_on_one_hot() -> None:
    logits, y = torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 2])
    one_hot = F.one_hot(y, 4).float()
    assert float(soft_cross_entropy(logits, one_hot)) == pytest.approx(float(F.cross_entropy(logits, y)))


def test_pseudo_labels_kinds() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 9.0]], requires_grad=True)
    assert pseudo_labels(logits, "argmax").tolist() == [0, 2]
    a = pseudo_labels(logits, "sample", generator=torch.Generator().manual_seed(3))
    b = pseudo_labels(logits, "sample", generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.int64 and torch.equal(a, b)
    soft = pseudo_labels(logits, "soft")
    assert not soft.requires_grad
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    many = pseudo_labels(torch.zeros(4000, 2), "sample", generator=torch.Generator().manual_seed(0))
    assert 0.45 < float(many.float().mean()) < 0.55
    with pytest.raises(ValueError):
        pseudo_labels(logits, "mode")  # type: ignore[arg-type]


def test_label_flip_rate_and_mean_entropy() -> None:
    log_q = F.log_softmax(torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]]), -1)
    assert label_flip_rate(torch.tensor([0, 0, 0, 1]), log_q) == pytest.approx(0.25)
    assert label_flip_rate(log_q.exp(), log_q) == 0.0
    uniform = torch.zeros(3, 8)
    assert mean_entropy(uniform) == pytest.approx(math.log(8))
    assert mean_entropy(torch.tensor([[0.0, -math.inf]])) == pytest.approx(0.0)


def test_step_scales() -> None:
    torch.manual_seed(0)
    for kwargs in ({}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.3},
                   {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "weight_decay": 0.1}):
        # measure ∂(update)/∂g on the second step (momentum buffer exists)
        moved = []
        for delta in (0.0, 1.0):
            p = nn.Parameter(torch.ones(3, dtype=torch.float64))
            opt = torch.optim.SGD([p], lr=0.1, **kwargs)
            p.grad = torch.full_like(p, 0.5)
            opt.step()
            start = p.detach().clone()
            p.grad = torch.full_like(p, 0.2 + delta)
            opt.step()
            moved.append(start - p.detach())
        measured = float((moved[1] - moved[0]).mean())
        expected = sgd_step_scale(0.1, kwargs.get("momentum", 0.0), kwargs.get("dampening", 0.0),
                                  kwargs.get("nesterov", False))
        assert measured == pytest.approx(expected, rel=1e-9), kwargs
    theta = {"w": torch.tensor([1.0, 2.0])}
    grad = {"w": torch.tensor([0.5, -1.0])}
    assert fitted_step_scale(theta, {"w": theta["w"] - 0.3 * grad["w"]}, grad) == pytest.approx(0.3)
    assert fitted_step_scale(theta, theta, {"w": torch.zeros(2)}) == 0.0
