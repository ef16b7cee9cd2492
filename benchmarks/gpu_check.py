"""End-to-end check of the CUDA paths, on digits and a small generated image folder.

Runs the real CLI in child processes on the GPU and prints one line per check (PASS, FAIL with the last line of
its error, or SKIP with the reason), then a summary:

- train-large on digits with AMP, channels-last and ``torch.compile``;
- precompute of that teacher on the GPU, then distill (ReducedMPL, AMP, channels-last) from its store;
- an image folder through the DataLoader: batches come in pinned memory; train-large with 2 workers and
  precompute of that teacher;
- train-large under ``torchrun`` with 1 process, and with 2 processes (nccl; needs 2 GPUs, as nccl puts one rank
  on each GPU);
- with ``--teacher NAME --student NAME``: a pretrained teacher at 224 px fine-tuned on the folder, its 4-view store,
  and a pretrained student at 160 px distilled from the views (AMP). The weights come from the Hugging Face Hub
  cache; ``--random-weights`` first writes random weights for the two names into a temporary cache (a machine
  without the real ones checks the same paths).

On a machine without CUDA it says that it needs a GPU and exits 0 (nothing to check). Exit code 1 when a check
failed.

    python benchmarks/gpu_check.py [--keep DIR] [--teacher convnext_tiny.in12k_ft_in1k --student resnet18.a1_in1k
                                   [--random-weights]]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TIMEOUT_S = 600


def cli(*args: object, nproc: int = 0) -> subprocess.CompletedProcess:
    """``python -m reducedmpl ARGS`` (or under ``torchrun --nproc_per_node NPROC``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "reducedmpl"] if nproc else [sys.executable, "-m", "reducedmpl"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def write_folder(root: Path, classes: int = 4, per_class: int = 60, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 150, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += 100
            path = root / f"class{c}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


class Checks:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, str]] = []

    def run(self, name: str, fn, *, needs: tuple[str, ...] = ()) -> bool:
        failed_needs = [n for n in needs if not self.passed(n)]
        if failed_needs:
            self.rows.append((name, "SKIP", 0.0, f"needs {', '.join(failed_needs)}"))
            print(f"SKIP  {name}: needs {', '.join(failed_needs)}", flush=True)
            return False
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            status = "PASS"
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the other checks
            status, detail = "FAIL", (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        seconds = time.perf_counter() - t0
        self.rows.append((name, status, seconds, detail))
        print(f"{status}  {name} ({seconds:.1f} s){': ' + detail if detail else ''}", flush=True)
        return status == "PASS"

    def skip(self, name: str, why: str) -> None:
        self.rows.append((name, "SKIP", 0.0, why))
        print(f"SKIP  {name}: {why}", flush=True)

    def passed(self, name: str) -> bool:
        return any(r[0] == name and r[1] == "PASS" for r in self.rows)


def expect(r: subprocess.CompletedProcess, *paths: Path) -> None:
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {(r.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}")


def pinned_batches(folder: Path) -> str:
    from reducedmpl.config import DataConfig
    from reducedmpl.data.loading import Batcher, default_preprocess
    from reducedmpl.data.sources import load_source

    source = load_source(f"folder:{folder}")
    cfg = DataConfig(source=f"folder:{folder}", num_workers=2, input_size=32)
    rows = np.arange(len(source))
    batcher = Batcher(source, rows, default_preprocess(source, rows, cfg), cfg, batch_size=32, train=True, seed=0)
    batches = list(batcher.epoch(0))
    if not all(x.is_pinned() for x, _, _ in batches):
        raise RuntimeError("folder batches are not in pinned memory")
    x = batches[0][0].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    return f"{len(batches)} pinned batches, copied to {x.device}"


def random_weights(names: list[str], cache: Path) -> None:
    """Random weights for timm ``NAME.TAG`` names, in a Hub cache at ``cache`` (used instead of the real cache)."""
    import timm

    from reducedmpl.hub import save_to_cache, split_name

    for name in names:
        arch = split_name(name)[0]
        save_to_cache(cache, timm.models.get_pretrained_cfg(name).hf_hub_id, timm.create_model(arch).state_dict())
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")


def pretrained_checks(c: Checks, args, work: Path, folder: Path) -> None:
    """A pretrained teacher at 224 px into a pretrained student at 160 px, through 4 stored views, on the GPU."""
    if args.random_weights:
        random_weights([args.teacher, args.student], work / "hub")
    t, store, s = work / "pretrained-teacher", work / "pretrained-targets" / "targets.h5", work / "pretrained-student"
    name = f"train-large {args.teacher} pretrained at 224 px (AMP)"
    c.run(name, lambda: expect(cli("train-large", "--data", f"folder:{folder}", "--model", args.teacher, "--init",
                                   "pretrained", "--device", "cuda", "--epochs", "1", "--quiet", "--set",
                                   "train_large.input_size=224", "--set", "data.num_workers=2", "--out", t),
                               t / "teacher.pt"))
    c.run("precompute 4 views at 224 px", lambda: expect(
        cli("precompute", "--teacher", t / "teacher.pt", "--out", store, "--device", "cuda", "--views", "4",
            "--quiet"), store), needs=(name,))
    c.run(f"distill {args.student} pretrained at 160 px from the views (AMP)", lambda: expect(
        cli("distill", "--targets", store, "--student", args.student, "--student-init", "pretrained",
            "--input-size", "160", "--steps", "20", "--device", "cuda", "--quiet", "--out", s), s / "student.pt"),
        needs=("precompute 4 views at 224 px",))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: temporary)")
    ap.add_argument("--teacher", default=None, help="a pretrained timm teacher (NAME.TAG or hf-hub:ORG/NAME)")
    ap.add_argument("--student", default=None, help="a pretrained timm student")
    ap.add_argument("--random-weights", action="store_true", help="random weights for both in a temporary cache")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU, and there is none here: nothing was checked")
        return 0
    gpus = torch.cuda.device_count()
    print(f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="reducedmpl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    c = Checks()
    digits = ["--data", "digits", "--model", "resnet18", "--device", "cuda", "--quiet",
              "--set", "data.labeled_per_class=20", "--set", "data.input_size=32"]
    try:
        t = work / "digits-teacher"
        c.run("train-large digits (AMP, channels-last, torch.compile)", lambda: expect(
            cli("train-large", *digits, "--epochs", "2", "--out", t, "--set", "train_large.amp=true",
                "--set", "train_large.channels_last=true", "--set", "train_large.compile=true"), t / "teacher.pt"))
        store = work / "digits-targets" / "targets.h5"
        c.run("precompute digits on the GPU", lambda: expect(
            cli("precompute", "--teacher", t / "teacher.pt", "--out", store, "--device", "cuda", "--quiet"), store),
            needs=("train-large digits (AMP, channels-last, torch.compile)",))
        s = work / "digits-student"
        c.run("distill digits (reducedmpl, AMP, channels-last)", lambda: expect(
            cli("distill", "--targets", store, "--student", "resnet18", "--steps", "30", "--device", "cuda",
                "--quiet", "--set", "distill.amp=true", "--set", "distill.channels_last=true", "--out", s),
            s / "student.pt"), needs=("precompute digits on the GPU",))

        folder = write_folder(work / "images")
        c.run("folder batches in pinned memory (2 workers)", lambda: pinned_batches(folder))
        ft = work / "folder-teacher"
        c.run("train-large on a folder (2 workers, pinned memory)", lambda: expect(
            cli("train-large", "--data", f"folder:{folder}", "--model", "resnet18", "--device", "cuda",
                "--epochs", "2", "--quiet", "--set", "data.num_workers=2", "--set", "data.input_size=32",
                "--set", "data.randaugment=rand-m9-n2", "--out", ft), ft / "teacher.pt"))
        fstore = work / "folder-targets" / "targets.h5"
        c.run("precompute a folder on the GPU (2 workers)", lambda: expect(
            cli("precompute", "--teacher", ft / "teacher.pt", "--out", fstore, "--device", "cuda", "--quiet",
                "--set", "data.num_workers=2"), fstore), needs=("train-large on a folder (2 workers, pinned memory)",))

        if args.teacher and args.student:
            pretrained_checks(c, args, work, folder)

        for nproc in (1, 2):
            name = f"torchrun train-large, {nproc} process(es), nccl"
            if nproc > gpus:
                c.skip(name, f"needs {nproc} GPUs (nccl puts one rank on each GPU); this machine has {gpus}")
                continue
            out = work / f"torchrun-{nproc}"
            c.run(name, lambda out=out, nproc=nproc: expect(
                cli("train-large", *digits, "--epochs", "1", "--out", out, nproc=nproc), out / "teacher.pt"))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(r[1] == s for r in c.rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
