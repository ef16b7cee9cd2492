"""Run by ``torchrun`` in tests/test_distributed.py: a few distill steps on every rank, then each rank saves
what it holds (reduced teacher before and after, student) to OUT/rank{R}.pt so the test can compare the ranks."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from reducedmpl import distributed
from reducedmpl.config import DataConfig, DistillConfig, from_dict, to_dict
from reducedmpl.data.loading import default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.engine.device import resolve_device
from reducedmpl.stages.distill import Distiller, open_store, resolve_data
from reducedmpl.data.setup import setup_data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-grad", default="exact")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = resolve_device("cpu")
    dist = distributed.setup(device)
    cfg = from_dict(DistillConfig, {"student": "test_resnet", "steps": args.steps, "batch_size": 8,
                                    "unlabeled_batch_size": 16, "teacher_grad": args.teacher_grad,
                                    "baseline_decay": 0.9, "device": "cpu"}, "distill")
    store = open_store(args.targets, 64)
    data_cfg = resolve_data(cfg, store)
    cfg = dataclasses.replace(cfg, data=to_dict(data_cfg))
    data = setup_data(data_cfg)
    d = Distiller(cfg, data, store, device, dist)
    initial = {k: v.clone() for k, v in d.teacher.model.state_dict().items()}
    outs = [d.step(measure=True) for _ in range(args.steps)]
    torch.save({"initial_teacher": initial, "teacher": d.teacher.model.state_dict(), "student": d.student.model.state_dict(),
                "h": [o.h for o in outs], "student_loss": [o.student_loss for o in outs]},
               Path(args.out) / f"rank{dist.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main()
