"""No-grad passes over a batch iterator: accuracy and loss, or the logits themselves."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .device import autocast, to_device

# Evaluation batches: large enough to amortise per-batch overhead, small enough for any model on one device.
EVAL_BATCH_SIZE = 256


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
