"""Benchmark ``reducedmpl precompute`` against the teacher's bare inference, and the store it writes.

Prints ratios measured side by side in one run on this machine:

1. overhead: wall time of the whole precompute stage (data loading, splits, teacher hash, inference, HDF5
   writes, master file) over pure teacher inference - the same model, the same rows in the same batches,
   ``model(x)`` in a loop on batches made beforehand. A resnet18 teacher (random weights: speed does not depend on
   them) on the MNIST test images (``mnist:`` source, read in place), or scikit-learn digits where MNIST is
   absent. Repeated, alternating which of the two runs first, and the median ratio reported (target <= 1.05).
   On a machine shared with other jobs wall times swing, so the CPU-time ratio and the ratio of precompute's
   wall time to its own forward passes (same run, same conditions) are printed beside it;
2. bytes per row of the store: dense float16 / float32 vs top-k, on disk for the benchmark's data and for a
   1000-class table;
3. reader throughput on random 256-row batches of a simulated 1,281,167 x 1000 table (the logic of
   ``benchmarks/targets_reader.py``): dense and top-k in memory (target >= 50,000 rows/s).

    python benchmarks/precompute.py [--data mnist:DIR] [--repeats 5] [--reader-rows 1281167] [--no-reader]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reducedmpl.config import DataConfig, PrecomputeConfig, to_dict
from reducedmpl.data.loading import Batcher, Preprocess, default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.models import atomic_save, create_model, model_from_artifact
from reducedmpl.stages import precompute
from reducedmpl.stages.train_large import DataSetup, build_artifact
from reducedmpl.targets import TargetStore

HERE = Path(__file__).resolve().parent
MNIST = HERE.parent.parent / "shared" / "data" / "mnist-t10k"
TARGET_OVERHEAD = 1.05


def make_teacher(folder: Path, spec: str, arch: str, seed: int) -> Path:
    """A teacher.pt artifact of ``arch`` with random weights for the data ``spec``."""
    data = DataConfig(source=spec, labeled_per_class=10)
    source = load_source(spec)
    splits = make_splits(source, data)
    prep = default_preprocess(source, splits.indices["labeled"], data)
    torch.manual_seed(seed)
    model = create_model(arch, source.num_classes, prep.in_chans, input_size=prep.input_size)
    art = build_artifact("teacher", model, arch, DataSetup(source, splits, prep), {"data": to_dict(data)}, {})
    path = folder / "teacher.pt"
    atomic_save(art, path)
    return path


def pure_inference(teacher: Path, batch_size: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of ``model(x)`` over every row precompute covers, in its batches made beforehand."""
    art = torch.load(teacher, weights_only=True)
    data = DataConfig(**art["data"])
    source = load_source(data.source)
    rows = precompute.lay_out_rows(source, make_splits(source, data), list(PrecomputeConfig().splits))
    batcher = Batcher(source, rows.ids, Preprocess.from_dict(art["preprocess"]), data, batch_size=batch_size,
                      train=False, seed=0)
    batches = [x for x, _, _ in batcher.epoch(0)]
    model = model_from_artifact(art).eval()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - start, time.process_time() - cpu, len(rows)


class ForwardClock:
    """Adds up the wall time of the teacher's forward passes inside precompute (wraps its ``predict_logits``)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self) -> "ForwardClock":
        self._original = original = precompute.predict_logits

        def clocked_predict(model, batches, *args):
            forward = model.forward

            def clocked(x):
                start = time.perf_counter()
                y = forward(x)
                self.seconds += time.perf_counter() - start
                return y

            model.forward = clocked
            try:
                yield from original(model, batches, *args)
            finally:
                del model.forward

        precompute.predict_logits = clocked_predict
        return self

    def __exit__(self, *exc) -> None:
        precompute.predict_logits = self._original


def run_precompute(teacher: Path, out: Path, **settings) -> tuple[float, float, dict]:
    """Wall and CPU seconds of the whole stage as the CLI runs it (interpreter start and imports excluded)."""
    cfg = PrecomputeConfig(**settings)
    start, cpu = time.perf_counter(), time.process_time()
    source = precompute.open_teacher(teacher)
    cfg.data = DataConfig(**source.recorded_data)
    cfg.validate()
    result = precompute.run(cfg, source, out, overwrite=True, quiet=True)
    return time.perf_counter() - start, time.process_time() - cpu, result


def bench_overhead(folder: Path, teacher: Path, batch_size: int, repeats: int) -> dict[str, float]:
    """Median ratios; returns the bytes per row of the stores it wrote (dense float16 and float32)."""
    pure_inference(teacher, batch_size)  # warm-up: page cache, allocator, oneDNN kernels
    _, _, warm = run_precompute(teacher, folder / "warm" / "targets.h5", batch_size=batch_size, dtype="float32")
    ratios, cpu_ratios, inside, pures, stages = [], [], [], [], []
    for r in range(repeats):
        order = ("pure", "stage") if r % 2 == 0 else ("stage", "pure")
        wall, cpu = {}, {}
        for what in order:
            if what == "pure":
                wall["pure"], cpu["pure"], rows = pure_inference(teacher, batch_size)
            else:
                with ForwardClock() as clock:
                    wall["stage"], cpu["stage"], result = run_precompute(teacher, folder / "o" / "targets.h5",
                                                                         batch_size=batch_size)
        pures.append(wall["pure"])
        stages.append(wall["stage"])
        ratios.append(wall["stage"] / wall["pure"])
        cpu_ratios.append(cpu["stage"] / cpu["pure"])
        inside.append(wall["stage"] / clock.seconds)
        print(f"  round {r + 1} ({' then '.join(order)}): pure inference {wall['pure']:.2f} s, "
              f"precompute {wall['stage']:.2f} s (forward {clock.seconds:.2f} s of it); wall ratio {ratios[-1]:.3f}, "
              f"CPU-time ratio {cpu_ratios[-1]:.3f}, precompute / its own forward {inside[-1]:.3f}")
    ratio = statistics.median(ratios)
    verdict = "OK" if ratio <= TARGET_OVERHEAD else "ABOVE TARGET"
    print(f"precompute / pure inference wall time: median {ratio:.3f} (target <= {TARGET_OVERHEAD}) {verdict}; "
          f"CPU time: median {statistics.median(cpu_ratios):.3f}; precompute / its own forward passes: median "
          f"{statistics.median(inside):.3f}; {rows:,} rows, median "
          f"{rows / statistics.median(stages):,.0f} rows/s through precompute, "
          f"{rows / statistics.median(pures):,.0f} rows/s bare")
    return {"dense float16": result["bytes"] / result["rows"], "dense float32": warm["bytes"] / warm["rows"]}


def bench_bytes(folder: Path, teacher: Path, batch_size: int, classes: int, sizes: dict[str, float]) -> None:
    _, _, result = run_precompute(teacher, folder / "topk" / "targets.h5", batch_size=batch_size, topk=3)
    sizes = {**sizes, "top-3 float16": result["bytes"] / result["rows"]}
    print(f"bytes/row on disk, this data ({classes} classes, id/label/split and HDF5 overhead included): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    k, c = 10, 1000
    dense16, dense32, topk16 = 2 * c, 4 * c, k * (2 + 2) + 4
    print(f"bytes/row of the logits table at {c} classes: dense float16 {dense16}, dense float32 {dense32}, "
          f"top-{k} float16 {topk16} (int16 index, float32 logsumexp): top-{k} is {dense16 / topk16:.0f}x smaller "
          f"than dense float16, {dense32 / topk16:.0f}x smaller than float32")


def bench_reader(folder: Path, rows: int, classes: int, batches: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.spec_from_file_location("targets_reader", HERE / "targets_reader.py")
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    start = time.perf_counter()
    dense, topk = reader.write_stores(folder, rows, classes, 10, 4, 0)
    print(f"reader: simulated {rows:,} x {classes} float16 table written (dense and top-10) in "
          f"{time.perf_counter() - start:.0f} s")
    for label, path in [("dense float16", dense), ("top-10 float16", topk)]:
        on_disk = sum(p.stat().st_size for p in path.parent.iterdir()) / rows
        with TargetStore.open(path, memory_budget_bytes=2**40) as store:
            rate = reader.bench(store, batches, 256, 0)
            print(f"  {label:15s} in memory: {rate:10,.0f} rows/s = {rate / reader.TARGET_ROWS_PER_S:5.2f} x target "
                  f"(>= {reader.TARGET_ROWS_PER_S:,}); {store.nbytes / rows:.1f} B/row in RAM, {on_disk:.1f} on disk")


def _load() -> str:
    """The load average against the core count: other processes make wall times (and ratios) noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    note = "" if load < 0.5 * cores else (" - BUSY: other processes compete for the cores, wall-time ratios are "
                                          "noisy; compare CPU time, the in-run ratio, or rerun with --threads 1")
    return f"load average {load:.1f} on {cores} cores{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=f"mnist:{MNIST}" if MNIST.is_dir() else "digits")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reader-rows", type=int, default=1_281_167)
    parser.add_argument("--reader-classes", type=int, default=1000)
    parser.add_argument("--reader-batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-reader", action="store_true", help="skip the reader benchmark")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="precompute-bench-"))
    try:
        t0 = time.perf_counter()
        teacher = make_teacher(folder, args.data, args.model, 0)
        classes = torch.load(teacher, weights_only=True)["num_classes"]
        print(f"teacher {args.model} (random weights) on {args.data}; batch size {args.batch_size}; "
              f"{torch.get_num_threads()} torch threads; {args.repeats} rounds; {_load()}")
        sizes = bench_overhead(folder, teacher, args.batch_size, args.repeats)
        bench_bytes(folder, teacher, args.batch_size, classes, sizes)
        if not args.no_reader:
            bench_reader(folder / "reader", args.reader_rows, args.reader_classes, args.reader_batches)
        print(f"total {time.perf_counter() - t0:.0f} s; {_load()}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
