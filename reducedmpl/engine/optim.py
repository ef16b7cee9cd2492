"""Optimizers and per-step schedulers from timm's factories."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

STEP_DECAYS = 3  # sched: step decays the learning rate (by timm's 0.1) at each third of training
WARMUP_START = 0.01  # warm-up starts at this fraction of the learning rate

def create_optimizer(model_or_params: Any, cfg: Any) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    extra = {} if getattr(cfg, "layer_decay", None) is None else {"layer_decay": cfg.layer_decay}
    try:
        return create_optimizer_v2(model_or_params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **extra)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f"optimizer {cfg.opt!r} is not available ({e})",
                          "use one of timm's names, e.g. sgd, momentum, adamw, lamb") from None


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int, warmup_steps: int):
    """A per-step scheduler from timm's factory (``step_update`` each step)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=max(total_steps, 1), decay_epochs=max(total_steps // STEP_DECAYS, 1),
        warmup_epochs=warmup_steps, warmup_lr=cfg.lr * WARMUP_START if warmup_steps else 0.0, min_lr=cfg.min_lr,
        cooldown_epochs=0, step_on_epochs=False, updates_per_epoch=1)
    return scheduler
