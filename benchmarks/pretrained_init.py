"""What starting the student from pretrained weights changes (slow, not in CI; about 40 min on 2 quiet cores).

Protocol: ``benchmarks/quality.py``'s (the MNIST test set read in place, split into 4,000 test / 1,000 val / 5,000
train, 10 labels per class, the weak resnet18 teacher of those 100 labels), 300 distill steps, 3 seeds. The
pretrained student is a ``test_resnet`` trained first on *other* data: all 1,258 training images of
scikit-learn's 8x8 digits, upsampled to MNIST's 28 px (30 epochs; it never sees an MNIST image or label). Its weights
are put into a Hugging Face Hub cache under ``OUT/hub`` as ``hf-hub:local/test_resnet.digits28`` (with its
preprocessing in ``config.json``) and read from there offline, as a user's own pretrained model would be.

Variants: kd and ReducedMPL (exact, mpl_weight 1), each from scratch (student lr 0.05, the tuned default) and
from the pretrained weights at lr 0.05 and 0.01. The pretrained lr is chosen per method on mean val accuracy over
the seeds (the test split is not looked at); the table then reports test accuracy and the per-seed paired
difference, pretrained minus scratch. Everything is cached under ``--out`` (quality.py's caching).

    python benchmarks/pretrained_init.py --out runs/pretrained-init
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _data import REPO, default_data, mean_std  # noqa: E402 - benchmarks/ is on sys.path when a script runs

REPO_ID = "local/test_resnet.digits28"
NAME = f"hf-hub:{REPO_ID}"
LRS = (0.05, 0.01)
METHODS = {"kd": "kd", "reducedmpl": "exact:mpl_weight=1"}


def pretrain(out: Path, threads: int) -> dict:
    """test_resnet on all of digits' training images at 28 px; its weights into the Hub cache at OUT/hub."""
    import torch
    from rich.console import Console

    from reducedmpl.config import DataConfig, OptimConfig, TrainLargeConfig
    from reducedmpl.hub import save_to_cache
    from reducedmpl.stages import train_large

    torch.set_num_threads(threads)
    folder = out / "pretrain"
    if not (folder / "teacher.pt").exists():
        cfg = TrainLargeConfig(data=DataConfig(source="digits", input_size=28), model="test_resnet", epochs=30,
                               optim=OptimConfig(opt="adamw", lr=3e-3), select="best", device="cpu")
        cfg.validate()
        train_large.run(cfg, folder, overwrite=True, console=Console(stderr=True), quiet=True)
    art = torch.load(folder / "teacher.pt", weights_only=True)
    prep = art["preprocess"]
    config = {"architecture": "test_resnet", "num_classes": 10,
              "pretrained_cfg": {"input_size": [1, 28, 28], "crop_pct": 1.0, "interpolation": "bilinear",
                                 "mean": prep["mean"], "std": prep["std"], "num_classes": 10, "classifier": "fc",
                                 "first_conv": "conv1.0"}}
    save_to_cache(out / "hub", REPO_ID, art["state_dict"], config)
    return art["metrics"]


def variants() -> dict[str, dict[str, str]]:
    """method -> {label: quality.py variant spec}."""
    out = {}
    for method, base in METHODS.items():
        sep = "," if ":" in base else ":"
        out[method] = {"scratch": base,
                       **{f"pretrained lr {lr:g}": f"{base}{sep}student={NAME},student_init=pretrained,"
                                                   f"student_optim.lr={lr:g}" for lr in LRS}}
    return out


def report(summary: dict, pre: dict, args, minutes: float) -> str:
    lines = ["# Pretrained student vs from scratch", "",
             f"MNIST (quality.py's protocol), {args.steps} steps, seeds {' '.join(map(str, args.seeds))}; the "
             f"pretrained test_resnet learned digits at 28 px first (digits val {100 * pre['val_acc']:.2f} %).", "",
             "| method | start | chosen on val | val acc % | test acc % | paired Δ test vs scratch (pts) |",
             "|---|---|---|---|---|---|"]
    for method, specs in variants().items():
        scratch = summary[specs["scratch"]]
        pretrained = {label: summary[spec] for label, spec in specs.items() if label != "scratch"}
        best = max(pretrained, key=lambda label: statistics.mean(pretrained[label]["val_acc"]))
        lines.append(f"| {method} | scratch (lr 0.05) | — | {mean_std(scratch['val_acc'])} | {mean_std(scratch['test_acc'])} "
                     "| — |")
        for label, r in pretrained.items():
            diff = [a - b for a, b in zip(r["test_acc"], scratch["test_acc"])]
            lines.append(f"| {method} | {label} | {'yes' if label == best else 'no'} | {mean_std(r['val_acc'])} "
                         f"| {mean_std(r['test_acc'])} | {mean_std(diff)} |")
    lines += ["", f"Command: `python benchmarks/pretrained_init.py --out {args.out}`; wall time of this invocation "
              f"{minutes:.1f} min (cached runs are not recomputed)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pretrained-init")
    p.add_argument("--data", default=default_data(fallback=None))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args, passed = p.parse_known_args()  # the rest goes to quality.py (e.g. --teacher-epochs 2 for a smoke run)
    if args.data is None:
        raise SystemExit("the MNIST folder ../shared/data/mnist-t10k is not beside the repository: pass --data")
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    pre = pretrain(out, args.threads)
    specs = [spec for per in variants().values() for spec in per.values()]
    env = {**os.environ, "HF_HUB_CACHE": str(out / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--out", str(out / "quality"), "--data",
           args.data, "--steps", str(args.steps), "--eval-every", "100", "--threads", str(args.threads),
           "--tag", "pretrained", "--seeds", *map(str, args.seeds), *passed, "--variants", *specs]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "quality" / "pretrained.json").read_text())["variants"]
    md = report(summary, pre, args, (time.perf_counter() - t0) / 60)
    (out / "pretrained_init.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
