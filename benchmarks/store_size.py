"""Bytes per row of a targets store with K views, measured on files written by the real writer.

For K = 1, 8, 32 views and 10 / 1,000 classes (dense float16, and top-10 for 1,000 classes) it writes a store
of random logits (one shard plus the master; about ``--mb`` MB of targets, at most 100,000 rows, so that
chunk rounding and file metadata are small), and prints the bytes on disk per row beside the formula of
``reducedmpl.targets.target_bytes_per_row`` (the teacher's targets only; the rest is the compressed
id/label/split columns and HDF5's own metadata).

    python benchmarks/store_size.py              # about 64 MB per store
    python benchmarks/store_size.py --mb 16
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from reducedmpl.targets import ShardWriter, StoreMeta, target_bytes_per_row, write_master


def _meta(classes: int, views: int, topk: int) -> StoreMeta:
    policy = {"views": views, "seed": 0, "input_size": 32, "crop_padding": 2, "hflip": True, "randaugment": None,
              "kind": "array", "rebuild": 1} if views > 1 else {}
    return StoreMeta(teacher_arch="resnet50", teacher_sha256="0" * 64, class_names=[str(i) for i in range(classes)],
                     data_spec="synthetic", split_seed=0, fingerprints={"labeled": "x"}, topk=topk, views=views,
                     view_policy=policy, run_key=f"size-{classes}-{views}-{topk}")


def measure(folder: Path, rows: int, classes: int, views: int, topk: int) -> int:
    """Bytes on disk of a store of ``rows`` rows of random logits (master plus one shard)."""
    meta = _meta(classes, views, topk)
    rng = np.random.default_rng(0)
    master, shard = folder / "targets.h5", folder / "targets-00000-of-00001.h5"
    with ShardWriter(shard, meta, rows, 0, 1, 0) as writer:
        for start in range(0, rows, 500):
            n = min(500, rows - start)
            extra = (rng.standard_normal((n, views - 1, classes), dtype=np.float32),) if views > 1 else ()
            writer.append(np.arange(start, start + n), rng.integers(0, classes, n), np.zeros(n, np.uint8),
                          rng.standard_normal((n, classes), dtype=np.float32), *extra)
    write_master(master, [shard], meta)
    return sum(p.stat().st_size for p in (master, shard))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=64, help="targets per store, in MB (sets the row count)")
    args = p.parse_args()
    print(f"{'layout':<28}{'views':>6}{'rows':>9}{'bytes/row on disk':>19}{'target bytes/row':>18}{'x K=1':>8}")
    for classes, topk in ((10, 0), (1000, 0), (1000, 10)):
        base = None
        for views in (1, 8, 32):
            formula = target_bytes_per_row(_meta(classes, views, topk))
            rows = int(min(100_000, max(1000, args.mb * 2**20 // formula)))
            with tempfile.TemporaryDirectory() as tmp:
                on_disk = measure(Path(tmp), rows, classes, views, topk)
            per_row = on_disk / rows
            base = base or per_row
            layout = f"{classes} classes, " + (f"top-{topk}" if topk else "dense") + " float16"
            print(f"{layout:<28}{views:>6}{rows:>9,}{per_row:>19,.1f}{formula:>18,}{per_row / base:>8.2f}")


if __name__ == "__main__":
    main()
