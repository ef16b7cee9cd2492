"""Benchmark image-folder loading: reducedmpl's Batcher against torchvision's ImageFolder + DataLoader.

Writes ``--n`` JPEGs of ``--size`` x ``--size`` pixels (10 class folders, smooth random images with noise) into a
temporary folder, then times one shuffled training epoch of each loader for every worker count in ``--workers``:
the same timm training transform (``create_transform(is_training=True)``: random resized crop to
``--input-size``, horizontal flip, ImageNet normalisation; ``--randaugment rand-m9-n2`` adds RandAugment), the
same batch size and the same number of worker processes. Worker start-up is part of the time, as it is for a
real epoch; each figure is the best of ``--repeats`` epochs (the first also pays for imports). Prints images/s of both and their ratio (target: at least 0.9x at every count), plus the load
average, since the machine's other work shows in the figures.

    python benchmarks/data_loading.py [--n 5000] [--size 256] [--workers 0 1 2] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reducedmpl.config import DataConfig
from reducedmpl.data.loading import Batcher, default_preprocess
from reducedmpl.data.sources import load_source

TARGET_RATIO = 0.9


def write_jpegs(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` JPEGs (quality 90) in ``root/cNN/``: a smooth random colour field plus noise, like a photo's detail."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        c = i % classes
        a, b, phase = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(a * xx * 6.28 + phase), np.cos(b * yy * 6.28 + phase), np.sin((xx + yy) * a)], -1)
        pixels = (base * 80 + 128 + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def ours(root: Path, workers: int, batch_size: int, input_size: int, randaugment: str | None) -> float:
    """Images/s of one training epoch through reducedmpl's Batcher."""
    source = load_source(f"folder:{root}")
    cfg = DataConfig(source=f"folder:{root}", num_workers=workers, input_size=input_size, hflip=True,
                     randaugment=randaugment)
    rows = np.arange(len(source))
    t0 = time.perf_counter()
    batcher = Batcher(source, rows, default_preprocess(source, rows, cfg), cfg, batch_size=batch_size, train=True,
                      seed=0)
    seen = sum(len(y) for _, y, _ in batcher.epoch(0))
    seconds = time.perf_counter() - t0
    del batcher
    assert seen == len(rows)
    return seen / seconds


def torchvision_loader(root: Path, workers: int, batch_size: int, input_size: int, randaugment: str | None) -> float:
    """Images/s of one training epoch through torchvision's ImageFolder and a plain DataLoader."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    aa = None
    if randaugment:
        from reducedmpl.config import parse_randaugment

        m, n = parse_randaugment(randaugment)
        aa = f"rand-m{m}-n{n}"
    transform = create_transform(input_size, is_training=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                 auto_augment=aa, hflip=0.5, interpolation="bilinear")
    t0 = time.perf_counter()
    dataset = ImageFolder(str(root), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())
    seen = sum(len(y) for _, y in loader)
    seconds = time.perf_counter() - t0
    assert seen == len(dataset)
    return seen / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="JPEGs to write (default 5000)")
    ap.add_argument("--size", type=int, default=256, help="their width and height in pixels (default 256)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-size", type=int, default=224, help="the transform's output size (default 224)")
    ap.add_argument("--randaugment", default=None, help="e.g. rand-m9-n2 (default: none)")
    ap.add_argument("--repeats", type=int, default=2, help="epochs per loader and count; the best is shown")
    ap.add_argument("--folder", type=Path, default=None, help="write the JPEGs here and keep them (default: a "
                                                                "temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loaders' own work only; the workers use one thread each too

    tmp = None
    root = args.folder
    if root is None:
        tmp = Path(tempfile.mkdtemp(prefix="reducedmpl-loading-"))
        root = tmp / "images"
    try:
        if not root.is_dir() or not any(root.iterdir()):
            t0 = time.perf_counter()
            write_jpegs(root, args.n, args.size)
            print(f"wrote {args.n} JPEGs of {args.size}x{args.size} in {time.perf_counter() - t0:.1f} s")
        for path in sorted(root.rglob("*.jpg")):  # read every file once: both loaders find it in the page cache
            path.read_bytes()
        cores = os.cpu_count()
        print(f"{args.n} images, batch {args.batch_size}, output {args.input_size}x{args.input_size}, "
              f"randaugment {args.randaugment or 'off'}; {cores} cores, load average {os.getloadavg()[0]:.1f} "
              f"before the runs")
        print(f"{'workers':>7}  {'reducedmpl img/s':>16}  {'torchvision img/s':>17}  {'ratio':>6}  target")
        worst = None
        for w in args.workers:
            a = b = 0.0
            for _ in range(args.repeats):  # interleaved, so that a burst of other load hits both alike
                a = max(a, ours(root, w, args.batch_size, args.input_size, args.randaugment))
                b = max(b, torchvision_loader(root, w, args.batch_size, args.input_size, args.randaugment))
            ratio = a / b
            worst = ratio if worst is None else min(worst, ratio)
            ok = "ok" if ratio >= TARGET_RATIO else f"below {TARGET_RATIO}x"
            print(f"{w:>7}  {a:>16.0f}  {b:>17.0f}  {ratio:>5.2f}x  {ok}")
        print(f"load average {os.getloadavg()[0]:.1f} after the runs; worst ratio {worst:.2f}x "
              f"(target {TARGET_RATIO}x)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
