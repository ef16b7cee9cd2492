"""Benchmark the targets-store reader on a simulated ImageNet-sized teacher table.

Writes a dense float16 store and a top-k (K=10) store of ``--rows`` x ``--classes`` random logits
into a temporary folder, then times ``TargetStore.log_probs`` on random 256-row batches for:
dense in memory, top-k in memory, and dense out of core (memory budget 0). Prints rows/s and the
ratio to a 50,000 rows/s target, and bytes per row of both layouts.

Note: the out-of-core numbers are for a freshly written file, so reads mostly hit the OS page
cache; a cold disk is slower.

    python benchmarks/targets_reader.py [--rows 1281167] [--classes 1000] [--batches 200]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from reducedmpl.targets import ShardWriter, StoreMeta, TargetStore, plan_shards, shard_paths, write_master

TARGET_ROWS_PER_S = 50_000


def write_stores(folder: Path, rows: int, classes: int, topk: int, shards: int, seed: int) -> tuple[Path, Path]:
    """Write a dense and a top-k store of the same random logits; return both master paths."""
    rng = np.random.default_rng(seed)
    metas = {
        "dense": StoreMeta("sim", "0" * 64, [f"c{i}" for i in range(classes)], "simulated", seed,
                           {"unlabeled": "sim"}, dtype="float16", topk=0, run_key="bench-dense"),
        "topk": StoreMeta("sim", "0" * 64, [f"c{i}" for i in range(classes)], "simulated", seed,
                          {"unlabeled": "sim"}, dtype="float16", topk=topk, run_key="bench-topk"),
    }
    masters = {}
    for kind, meta in metas.items():
        (folder / kind).mkdir()
        masters[kind] = folder / kind / "targets.h5"
    block = 32768
    for index, (start, stop) in enumerate(plan_shards(rows, shards)):
        writers = [ShardWriter(shard_paths(masters[k], shards)[index], metas[k], stop - start, index, shards, start)
                   for k in metas]
        for a in range(start, stop, block):
            b = min(stop, a + block)
            logits = rng.standard_normal((b - a, classes), dtype=np.float32) * 2.0
            logits[np.arange(b - a), rng.integers(0, classes, b - a)] += 8.0  # a confident peak
            ids = np.arange(a, b)
            for w in writers:
                w.append(ids, rng.integers(0, classes, b - a), np.ones(b - a, np.uint8), logits)
        for w in writers:
            w.close()
    for kind, meta in metas.items():
        write_master(masters[kind], shard_paths(masters[kind], shards), meta)
    return masters["dense"], masters["topk"]


def bench(store: TargetStore, batches: int, batch: int, seed: int) -> float:
    """Rows per second of ``log_probs`` on random batches."""
    rng = np.random.default_rng(seed)
    store.log_probs(rng.choice(store.ids, batch, replace=False))  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        store.log_probs(rng.choice(store.num_rows, batch, replace=False))
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="targets-bench-"))
    try:
        print(f"table: {args.rows:,} rows x {args.classes} classes, float16, {args.shards} shards, in {folder}")
        t0 = time.perf_counter()
        dense_path, topk_path = write_stores(folder, args.rows, args.classes, args.topk, args.shards, args.seed)
        print(f"wrote both stores in {time.perf_counter() - t0:.1f} s")
        dense_bytes = sum(p.stat().st_size for p in dense_path.parent.iterdir())
        topk_bytes = sum(p.stat().st_size for p in topk_path.parent.iterdir())
        index_bytes = 2 if args.classes < 32768 else 4
        print(f"bytes/row of logits table: dense {args.classes * 2}, top-{args.topk} "
              f"{args.topk * (2 + index_bytes) + 4} "
              f"(float16 logits, int16 index, float32 logsumexp)")
        print(f"bytes/row on disk: dense {dense_bytes / args.rows:.1f}, top-{args.topk} {topk_bytes / args.rows:.1f}")

        cases = [("dense, in memory", dense_path, 2**40), (f"top-{args.topk}, in memory", topk_path, 2**40),
                 ("dense, out of core", dense_path, 0)]
        for label, path, budget in cases:
            t0 = time.perf_counter()
            store = TargetStore.open(path, memory_budget_bytes=budget)
            opened = time.perf_counter() - t0
            rate = bench(store, args.batches, args.batch, args.seed)
            per_row = store.nbytes / store.num_rows
            extra = (f", {store.read_calls} HDF5 reads, {store.blocks_read} blocks"
                     if not store.in_memory else "")
            print(f"{label:22s} open {opened:6.2f} s, {per_row:7.1f} B/row in RAM, {rate:10,.0f} rows/s "
                  f"= {rate / TARGET_ROWS_PER_S:5.2f} x target{extra}")
            store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
