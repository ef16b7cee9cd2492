"""ReducedMPL: Meta Pseudo Labels with a small teacher that edits stored large-teacher outputs.

Notation: student S (parameters θ), large teacher distribution q_L (stored as log-probabilities),
reduced teacher T (an MLP with parameters ψ), labeled batch (x_l, y_l), unlabeled batch x_u.

One training step (the caller owns the models and optimizers; this module holds the math):

1. ``t_u = ReducedTeacher(log_q_u)``; ``pseudo_labels(t_u, kind)`` gives ŷ_u.
2. ``L_old = CE(y_l, S(x_l; θ))`` (value only).
3. Student step θ → θ' on ``CE(ŷ_u, S(aug(x_u); θ))``.
4. ``L_new = CE(y_l, S(x_l; θ'))``.
5. ``h = mpl_signal(L_old, L_new)`` (> 0 when the pseudo-labeled step helped);
   optionally ``advantage = MovingBaseline(decay).update(h)``.
6. Teacher loss, either
   * ``reinforce_teacher_loss(t_u, ŷ_u, advantage)`` (hard pseudo labels), or
   * ``exact_teacher_loss(softmax(t_u), J, step_scale)`` (soft pseudo labels), with
     ``J = directional_loss_derivative(S, θ, x_u, v)`` and ``v = ∇θ' L_l(θ')``,
   combined with the supervised term ``CE(y_l, T(x_l))`` by ``reduced_teacher_loss``.

Sign of the exact gradient. With plain SGD the student step on soft targets t_u(ψ) is
``θ' = θ - η g_u``, ``g_u = (1/B) Σ_{u,c} t_{u,c} ∇θ ℓ_{u,c}(θ)``, ``ℓ_{u,c} = -log S_c(x_u; θ)``.
θ does not depend on ψ, so by the chain rule

    dL_l(θ')/dψ = vᵀ dθ'/dψ = -(η/B) Σ_{u,c} (vᵀ ∇θ ℓ_{u,c}(θ)) dt_{u,c}/dψ = -(η/B) Σ J_{u,c} dt_{u,c}/dψ.

Hence the surrogate the teacher minimises is ``L_mpl = -(η/B) Σ stopgrad(J) · t(ψ)`` (note the
minus sign). For one SGD step this gradient is exact, not only first order. Its value
approximates ``L_new - L_old = -h`` to first order.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

PseudoLabelKind = Literal["sample", "argmax", "soft"]
DirectionalMethod = Literal["jvp", "fd"]

DEFAULT_LOGP_FLOOR = -30.0


# --------------------------------------------------------------------------- reduced teacher


class ReducedTeacher(nn.Module):
    """Small MLP that corrects the large teacher's stored log-probabilities.

    ``logits = (clamp(log_q, floor) + f_ψ(features(log_q))) / temperature``. The last layer of
    f_ψ starts at zero and the temperature at 1, so an untrained teacher returns the clamped
    ``log_q`` unchanged: softmax(out) == q_L wherever q_L is above ``exp(logp_floor)``.
    """

    def __init__(
        self,
        num_classes: int,
        hidden: int = 128,
        depth: int = 2,
        extra_features: bool = False,
        learn_temperature: bool = False,
        logp_floor: float = DEFAULT_LOGP_FLOOR,
        activation: Literal["gelu", "relu"] = "gelu",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if depth < 1 or hidden < 1:
            raise ValueError(f"depth and hidden must be >= 1, got depth={depth}, hidden={hidden}")
        if not math.isfinite(logp_floor) or logp_floor >= 0:
            raise ValueError(f"logp_floor must be a finite negative number, got {logp_floor}")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        self.num_classes = num_classes
        self.extra_features = extra_features
        self.logp_floor = float(logp_floor)
        act: type[nn.Module] = nn.GELU if activation == "gelu" else nn.ReLU
        layers: list[nn.Module] = []
        width = num_classes + (2 if extra_features else 0)
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        last = nn.Linear(width, num_classes)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)
        self.log_temperature: nn.Parameter | None = (
            nn.Parameter(torch.zeros(())) if learn_temperature else None
        )

    def features(self, log_q: Tensor) -> Tensor:
        """MLP input: floored log q, plus entropy and top-1 minus top-2 margin if enabled."""
        base = log_q.clamp(min=self.logp_floor)
        if not self.extra_features:
            return base
        q = log_q.exp()
        entropy = -(q * base).sum(-1, keepdim=True)
        top2 = q.topk(2, dim=-1).values
        margin = top2[..., :1] - top2[..., 1:]
        return torch.cat([base, entropy, margin], dim=-1)

    def forward(self, log_q: Tensor) -> Tensor:
        """Map stored log-probabilities (B, C) to corrected teacher logits (B, C)."""
        if log_q.shape[-1] != self.num_classes:
            raise ValueError(
                f"expected log_q with {self.num_classes} classes, got shape {tuple(log_q.shape)}"
            )
        log_q = log_q.to(self.mlp[-1].weight.dtype)
        logits = log_q.clamp(min=self.logp_floor) + self.mlp(self.features(log_q))
        if self.log_temperature is not None:
            logits = logits * torch.exp(-self.log_temperature)
        return logits

    @property
    def temperature(self) -> float:
        """Current output temperature (1.0 when not learned)."""
        return 1.0 if self.log_temperature is None else float(self.log_temperature.detach().exp())


# --------------------------------------------------------------------------- losses


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of ``-Σ_c p_c log softmax(logits)_c``; targets are used as given."""
    if logits.shape != target_probs.shape:
        raise ValueError(f"shape mismatch: {tuple(logits.shape)} vs {tuple(target_probs.shape)}")
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def kd_loss(
    student_logits: Tensor,
    teacher_log_probs: Tensor,
    temperature: float = 1.0,
    logp_floor: float = DEFAULT_LOGP_FLOOR,
) -> Tensor:
    """Hinton distillation: ``τ² · KL(softmax(log_q/τ) || softmax(S/τ))``, batch mean.

    ``teacher_log_probs`` are floored at ``logp_floor`` so -inf entries cannot produce NaN.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = F.log_softmax(teacher_log_probs.to(student_logits.dtype).clamp(min=logp_floor) / temperature, -1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    return kl * temperature**2


def kd_student_loss(
    logits_u: Tensor,
    log_q_u: Tensor,
    temperature: float = 1.0,
    logits_l: Tensor | None = None,
    labels_l: Tensor | None = None,
    label_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The kd method's loss: ``(1 - w) · kd_loss(logits_u, log_q_u) + w · CE_ls(logits_l, labels_l)``.

    KD is on the pseudo-label batch, the label term on the labeled batch; ``w = 0`` is pure KD.
    """
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
    loss = kd_loss(logits_u, log_q_u, temperature)
    if label_weight == 0.0:
        return loss
    if logits_l is None or labels_l is None:
        raise ValueError("the labeled batch's logits and labels are required when label_weight > 0")
    ce = F.cross_entropy(logits_l, labels_l, label_smoothing=label_smoothing)
    return (1 - label_weight) * loss + label_weight * ce


def reduced_teacher_loss(
    loss_mpl: Tensor,
    loss_sup: Tensor,
    teacher_logits_u: Tensor,
    log_q_u: Tensor,
    mpl_weight: float,
    supervised_weight: float,
    kl_weight: float = 0.0,
) -> Tensor:
    """The reduced teacher's loss: ``mpl_weight · L_mpl + supervised_weight · L_sup + kl_weight · KL(q_L ‖ T)``.

    The KL term keeps T near the large teacher's distribution (its dark knowledge) on the pseudo-label batch.
    """
    loss = mpl_weight * loss_mpl + supervised_weight * loss_sup
    if kl_weight > 0:
        loss = loss + kl_weight * kd_loss(teacher_logits_u, log_q_u)
    return loss


# --------------------------------------------------------------------------- pseudo labels


def pseudo_labels(
    teacher_logits: Tensor,
    kind: PseudoLabelKind = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pseudo labels from teacher logits (B, C), always detached from the teacher's graph.

    ``sample`` draws ŷ ~ softmax (the MPL paper), ``argmax`` takes the mode; both return long
    labels (B,). ``soft`` returns the probabilities (B, C) as student targets; for the exact
    teacher gradient recompute ``softmax(teacher_logits)`` with grad.
    """
    probs = F.softmax(teacher_logits.detach().float(), dim=-1)
    if kind == "sample":
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if kind == "argmax":
        return probs.argmax(dim=-1)
    if kind == "soft":
        return probs.to(teacher_logits.dtype)
    raise ValueError(f"unknown pseudo label kind {kind!r}; expected 'sample', 'argmax' or 'soft'")


# --------------------------------------------------------------------------- MPL signal


def mpl_signal(loss_old: Tensor | float, loss_new: Tensor | float) -> float:
    """MPL reward ``h = L_old - L_new``: positive when the pseudo-labeled step lowered the labeled loss.

    To first order (plain SGD, lr η) ``h ≈ η · ∇θ'L_l(θ')ᵀ ∇θ CE(ŷ_u, S(x_u; θ))``.
    """
    return float(loss_old) - float(loss_new)


class MovingBaseline:
    """Exponential moving average baseline for the MPL signal (variance reduction).

    ``update(h)`` returns ``h - b`` and then sets ``b ← decay · b + (1 - decay) · h``.
    """

    def __init__(self, decay: float = 0.99, initial: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value = float(initial)
        self.steps = 0

    def update(self, h: Tensor | float) -> float:
        """Return the advantage ``h - b`` and fold ``h`` into the baseline."""
        h = float(h)
        advantage = h - self.value
        self.value = self.decay * self.value + (1.0 - self.decay) * h
        self.steps += 1
        return advantage

    def state_dict(self) -> dict[str, float | int]:
        """Plain-number state for checkpoints."""
        return {"decay": self.decay, "value": self.value, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        """Restore from :meth:`state_dict` output."""
        missing = {"decay", "value", "steps"} - set(state)
        if missing:
            raise KeyError(f"MovingBaseline state is missing {sorted(missing)}")
        self.decay = float(state["decay"])
        self.value = float(state["value"])
        self.steps = int(state["steps"])


def reinforce_teacher_loss(
    teacher_logits_u: Tensor, hard_labels: Tensor, advantage: Tensor | float
) -> Tensor:
    """REINFORCE-style MPL teacher loss ``advantage · CE(ŷ_u, t_u)``.

    Minimising it with ``advantage > 0`` raises the probability of the pseudo labels (they
    helped the student); ``advantage < 0`` lowers it. ``advantage`` is treated as a constant.
    """
    if hard_labels.dtype not in (torch.int64, torch.int32):
        raise ValueError("reinforce_teacher_loss needs hard (integer) pseudo labels")
    adv = advantage.detach() if isinstance(advantage, Tensor) else float(advantage)
    return adv * F.cross_entropy(teacher_logits_u, hard_labels.long())


def exact_teacher_loss(teacher_probs_u: Tensor, J: Tensor, step_scale: float) -> Tensor:
    """Surrogate ``-(step_scale / B) Σ_{u,c} stopgrad(J_{u,c}) · t_{u,c}(ψ)`` for soft pseudo labels.

    Its gradient wrt ψ equals the gradient of ``L_l(θ'(ψ))`` for a student step
    ``θ' = θ - step_scale · g_u`` (see the module docstring for the derivation); its value
    approximates ``L_new - L_old = -h``. ``J`` comes from :func:`directional_loss_derivative`.

    ``step_scale`` is ∂(θ - θ')/∂g_u: the learning rate for plain SGD, and also for SGD with
    momentum and/or weight decay (those terms do not depend on ψ); see :func:`sgd_step_scale`
    for dampening/Nesterov. For adaptive optimizers (Adam, AdamW) the update is not linear
    in g_u; as an approximation pass the scale that best matches the actual update,
    :func:`fitted_step_scale`.
    """
    if teacher_probs_u.shape != J.shape:
        raise ValueError(f"shape mismatch: {tuple(teacher_probs_u.shape)} vs {tuple(J.shape)}")
    batch = teacher_probs_u.shape[0]
    return -(step_scale / batch) * (J.detach().to(teacher_probs_u.dtype) * teacher_probs_u).sum()


def sgd_step_scale(
    lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """∂(θ - θ')/∂g for ``torch.optim.SGD`` once its momentum buffer exists.

    On the very first step the buffer is a copy of g (no dampening), where the value is ``lr``
    (times ``1 + momentum`` with Nesterov).
    """
    if momentum == 0.0:
        return float(lr)
    if nesterov:
        return float(lr) * (1.0 + momentum * (1.0 - dampening))
    return float(lr) * (1.0 - dampening)


def fitted_step_scale(
    theta: Mapping[str, Tensor], theta_new: Mapping[str, Tensor], grad: Mapping[str, Tensor]
) -> float:
    """Least-squares scalar s with ``θ' - θ ≈ -s · g`` (an approximation for Adam-like optimizers).

    Exactly ``lr`` for plain SGD without weight decay. Returns 0 when g is zero.
    """
    dot = 0.0
    sq = 0.0
    for name, g in grad.items():
        g64 = g.detach().double()
        dot += float(((theta_new[name].detach() - theta[name].detach()).double() * g64).sum())
        sq += float((g64 * g64).sum())
    return -dot / sq if sq > 0 else 0.0


# --------------------------------------------------------------------------- directional derivative


def snapshot_params(model: nn.Module, into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters (θ before the student step); with ``into`` (an earlier
    snapshot of the same model) they are copied into its tensors, which saves allocating them every step."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if into is None or into.keys() != params.keys():
        return {n: p.clone() for n, p in params.items()}
    torch._foreach_copy_(list(into.values()), list(params.values()))
    return into


def _jvp_buffers(model: nn.Module) -> dict[str, Tensor | None]:
    """The model's buffers for a forward-mode pass; running stats of train-mode norms → None.

    A BatchNorm in train mode normalises with batch statistics, so its running statistics do not
    affect the output; passing ``None`` makes it skip their in-place update, which torch.func
    cannot trace. Eval-mode norms read (copies of) their running statistics unchanged.
    """
    out: dict[str, Tensor | None] = {k: b.detach().clone() for k, b in model.named_buffers()}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training:
            if module.track_running_stats:
                prefix = f"{name}." if name else ""
                for stat in ("running_mean", "running_var", "num_batches_tracked"):
                    out[prefix + stat] = None
    return out


def _rng_devices(x: Tensor) -> list[int]:
    if x.is_cuda:
        return [x.device.index if x.device.index is not None else torch.cuda.current_device()]
    return []


def directional_loss_derivative(
    model: nn.Module,
    params_theta: Mapping[str, Tensor],
    x_u: Tensor,
    v: Mapping[str, Tensor],
    method: DirectionalMethod = "jvp",
    eps: float = 1e-2,
    *,
    base_logits: Tensor | None = None,
    rng_state: Tensor | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Tensor:
    """``J_{u,c} = vᵀ ∇θ ℓ_{u,c}(θ)`` with ``ℓ_{u,c} = -log_softmax(model(x_u; θ))_c``, shape (B, C).

    ``params_theta`` holds θ (e.g. :func:`snapshot_params` taken before the student step), so the
    live model may already hold θ'. ``v`` (e.g. the labeled loss's gradient at θ') may cover a
    subset of the parameters; the others are held fixed. Pass the inputs the student actually
    stepped on (e.g. ``aug(x_u)``).

    The model runs in its current mode through ``functional_call``; BatchNorm in train mode uses
    batch statistics (matching the student's step) and its running statistics are left untouched.

    ``method="jvp"``: one forward-mode pass (``torch.func.jvp``). ``method="fd"``: forward
    difference ``[ℓ(θ + s·v) - ℓ(θ)] / s`` with ``s = eps / ‖v‖`` (so ``eps`` is the norm of the
    parameter perturbation). For ``fd`` the caller may pass the training forward's output at θ as
    ``base_logits`` (one forward saved) and the RNG state before it as ``rng_state`` (the same
    dropout masks); ``forward_context`` (e.g. autocast) wraps the forwards.
    """
    theta = {k: t.detach() for k, t in params_theta.items()}
    unknown = set(v) - set(theta)
    if unknown:
        raise KeyError(f"v has entries not in params_theta: {sorted(unknown)[:5]}")
    names = [k for k in v if k in theta]
    x_u = x_u.detach()
    if method == "jvp":
        return _jvp_derivative(model, theta, x_u, v, names)
    if method == "fd":
        return _fd_derivative(model, theta, x_u, v, names, eps, base_logits, rng_state,
                              forward_context or contextlib.nullcontext)
    raise ValueError(f"unknown method {method!r}; expected 'jvp' or 'fd'")


def _jvp_derivative(model: nn.Module, theta: dict[str, Tensor], x_u: Tensor, v: Mapping[str, Tensor],
                    names: list[str]) -> Tensor:
    buffers = _jvp_buffers(model)
    fixed = {k: t for k, t in theta.items() if k not in v}

    def per_class_loss(p: dict[str, Tensor]) -> Tensor:
        return -F.log_softmax(functional_call(model, (p, fixed, buffers), (x_u,)), -1)

    primals = {k: theta[k] for k in names}
    tangents = {k: v[k].detach().to(theta[k].dtype) for k in names}
    with torch.no_grad():
        _, j = jvp(per_class_loss, (primals,), (tangents,))
    return j.detach()


@torch.no_grad()
def _fd_derivative(model: nn.Module, theta: dict[str, Tensor], x_u: Tensor, v: Mapping[str, Tensor],
                   names: list[str], eps: float, base_logits: Tensor | None, rng_state: Tensor | None,
                   forward_context: Callable[[], contextlib.AbstractContextManager]) -> Tensor:
    devices = _rng_devices(x_u)

    def logits_at(params: dict[str, Tensor]) -> Tensor:
        with torch.random.fork_rng(devices=devices), frozen_norm_stats(model), forward_context():
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            out = functional_call(model, params, (x_u,))
            return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out  # autocast's half

    if base_logits is None:
        base_logits = logits_at(theta)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v[k]) for k in names])).item() \
        if names else 0.0
    if norm == 0.0:
        return torch.zeros_like(base_logits)
    step = eps / norm
    shifted = {k: theta[k] + step * v[k].detach().to(theta[k].dtype) for k in names}
    moved = logits_at({**theta, **shifted})
    return (F.log_softmax(base_logits, -1) - F.log_softmax(moved, -1)) / step


_NORM_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm-like layers of ``model``, found once per model (a walk of the module tree each step costs
    about as much as a small layer's forward)."""
    norms = _NORM_LAYERS.get(model)
    if norms is None:
        norms = _NORM_LAYERS[model] = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    return norms


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, train-mode BatchNorm layers normalise with batch statistics but neither read nor
    update their running statistics (nor batch counters): an extra forward (L_old, L_new, the finite
    difference) then leaves them as only the student's real training forward sets them. Nothing is copied,
    and nothing is modified in place, so it is safe under autograd."""
    norms = [m for m in _norm_layers(model) if m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


# --------------------------------------------------------------------------- diagnostics


def mean_entropy(log_probs: Tensor, logp_floor: float = DEFAULT_LOGP_FLOOR) -> float:
    """Mean Shannon entropy (nats) of rows of log-probabilities (logits are normalised first)."""
    lp = F.log_softmax(log_probs.float(), dim=-1)
    return float(-(lp.exp() * lp.clamp(min=logp_floor)).sum(-1).mean())


def label_flip_rate(pseudo: Tensor, log_q: Tensor) -> float:
    """Fraction of rows whose pseudo label (hard, or argmax of soft) differs from argmax q_L."""
    hard = pseudo.argmax(-1) if pseudo.is_floating_point() else pseudo
    return float((hard.to(log_q.device) != log_q.argmax(-1)).float().mean())
