"""Throughput of ``precompute`` and ``distill`` with 1 process and with N processes under ``torchrun``.

Every measurement is a real command line, run side by side in one invocation of this script, alternating the
order, and the median ratio printed:

* precompute: rows per second of teacher inference + HDF5 writing (``seconds`` of the stage's own summary, so the
  start of the Python processes is not counted), a resnet18 teacher with random weights over the MNIST test
  images (scikit-learn digits where MNIST is absent), ``--shards`` a multiple of N;
* distill: training steps per second of ReducedMPL (exact teacher gradient) and of kd (the student under DDP
  alone, no reduced teacher), from ``train_seconds`` of the run's ``result.json``, the same global batch for 1
  and N processes (so N processes each get 1/N of it).

The cores are shared fairly: 1 process uses all ``--threads`` torch threads, each of the N processes
``threads / N``. On a machine with as many cores as threads and no accelerator this measures what
DistributedDataParallel and the sharded precompute *cost* (communication, duplicated data loading), not a
speed-up: the N processes share the same cores. With one GPU per process the same commands scale the
compute with N.

    python benchmarks/scaling.py [--nproc 2] [--threads 2] [--repeats 3] [--data mnist:DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _data import default_data  # noqa: E402 - benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "reducedmpl", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "reducedmpl", *args]


def launch(nproc: int, threads: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc))}
    r = subprocess.run(command(nproc, args), env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"benchmark command failed ({' '.join(args[:1])}, {nproc} processes):\n{r.stderr[-2000:]}")
    return r


def precompute_rate(nproc: int, threads: int, teacher: Path, folder: Path, shards: int) -> float:
    out = folder / f"targets-{nproc}-{time.monotonic_ns()}.h5"
    r = launch(nproc, threads, ["precompute", "--teacher", str(teacher), "--out", str(out), "--shards",
                                str(shards), "--batch-size", "256", "--quiet"])
    # the stage's own seconds (data, teacher, inference, shards, master), not the interpreter start and imports
    found = re.search(r"shards computed in ([0-9.]+) s", r.stdout)
    if not found:
        sys.exit(f"unexpected precompute output: {r.stdout[-500:]}")
    from reducedmpl.targets import TargetStore

    with TargetStore.open(out) as store:
        rows = store.num_rows
    for p in out.parent.glob(f"{out.stem}*"):
        p.unlink()
    return rows / float(found.group(1))


def distill_rate(nproc: int, threads: int, targets: Path, folder: Path, steps: int, student: str,
                 mode: str) -> float:
    out = folder / f"distill-{nproc}-{time.monotonic_ns()}"
    launch(nproc, threads, ["distill", "--targets", str(targets), "--student", student, "--steps", str(steps),
                            "--mode", mode,
                            "--out", str(out), "--quiet", "--set", f"distill.eval_every={10 * steps}",
                            "--set", f"distill.log_every={steps}", "--set", "distill.batch_size=32",
                            "--set", "distill.unlabeled_batch_size=128", "--set", "distill.probe_size=0"])
    result = json.loads((out / "result.json").read_text())
    shutil.rmtree(out)
    return steps / result["train_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=default_data())
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--modes", default="reducedmpl,kd", help="distill modes to measure (kd: DDP alone)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sys.path.insert(0, str(HERE))
        from precompute import make_teacher  # benchmarks/precompute.py: a random-weight teacher.pt

        teacher = make_teacher(folder, args.data, args.teacher, seed=0)
        targets = folder / "targets.h5"
        launch(1, args.threads, ["precompute", "--teacher", str(teacher), "--out", str(targets), "--quiet"])
        print(f"data {args.data}; teacher {args.teacher}; student {args.student}; {args.threads} torch threads "
              f"shared by the processes; {os.cpu_count()} cores; {args.repeats} repeats, order alternating")
        jobs = [("precompute rows/s", lambda n: precompute_rate(n, args.threads, teacher, folder, 2 * args.nproc))]
        for mode in args.modes.split(","):
            jobs.append((f"distill {mode} steps/s",
                         lambda n, mode=mode: distill_rate(n, args.threads, targets, folder, args.steps, args.student,
                                                           mode)))
        for name, measure in jobs:
            one, many = [], []
            for r in range(args.repeats):
                for n in ((1, args.nproc) if r % 2 == 0 else (args.nproc, 1)):
                    (one if n == 1 else many).append(measure(n))
            ratios = [m / o for m, o in zip(many, one)]
            print(f"{name:26s} 1 process {statistics.median(one):9.1f}   {args.nproc} processes "
                  f"{statistics.median(many):9.1f}   ratio {args.nproc}/1: median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
