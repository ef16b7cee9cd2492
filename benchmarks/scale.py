"""A million-row rehearsal on one CPU machine: what each stage costs per row at 10k, 100k and 1.28 M rows.

Data (``--cache``, default ``runs/scale-data``, made once): an ImageNet-shaped set of 1,000 classes of 40 x 40
JPEGs (quality 90; a smooth random colour field plus noise; image ``i`` in class ``i % 1000``) at each of
``--sizes`` rows, both as a folder (``folder-N/nCCCC/IIIIIII.jpg``) and as WebDataset shards of 10,000 samples
(``wds-N/shard-KKKKK.tar``, ``IIIIIII.jpg`` + ``IIIIIII.cls``). Each size's rows are the first N of the same
sequence. Each part runs in fresh processes, and its result is kept as JSON per (part, size) under
``CACHE/results``, so a run can be completed in parts and the table printed again with ``--report-only``.

Parts (``--parts``), each a real stage call or command line:

* ``listing``: ``load_source`` (listing) then ``make_splits`` (every split's fingerprint) of the whole source, folder
  and wds, in a child process: seconds of each, and its peak RSS above the RSS after the imports;
* ``precompute``: a ``test_resnet`` teacher with random weights at 32 px, top-10 targets, no DataLoader workers:
  (a) ``--views 1`` over 2 x ``--fixed-rows`` rows and (b) ``--views 8`` over ``--fixed-rows`` rows, each the val
  split (``data.val_size``) of a job over the whole folder source (which lists and fingerprints every row), and
  (c) ``--views 2`` over every row (val and test 500 rows each): the whole job, and the store distill replays.
  Rows/s of the computing loop (``compute_shard``: batches, teacher, HDF5 writes; the listing and the fingerprints
  are the listing part's) and the store's bytes per row;
* ``distill``: ``reducedmpl distill --mode kd`` of a ``test_resnet`` student from store (c), its stored views
  replayed, ``--steps`` steps (batch 32 + 128), with 1 and with 2 processes (``torchrun``): start-up seconds (the
  wall time of the command less its training loop: imports, listing, fingerprints, the store's checks, models; also
  the final evaluation of the 1,000 val and test rows), peak RSS per process above a process that imports the
  stage and builds both models, and steps/s of the loop;
* ``loading``: our folder loading (``Batcher``) against torchvision's ``ImageFolder`` + ``DataLoader`` (fork, its
  default) on the same files: the same timm training transform at 32 px, batch 256, 0, 2 and 4 workers, the first
  ``--loading-batches`` batches of a shuffled epoch over the whole folder, loader start-up included (the listing
  of both is not: it is the listing part's), each loader ``--loading-repeats`` times alternating, the best run.

Per-row cost: seconds per row handled (every row for listing and precompute (c); the fixed rows, steps or batches
for the rest, the same at every size), printed as a ratio to the 10k cost. Targets: every ratio at 1.28 M <= 1.2;
listing + fingerprints of 1.28 M files <= 60 s; distill start-up <= 30 s and <= 2 GB RSS per process beyond the
models; our loading >= 0.9x torchvision's at 0, 2 and 4 workers. The load average before and after each part and
its wall time are printed beside the table: take figures from a quiet machine.

    python benchmarks/scale.py [--sizes 10000 100000 1280000] [--parts listing precompute distill loading]
    python benchmarks/scale.py --report-only
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLASSES, SIDE, SHARD_ROWS = 1000, 40, 10000
INPUT = 32  # the models' input size
PARTS = ("listing", "precompute", "distill", "loading")
WORKERS = (0, 2, 4)
TARGET_RATIO, TARGET_LISTING_S, TARGET_STARTUP_S, TARGET_RSS_MB, TARGET_LOADING = 1.2, 60.0, 30.0, 2048.0, 0.9


# ---------------------------------------------------------------------------------------------- the data
def classes(n: int) -> int:
    """1,000 classes; for a set under 10,000 rows (tests) one per 20 rows, at least 12 (for top-10 targets)."""
    return CLASSES if n >= SHARD_ROWS else min(CLASSES, max(12, n // 20))


def held_out(n: int) -> int:
    """Rows of the val split and of the test split in every job (500; a tenth of a small set)."""
    return min(500, n // 10)


def images(start: int, stop: int) -> np.ndarray:
    """Rows ``start..stop-1`` as uint8 (n, 40, 40, 3): a smooth colour field from per-row draws, plus noise."""
    rng = np.random.default_rng(start)
    n = stop - start
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    a, b, phase = (rng.uniform(1, 6, (3, n, 1, 1)).astype(np.float32))
    base = np.stack([np.sin(a * xx * 6.28 + phase), np.cos(b * yy * 6.28 + phase), np.sin((xx + yy) * a)], -1)
    tint = np.arange(start, stop).reshape(-1, 1, 1, 1) * np.array([0.7, 1.3, 2.1]) % 60
    noise = rng.normal(0, 12, (n, SIDE, SIDE, 3)).astype(np.float32)
    return (base * 70 + 100 + tint + noise).clip(0, 255).astype(np.uint8)


def write_chunk(folder: str, wds: str, shard: int, rows: int = SHARD_ROWS, k: int = CLASSES) -> int:
    """Rows of shard ``shard`` (``rows`` each, ``k`` classes): a JPEG per row in the folder, and the shard's tar
    (written, then renamed)."""
    from PIL import Image

    start = shard * rows
    stop = start + rows
    tar_path = os.path.join(wds, f"shard-{shard:05d}.tar")
    tmp = tar_path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        for i, pixels in zip(range(start, stop), images(start, stop)):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            data, label = buf.getvalue(), str(i % k).encode()
            with open(os.path.join(folder, f"n{i % k:04d}", f"{i:07d}.jpg"), "wb") as f:
                f.write(data)
            for name, payload in ((f"{i:07d}.jpg", data), (f"{i:07d}.cls", label)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, tar_path)
    return stop - start


def ensure_data(cache: Path, n: int, jobs: int) -> tuple[Path, Path, float]:
    """``cache/folder-N`` and ``cache/wds-N`` (made when absent), and the seconds making them took."""
    folder, wds = cache / f"folder-{n}", cache / f"wds-{n}"
    done = cache / f"data-{n}.json"
    if done.exists():
        return folder, wds, json.loads(done.read_text())["seconds"]
    if n % SHARD_ROWS and n > SHARD_ROWS:
        sys.exit(f"error: --sizes must be multiples of {SHARD_ROWS} above it, got {n}")
    t0 = time.perf_counter()
    for c in range(classes(n)):
        (folder / f"n{c:04d}").mkdir(parents=True, exist_ok=True)
    wds.mkdir(parents=True, exist_ok=True)
    if n < SHARD_ROWS:  # a tiny set (tests): one short shard
        write_chunk(str(folder), str(wds), 0, n, classes(n))
    else:
        n_shards = n // SHARD_ROWS
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(write_chunk, [str(folder)] * n_shards, [str(wds)] * n_shards, range(n_shards),
                          [SHARD_ROWS] * n_shards, [CLASSES] * n_shards))
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"rows": n, "seconds": seconds}))
    return folder, wds, seconds


# ---------------------------------------------------------------------------------------------- child processes
def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(argv: list[str], threads: int = 1) -> dict:
    """Run ``scale.py --child ...`` in a fresh process; its last stdout line is a JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{REPO}{os.pathsep}" +
           os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *argv], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {' '.join(argv[:2])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def child_listing(spec: str) -> dict:
    """Listing and fingerprint seconds of ``spec``, and the peak RSS they add."""
    import torch  # noqa: F401 - imported before the baseline RSS, as every stage has it

    from reducedmpl.config import DataConfig
    from reducedmpl.data.sources import load_source
    from reducedmpl.data.splits import make_splits

    base = rss_mb()
    t0 = time.perf_counter()
    source = load_source(spec)
    t1 = time.perf_counter()
    make_splits(source, DataConfig(source=spec, val_size=held_out(len(source)), test_size=held_out(len(source))))
    t2 = time.perf_counter()
    return {"rows": len(source), "list_s": t1 - t0, "fingerprint_s": t2 - t1, "rss_mb": rss_mb() - base}


def child_teacher(spec: str, out: str) -> dict:
    """A teacher.pt of ``test_resnet`` with random weights at 32 px for ``spec``."""
    import torch

    from reducedmpl.config import DataConfig, to_dict
    from reducedmpl.data.loading import default_preprocess
    from reducedmpl.data.setup import DataSetup
    from reducedmpl.data.sources import load_source
    from reducedmpl.data.splits import make_splits
    from reducedmpl.files import save_torch
    from reducedmpl.models import build_artifact, create_model, model_source

    source = load_source(spec)
    data = DataConfig(source=spec, val_size=held_out(len(source)), test_size=held_out(len(source)), input_size=INPUT)
    splits = make_splits(source, data)
    prep = default_preprocess(source, splits.indices["labeled"], data)
    torch.manual_seed(0)
    model = create_model("test_resnet", source.num_classes, 3, input_size=INPUT)
    art = build_artifact("teacher", model, model_source("test_resnet"), DataSetup(data, source, splits, prep),
                         {"data": to_dict(data)}, {})
    save_torch(art, Path(out))
    return {"path": out}


def child_precompute(teacher: str, out: str, spec: str, views: int, splits: str, val_size: float,
                     test_size: float) -> dict:
    """One ``precompute`` (top-10) through the Python API, its computing loop timed."""
    from reducedmpl import api
    from reducedmpl.stages import precompute as stage

    loop = [0.0]
    compute_shard = stage.compute_shard

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return compute_shard(*args, **kwargs)
        finally:
            loop[0] += time.perf_counter() - t

    stage.compute_shard = timed
    t0 = time.perf_counter()
    cfg = {"topk": 10, "views": views, "splits": splits.split(","), "batch_size": 256,
           "data": {"source": spec, "val_size": val_size, "test_size": test_size}}
    result = api.precompute(cfg, teacher=teacher, out=out, overwrite=True, quiet=True).metrics
    return {"rows": result["rows"], "loop_s": loop[0], "stage_s": time.perf_counter() - t0, "bytes": result["bytes"]}


def child_baseline() -> dict:
    """Peak RSS of a process that imports the distill stage and builds the student and the reduced teacher."""
    import timm

    from reducedmpl.stages import distill  # noqa: F401

    timm.create_model("test_resnet", num_classes=CLASSES)
    timm.create_model("test_resnet", num_classes=CLASSES)
    return {"rss_mb": rss_mb()}


def child_distill(store: str, out: str, nproc: int, steps: int) -> dict:
    """``reducedmpl distill --mode kd`` from ``store`` (its views replayed) in ``nproc`` processes."""
    args = ["distill", "--targets", store, "--student", "test_resnet", "--mode", "kd", "--steps", str(steps),
            "--out", out, "--quiet", "--set", f"distill.eval_every={10 * steps}", "--set", f"distill.log_every={steps}",
            "--set", "distill.batch_size=32", "--set", "distill.unlabeled_batch_size=128",
            "--set", "distill.probe_size=0", "--set", f"distill.checkpoint_every={10 * steps}"]
    launch = [sys.executable, "-m", "reducedmpl"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "reducedmpl"]
    t0 = time.perf_counter()
    r = subprocess.run(launch + args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"distill failed:\n{r.stderr[-3000:]}")
    result = json.loads((Path(out) / "result.json").read_text())
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest process it ran
    return {"wall_s": wall, "train_s": result["train_seconds"], "steps": steps, "rss_mb": rss}


def child_loading(folder: str, workers: int, which: str, batches: int, batch_size: int) -> dict:
    """Images/s of the first ``batches`` batches of a shuffled training epoch: ours or torchvision's."""
    import torch
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    from reducedmpl.config import DataConfig
    from reducedmpl.data.loading import IMAGENET_MEAN, IMAGENET_STD, Batcher, default_preprocess
    from reducedmpl.data.sources import load_source

    torch.set_num_threads(1)
    if which == "ours":
        source = load_source(f"folder:{folder}")
        cfg = DataConfig(source=f"folder:{folder}", num_workers=workers, input_size=INPUT, hflip=True)
        rows = np.arange(len(source))
        t0 = time.perf_counter()
        batcher = Batcher(source, rows, default_preprocess(source, rows, cfg), cfg, batch_size=batch_size,
                          train=True, seed=0)
        it = batcher.epoch(0)
    else:
        transform = create_transform(INPUT, is_training=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=0.5,
                                     interpolation="bilinear")
        dataset = ImageFolder(folder, transform=transform)
        t0 = time.perf_counter()
        it = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers))
    seen = sum(len(batch[1]) for _, batch in zip(range(batches), it))
    return {"images": seen, "seconds": time.perf_counter() - t0}


CHILDREN = {"listing": child_listing, "teacher": child_teacher, "precompute": child_precompute,
            "baseline": child_baseline, "distill": child_distill, "loading": child_loading}


def run_child(argv: list[str]) -> None:
    fn = CHILDREN[argv[0]]
    kinds = [p.annotation for p in inspect.signature(fn).parameters.values()]
    values = [int(v) if k == "int" else float(v) if k == "float" else v for k, v in zip(kinds, argv[1:])]
    print(json.dumps(fn(*values)))


# ---------------------------------------------------------------------------------------------- the parts
def part_listing(args, n: int, folder: Path, wds: Path) -> dict:
    return {"folder": child(["listing", f"folder:{folder}"]), "wds": child(["listing", f"wds:{wds}"])}


def part_precompute(args, n: int, folder: Path, wds: Path) -> dict:
    work = args.cache / "work" / str(n)
    spec, teacher = f"folder:{folder}", str(work / "teacher.pt")
    work.mkdir(parents=True, exist_ok=True)
    child(["teacher", spec, teacher])
    every, held = "labeled,unlabeled,val,test", str(held_out(n))

    def job(views: int, splits: str, val: int | str) -> dict:
        return child(["precompute", teacher, str(work / f"v{views}" / "targets.h5"), spec, str(views), splits,
                      str(val), held])

    fixed = min(args.fixed_rows, n // 4)  # the same at every size from 10,000 rows up
    return {"v1": job(1, "val", 2 * fixed), "v8": job(8, "val", fixed), "v2": job(2, every, held)}


def part_distill(args, n: int, folder: Path, wds: Path) -> dict:
    store = args.cache / "work" / str(n) / "v2" / "targets.h5"
    if not store.exists():
        sys.exit(f"error: no store {store}: run --parts precompute for {n} rows first")
    out = {"baseline": child(["baseline"])}
    for nproc in (1, 2):
        run = args.cache / "work" / str(n) / f"distill-{nproc}-{time.monotonic_ns()}"
        out[f"p{nproc}"] = child(["distill", str(store), str(run), str(nproc), str(args.steps)])
    return out


def part_loading(args, n: int, folder: Path, wds: Path) -> dict:
    """Each loader ``--loading-repeats`` times in fresh processes, alternating ours and torchvision's; the best
    (fastest) run of each is the figure, every run's seconds kept beside it."""
    runs: dict[str, list[dict]] = {}
    for w in WORKERS:
        for _ in range(args.loading_repeats):
            for which in ("ours", "torchvision"):
                runs.setdefault(f"{which}-{w}", []).append(
                    child(["loading", str(folder), str(w), which, str(args.loading_batches), str(args.batch_size)]))
    return {key: {**min(rs, key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in rs]}
            for key, rs in runs.items()}


PART_FNS = {"listing": part_listing, "precompute": part_precompute, "distill": part_distill, "loading": part_loading}


def run_part(args, part: str, n: int) -> dict:
    folder, wds, _ = ensure_data(args.cache, n, args.jobs)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    result = PART_FNS[part](args, n, folder, wds)
    result.update(load_before=load0, load_after=os.getloadavg()[0], wall_s=time.perf_counter() - t0)
    path = args.cache / "results" / f"{part}-{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------- the table
def measures(args) -> list[tuple[str, str, object]]:
    """(part, label, fn): ``fn(result of the part at one size, rows)`` gives (shown value, per-row seconds or None)."""
    def listing(kind):
        return lambda r, n: (f"{r[kind]['list_s'] + r[kind]['fingerprint_s']:.2f} s",
                             (r[kind]["list_s"] + r[kind]["fingerprint_s"]) / r[kind]["rows"])

    def rss(kind):
        return lambda r, n: (f"{r[kind]['rss_mb']:.0f} MB", None)

    def rate(key):
        return lambda r, n: (f"{r[key]['rows'] / r[key]['loop_s']:.0f} rows/s", r[key]["loop_s"] / r[key]["rows"])

    def store_bytes(key):
        return lambda r, n: (f"{r[key]['bytes'] / r[key]['rows']:.0f} B/row", None)

    def startup(p):
        return lambda r, n: (f"{r[p]['wall_s'] - r[p]['train_s']:.1f} s", (r[p]["wall_s"] - r[p]["train_s"]) / n)

    def beyond(p):
        return lambda r, n: (f"{r[p]['rss_mb'] - r['baseline']['rss_mb']:.0f} MB", None)

    def steps(p):
        return lambda r, n: (f"{r[p]['steps'] / r[p]['train_s']:.2f} steps/s", r[p]["train_s"] / r[p]["steps"])

    def loading(which, w):
        return lambda r, n: (f"{r[f'{which}-{w}']['images'] / r[f'{which}-{w}']['seconds']:.0f} img/s",
                             r[f"{which}-{w}"]["seconds"] / r[f"{which}-{w}"]["images"])

    def ratio(w):
        return lambda r, n: (f"{loading_ratio(r, w):.2f}x", None)

    rows = [("listing", f"{kind}: list + fingerprint (all rows)", listing(kind)) for kind in ("folder", "wds")]
    rows += [("listing", f"{kind}: peak RSS of source + splits", rss(kind)) for kind in ("folder", "wds")]
    rows += [("precompute", f"1 view, {2 * args.fixed_rows} rows", rate("v1")),
             ("precompute", "1 view store", store_bytes("v1")),
             ("precompute", f"8 views, {args.fixed_rows} rows", rate("v8")),
             ("precompute", "8 views store", store_bytes("v8")),
             ("precompute", "2 views, all rows (distill's store)", rate("v2"))]
    for p in (1, 2):
        rows += [("distill", f"{p} process(es): start-up", startup(f"p{p}")),
                 ("distill", f"{p} process(es): peak RSS beyond models", beyond(f"p{p}")),
                 ("distill", f"{p} process(es): {args.steps} steps, views replayed", steps(f"p{p}"))]
    for w in WORKERS:
        rows += [("loading", f"ours, {w} workers", loading("ours", w)),
                 ("loading", f"torchvision, {w} workers", loading("torchvision", w)),
                 ("loading", f"ours / torchvision, {w} workers", ratio(w))]
    return rows


def loading_ratio(r: dict, w: int) -> float:
    ours, tv = r[f"ours-{w}"], r[f"torchvision-{w}"]
    return (ours["images"] / ours["seconds"]) / (tv["images"] / tv["seconds"])


def load_results(args) -> dict:
    out = {}
    for part in PARTS:
        for n in args.sizes:
            path = args.cache / "results" / f"{part}-{n}.json"
            if path.exists():
                out[(part, n)] = json.loads(path.read_text())
    return out


def report(args, results: dict) -> list[str]:
    """The table: each measure at each size, its per-row cost as a ratio to the first size's; then the targets."""
    ref, top = args.sizes[0], args.sizes[-1]
    print(f"{'measure':<46}" + "".join(f"{n:>24,}" for n in args.sizes))
    ratios = []
    for part, label, fn in measures(args):
        cells, base = [], None
        for n in args.sizes:
            r = results.get((part, n))
            if r is None:
                cells.append("-")
                continue
            shown, cost = fn(r, n)
            if n == ref:
                base = cost
            elif cost is not None and base:
                shown += f" ({cost / base:.2f}x)"
                if n == top:
                    ratios.append((f"{part}: {label}", cost / base))
            cells.append(shown)
        print(f"{part[:4]} {label:<41}" + "".join(f"{c:>24}" for c in cells))
    for part in PARTS:
        for n in args.sizes:
            r = results.get((part, n))
            if r is not None:
                print(f"{part} at {n:,} rows: {r['wall_s']:.0f} s, load average {r['load_before']:.1f} before, "
                      f"{r['load_after']:.1f} after")
    return targets(args, results, ratios)


def targets(args, results: dict, ratios: list[tuple[str, float]]) -> list[str]:
    """Each target at the largest size measured (``ok`` / ``MISSED``); returns the missed ones."""
    top = args.sizes[-1]
    checks = []
    if len(args.sizes) > 1:
        # our stages only: torchvision's loading is the reference the loading ratio is taken against
        checks += [(f"per-row cost at {top:,} <= {TARGET_RATIO}x the {args.sizes[0]:,} cost: {name}", v,
                    v <= TARGET_RATIO) for name, v in ratios if "torchvision" not in name]
    listing = results.get(("listing", top))
    if listing:
        for kind in ("folder", "wds"):
            s = listing[kind]["list_s"] + listing[kind]["fingerprint_s"]
            checks.append((f"{kind} listing + fingerprint of {top:,} rows <= {TARGET_LISTING_S:.0f} s", s,
                           s <= TARGET_LISTING_S))
    distill = results.get(("distill", top))
    if distill:
        for p in (1, 2):
            s = distill[f"p{p}"]["wall_s"] - distill[f"p{p}"]["train_s"]
            mb = distill[f"p{p}"]["rss_mb"] - distill["baseline"]["rss_mb"]
            checks += [(f"distill start-up, {p} process(es) <= {TARGET_STARTUP_S:.0f} s", s, s <= TARGET_STARTUP_S),
                       (f"distill RSS beyond the models, {p} process(es) <= {TARGET_RSS_MB:.0f} MB", mb,
                        mb <= TARGET_RSS_MB)]
    for n in args.sizes:
        loading = results.get(("loading", n))
        if loading:
            checks += [(f"loading at {n:,} rows, {w} workers: ours >= {TARGET_LOADING}x torchvision",
                        loading_ratio(loading, w), loading_ratio(loading, w) >= TARGET_LOADING) for w in WORKERS]
    print("targets:")
    for name, value, ok in checks:
        print(f"  {'ok    ' if ok else 'MISSED'} {name}: {value:.2f}")
    return [name for name, _, ok in checks if not ok]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1280000],
                    help="rows; the first is the reference of the ratios (default 10000 100000 1280000)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "scale-data",
                    help="data and results (default runs/scale-data)")
    ap.add_argument("--report-only", action="store_true", help="print the table from the cached results")
    ap.add_argument("--redo", action="store_true", help="measure again parts whose results are cached")
    ap.add_argument("--fixed-rows", type=int, default=2000,
                    help="rows of the 8-view precompute, half those of the 1-view one (default 2000)")
    ap.add_argument("--steps", type=int, default=30, help="distill steps (default 30)")
    ap.add_argument("--loading-batches", type=int, default=20, help="batches per loading run (default 20)")
    ap.add_argument("--loading-repeats", type=int, default=3,
                    help="runs of each loader, alternating; the best counts (default 3)")
    ap.add_argument("--batch-size", type=int, default=256, help="loading batch size (default 256)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing the data")
    args = ap.parse_args(argv)
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        run_child(argv[1:])
        return 0
    args = parse_args(argv)
    args.cache = args.cache.resolve()
    cached = load_results(args)
    if not args.report_only:
        for n in args.sizes:
            folder, wds, seconds = ensure_data(args.cache, n, args.jobs)
            print(f"data: {n:,} rows in {folder} and {wds} (made in {seconds:.0f} s)", flush=True)
        for part in args.parts:
            for n in args.sizes:
                if (part, n) in cached and not args.redo:
                    continue
                t0 = time.perf_counter()
                cached[(part, n)] = run_part(args, part, n)
                print(f"{part} at {n:,} rows: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{os.cpu_count()} cores; load average now {os.getloadavg()[0]:.1f}")
    missed = report(args, cached)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
