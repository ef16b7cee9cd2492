"""Benchmark ``reducedmpl precompute`` against the teacher's bare inference, and the store it writes.

Prints ratios measured side by side in one run on this machine:

1. overhead: wall time of the whole precompute stage (data loading, splits, teacher hash, inference, HDF5
   writes, master file) over pure teacher inference - the same model, the same rows in the same batches,
   ``model(x)`` in a loop on batches made beforehand. A resnet18 teacher (random weights: speed does not depend on
   them) on the MNIST test images (``mnist:`` source, read in place), or scikit-learn digits where MNIST is
   absent. Repeated, alternating which of the two runs first, and the median ratio reported (target <= 1.05).
   Beside it: the CPU-time ratio, and precompute's time split into setup (before the first forward pass), loop
   and tail (after the last), with the loop over pure inference - the per-row overhead. On a machine shared with
   other jobs wall times swing; the script says how busy the cores were;
2. bytes per row of the store: dense float16 / float32 vs top-k, on disk for the benchmark's data; for a
   1000-class table the formula's (``target_bytes_per_row``), not a measurement;
3. reader throughput on random 256-row batches of a simulated 1,281,167 x 1000 table (the logic of
   ``benchmarks/targets_reader.py``): dense and top-k in memory (target >= 50,000 rows/s);
4. stored views: ``precompute --views 8`` against 8 x the one-view time (target <= 1.2), with and without
   RandAugment (``rand-m9-n2``), with the views rendered in this process and in 2 DataLoader workers.

    python benchmarks/precompute.py [--data mnist:DIR] [--repeats 5] [--reader-rows 1281167] [--no-reader]
    python benchmarks/precompute.py --only-views [--views 8] [--views-splits test]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from reducedmpl.config import DataConfig, PrecomputeConfig, to_dict
from reducedmpl.data.loading import Batcher, Preprocess, default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.files import save_torch
from reducedmpl.models import build_artifact, create_model, model_source
from reducedmpl.stages import precompute
from reducedmpl.data.setup import DataSetup
from reducedmpl.targets import StoreMeta, TargetStore, target_bytes_per_row

from _data import default_data  # noqa: E402 - benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
TARGET_OVERHEAD = 1.05
TARGET_VIEWS = 1.2  # precompute --views K within 1.2 x K x the one-view time


def make_teacher(folder: Path, spec: str, arch: str, seed: int) -> Path:
    """A teacher.pt artifact of ``arch`` with random weights for the data ``spec``."""
    data = DataConfig(source=spec, labeled_per_class=10)
    source = load_source(spec)
    splits = make_splits(source, data)
    prep = default_preprocess(source, splits.indices["labeled"], data)
    torch.manual_seed(seed)
    model = create_model(arch, source.num_classes, prep.in_chans, input_size=prep.input_size)
    art = build_artifact("teacher", model, model_source(arch), DataSetup(data, source, splits, prep),
                         {"data": to_dict(data)}, {})
    path = folder / "teacher.pt"
    save_torch(art, path)
    return path


def pure_inference(teacher: Path, batch_size: int) -> dict[str, float]:
    """Wall and CPU seconds of ``model(x)`` over every row precompute covers, in its batches made beforehand."""
    art = torch.load(teacher, weights_only=True)
    data = DataConfig(**art["data"])
    source = load_source(data.source)
    rows = precompute.lay_out_rows(source, make_splits(source, data), list(PrecomputeConfig().splits))
    batcher = Batcher(source, rows.ids, Preprocess.from_dict(art["preprocess"]), data, batch_size=batch_size,
                      train=False, seed=0)
    batches = [x for x, _, _ in batcher.epoch(0)]
    model = precompute.teacher_model(precompute.open_teacher(teacher)).eval()  # built as precompute builds it
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in batches:
            model(x)
    return {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu, "rows": len(rows)}


class ForwardClock:
    """Times the teacher's forward passes inside precompute (wraps the ``predict_logits`` it calls): their sum,
    the start of the first and the end of the last, which split the stage into setup, loop and tail."""

    def __init__(self):
        self.seconds, self.first, self.last = 0.0, None, None

    def __enter__(self) -> "ForwardClock":
        self._original = original = precompute.predict_logits

        def clocked_predict(model, batches, *args):
            if "forward" in vars(model):  # a call inside another (the views' passes): already clocked
                yield from original(model, batches, *args)
                return
            forward = model.forward

            def clocked(x):
                start = time.perf_counter()
                y = forward(x)
                self.last = time.perf_counter()
                self.first = start if self.first is None else self.first
                self.seconds += self.last - start
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


def run_precompute(teacher: Path, out: Path, clock: ForwardClock | None = None, data: dict | None = None,
                   **settings) -> tuple[float, float, dict]:
    """Wall and CPU seconds of the whole stage as the CLI runs it (interpreter start and imports excluded);
    ``data``: settings that replace the teacher's recorded data settings (``--set data.KEY=VALUE``)."""
    cfg = PrecomputeConfig(**settings)
    start, cpu = time.perf_counter(), time.process_time()
    if clock is not None:
        clock.start = start
    source = precompute.open_teacher(teacher)
    cfg.data = DataConfig(**{**source.recorded_data, **(data or {})})
    cfg.validate()
    result = precompute.run(cfg, source, out, overwrite=True, quiet=True)
    return time.perf_counter() - start, time.process_time() - cpu, result


def measure(what: str, teacher: Path, out: Path, batch_size: int) -> dict:
    """One measurement, ``pure`` or ``stage``, or ``views:K:RANDAUGMENT:WORKERS:SPLITS`` (precompute --views K), in
    this process."""
    if what == "pure":
        return pure_inference(teacher, batch_size)
    if what.startswith("views:"):
        _, views, randaugment, workers, splits = what.split(":")
        data = {"randaugment": None if randaugment == "none" else randaugment, "num_workers": int(workers)}
        with ForwardClock() as clock:
            wall, _, result = run_precompute(teacher, out, clock, data, batch_size=batch_size, views=int(views),
                                             splits=splits.split(","))
        return {"wall": wall, "loop": clock.last - clock.first, "forward": clock.seconds, "rows": result["rows"],
                "setup": clock.first - clock.start, "tail": clock.start + wall - clock.last}
    with ForwardClock() as clock:
        wall, cpu, result = run_precompute(teacher, out, clock, batch_size=batch_size)
    return {"wall": wall, "cpu": cpu, "setup": clock.first - clock.start, "loop": clock.last - clock.first,
            "forward": clock.seconds, "tail": clock.start + wall - clock.last,
            "bytes_per_row": result["bytes"] / result["rows"]}


def measure_in_child(what: str, teacher: Path, out: Path, batch_size: int, threads: int | None) -> dict:
    """:func:`measure` in a fresh Python process: each gets its own memory layout, which alone moves a forward
    pass by a few % (measured: the same comparison repeated in one process is stable, across processes not)."""
    cmd = [sys.executable, __file__, "--child", what, "--teacher", str(teacher), "--out", str(out),
           "--batch-size", str(batch_size)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_overhead(folder: Path, teacher: Path, batch_size: int, repeats: int, threads: int | None) -> float:
    """Median ratios over ``repeats`` rounds (pure and stage each in a fresh process); returns bytes/row."""
    out = folder / "o" / "targets.h5"
    for what in ("pure", "stage"):  # warm-up: page cache
        measure_in_child(what, teacher, out, batch_size, threads)
    keys = ("pure", "stage", "ratio", "cpu_ratio", "setup", "tail", "steady", "own")
    m: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        order = ("pure", "stage") if r % 2 == 0 else ("stage", "pure")
        got = {what: measure_in_child(what, teacher, out, batch_size, threads) for what in order}
        pure, stage = got["pure"], got["stage"]
        row = {"pure": pure["wall"], "stage": stage["wall"], "ratio": stage["wall"] / pure["wall"],
               "cpu_ratio": stage["cpu"] / pure["cpu"], "setup": stage["setup"], "tail": stage["tail"],
               "steady": stage["loop"] / pure["wall"], "own": stage["wall"] / stage["forward"]}
        for k in keys:
            m[k].append(row[k])
        print(f"  round {r + 1} ({' then '.join(order)}): pure inference {pure['wall']:.2f} s, precompute "
              f"{stage['wall']:.2f} s = setup {stage['setup']:.2f} + loop {stage['loop']:.2f} (forward "
              f"{stage['forward']:.2f}) + tail {stage['tail']:.2f} s; ratio {row['ratio']:.3f}, CPU-time ratio "
              f"{row['cpu_ratio']:.3f}, loop / pure {row['steady']:.3f}", flush=True)
    med = {k: statistics.median(v) for k, v in m.items()}
    verdict = "OK" if med["ratio"] <= TARGET_OVERHEAD else "ABOVE TARGET"
    rows = pure["rows"]
    print(f"precompute / pure inference, wall time: median {med['ratio']:.3f} (target <= {TARGET_OVERHEAD}) "
          f"{verdict}; CPU time: median {med['cpu_ratio']:.3f}; {rows:,} rows, {rows / med['stage']:,.0f} rows/s "
          f"through precompute, {rows / med['pure']:,.0f} rows/s bare")
    print(f"  of which fixed: setup (teacher and data loading, model, hashing) median {med['setup']:.2f} s, tail "
          f"(last shard, master file, fsync) {med['tail']:.2f} s; per row: the loop (batches, forward, writes) over "
          f"pure inference, median {med['steady']:.3f}; precompute wall time / its own forward passes (the same "
          f"process), median {med['own']:.3f}")
    return stage["bytes_per_row"]


def bench_views(folder: Path, teacher: Path, batch_size: int, views: int, threads: int | None, splits: str) -> None:
    """``precompute --views K`` against K times one view's time, with and without RandAugment, with 0 and 2
    workers (``data.num_workers``), each in a fresh process: whole-stage wall time, and the loop alone (first
    forward pass to last: without loading, hashing and the master file)."""
    out = folder / "v" / "targets.h5"
    one = measure_in_child(f"views:1:none:0:{splits}", teacher, out, batch_size, threads)  # warms the page cache
    one = measure_in_child(f"views:1:none:0:{splits}", teacher, out, batch_size, threads)
    print(f"precompute --splits {splits}: {one['rows']:,} rows")
    print(f"one view: {one['wall']:.1f} s (loop {one['loop']:.1f} s, forward passes {one['forward']:.1f} s); "
          f"target for K = {views}: <= {TARGET_VIEWS} x {views} x one view")
    for randaugment in ("none", "rand-m9-n2"):
        for workers in (0, 2):
            got = measure_in_child(f"views:{views}:{randaugment}:{workers}:{splits}", teacher, out, batch_size,
                                   threads)
            ratio, loop = got["wall"] / (views * one["wall"]), got["loop"] / (views * one["loop"])
            print(f"  K = {views}, {'crops and flips' if randaugment == 'none' else randaugment + ', crops, flips':<28}"
                  f"{workers} workers: {got['wall']:6.1f} s = {ratio:.3f} x {views} x one view (loop {loop:.3f}; "
                  f"forward passes {got['forward']:.1f} s; setup {got['setup']:.1f} s, tail {got['tail']:.1f} s) "
                  f"{'OK' if ratio <= TARGET_VIEWS else 'ABOVE TARGET'}; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)


def bench_bytes(folder: Path, teacher: Path, batch_size: int, classes: int, dense16: float) -> None:
    sizes = {"dense float16": dense16}
    for label, settings in [("dense float32", {"dtype": "float32"}), ("top-3 float16", {"topk": 3})]:
        _, _, result = run_precompute(teacher, folder / label.replace(" ", "-") / "targets.h5",
                                      batch_size=batch_size, **settings)
        sizes[label] = result["bytes"] / result["rows"]
    print(f"bytes/row on disk, this data ({classes} classes, id/label/split and HDF5 overhead included): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    k, c = 10, 1000
    meta = StoreMeta("arch", "", [str(i) for i in range(c)], "", 0, {})
    dense16, dense32, topk16 = (target_bytes_per_row(dataclasses.replace(meta, **m))
                                for m in ({}, {"dtype": "float32"}, {"topk": k}))
    print(f"bytes/row of the targets at {c} classes, computed by target_bytes_per_row (the formula, not a "
          f"measurement; benchmarks/store_size.py measures stores on disk): dense float16 {dense16}, dense float32 "
          f"{dense32}, top-{k} float16 {topk16} (float16 logits, int16 index, float32 logsumexp): top-{k} is "
          f"{dense16 / topk16:.0f}x smaller than dense float16, {dense32 / topk16:.0f}x smaller than float32")


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


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # total, idle + iowait


def _load() -> str:
    """How busy the machine is with other work (sampled for a second while this script idles)."""
    cores = os.cpu_count() or 1
    try:
        total0, idle0 = _cpu_times()
        time.sleep(1.0)
        total1, idle1 = _cpu_times()
        busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
    except (OSError, ValueError, IndexError):
        return f"load average {os.getloadavg()[0]:.1f} on {cores} cores"
    note = "" if busy < 0.15 else (" - BUSY: other processes compete for the cores, so wall times swing; compare the "
                                   "CPU-time ratio and the loop / pure ratio, or rerun with --threads 1")
    return f"other processes used {100 * busy:.0f}% of the {cores} cores" + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default_data())
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reader-rows", type=int, default=1_281_167)
    parser.add_argument("--reader-classes", type=int, default=1000)
    parser.add_argument("--reader-batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-reader", action="store_true", help="skip the reader benchmark")
    parser.add_argument("--views", type=int, default=8, help="K of the views benchmark (0: skip it)")
    parser.add_argument("--only-views", action="store_true", help="run only the views benchmark")
    parser.add_argument("--views-splits", default="labeled,unlabeled,val,test",
                        help="the splits the views benchmark covers (fewer rows: a shorter run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one measurement, for the parent
        print(json.dumps(measure(args.child, args.teacher, args.out, args.batch_size)))
        return

    folder = Path(tempfile.mkdtemp(prefix="precompute-bench-"))
    try:
        t0 = time.perf_counter()
        teacher = make_teacher(folder, args.data, args.model, 0)
        classes = torch.load(teacher, weights_only=True)["num_classes"]
        print(f"teacher {args.model} (random weights) on {args.data}; batch size {args.batch_size}; "
              f"{torch.get_num_threads()} torch threads; {args.repeats} rounds; {_load()}")
        if args.views > 1:
            bench_views(folder, teacher, args.batch_size, args.views, args.threads, args.views_splits)
        if args.only_views:
            return
        dense16 = bench_overhead(folder, teacher, args.batch_size, args.repeats, args.threads)
        bench_bytes(folder, teacher, args.batch_size, classes, dense16)
        if not args.no_reader:
            bench_reader(folder / "reader", args.reader_rows, args.reader_classes, args.reader_batches)
        print(f"total {time.perf_counter() - t0:.0f} s; {_load()}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
