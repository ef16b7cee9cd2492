"""Step time and peak memory of the distill modes, side by side, against a full-MPL reference step.

Each configuration runs in its own process (peak memory is per process), on the same student, the same
synthetic batches and the same settings; the script prints ratios to the ``kd`` step:

* ``supervised``, ``kd``, ``reducedmpl`` with ``reinforce`` and with ``exact`` (jvp and fd) — the real
  ``Distiller`` code path of ``reducedmpl distill``, targets served from memory as the store does;
* ``kd-views``: kd from a store of ``--views`` views per row: each drawn row's stored view is rebuilt exactly
  (crop and flip seeded by row and view) and read with that view's targets;
* ``online-kd``: kd with the large teacher (``--large``) in memory, run on the student's own augmented view
  every step — the consistent teacher that stored targets stand in for;
* ``kd-ra``, ``kd-views-ra``, ``online-kd-ra``: the same three with RandAugment (``rand-m9-n2``) in the data's
  augmentation and in the stored views; ``--workers N`` renders the stored views in N DataLoader workers;
* ``full-mpl``: the same student step plus a resnet18-class large teacher that runs forward and backward on
  the labeled and unlabeled batches every step, as full Meta Pseudo Labels does.

* ``passes``: the passes a ReducedMPL step adds to kd's, timed alone on the same student and batches — a
  no-grad forward of the labeled batch, a forward and backward of it, a no-grad forward of the pseudo-label
  batch. Their sums with kd's step are the *floors*: reinforce = kd + 2 labeled forwards (L_old, L_new),
  exact (fd) = kd + a labeled forward and backward (v at θ') + a pseudo-label forward (the finite difference).
  What a step costs above its floor is overhead (the reduced teacher, batches, bookkeeping).

Targets: kd from stored views <= 0.5x online-kd (crop views; and RandAugment views, against online-kd with
RandAugment), kd from stored RandAugment views <= 1.1x kd from clean targets with RandAugment, reinforce <= 1.25x
kd, exact (fd) <= 1.65x kd, both within 5 % of their floor, <= 0.2x full-mpl, and < 0.5x its peak memory. The
machine's load average is printed beside the table: take figures from a run with nothing else running (on a
shared machine, ``--threads 1`` swings least).

    python benchmarks/distill_speed.py                 # default: 32x32 RGB, test_resnet student
    python benchmarks/distill_speed.py --steps 40 --student resnet10t
    python benchmarks/distill_speed.py --modes kd,kd-views,online-kd,kd-ra,kd-views-ra,online-kd-ra --workers 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

MODES = ["supervised", "kd", "kd-views", "online-kd", "kd-ra", "kd-views-ra", "online-kd-ra", "reinforce", "exact-jvp",
         "exact-fd", "full-mpl", "passes"]
RANDAUGMENT = "rand-m9-n2"  # the data augmentation of the *-ra modes


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from reducedmpl.config import DataConfig, DistillConfig
    from reducedmpl.data.loading import default_preprocess
    from reducedmpl.data.sources import Source
    from reducedmpl.data.splits import make_splits
    from reducedmpl.models import create_model
    from reducedmpl.stages.distill import Distiller
    from reducedmpl.data.setup import DataSetup
    from reducedmpl.data.views import REBUILD

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, c = 4096, 10
    images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, c, n).astype(np.int64)
    source = Source(spec="synthetic", kind="npz", class_names=[str(i) for i in range(c)], labels=labels,
                    in_chans=3, images=images, image_size=(args.size, args.size))
    randaugment = RANDAUGMENT if args.worker.endswith("-ra") else None
    data_cfg = DataConfig(source="synthetic", labeled_per_class=100, crop_padding=2, hflip=True,
                          randaugment=randaugment, num_workers=args.workers)
    splits = make_splits(source, data_cfg)
    data = DataSetup(data_cfg, source, splits, default_preprocess(source, splits.indices["labeled"], data_cfg))
    logits = rng.normal(size=(n, c)).astype(np.float32) * 3

    views = args.views if args.worker.startswith("kd-views") else 1
    view_logits = rng.normal(size=(n, views, c)).astype(np.float32) * 3
    policy = {"views": views, "seed": 0, "input_size": args.size, "crop_padding": 2, "hflip": True,
              "randaugment": randaugment, "kind": "array", "rebuild": REBUILD}

    class MemoryStore:  # what TargetStore.log_probs returns, from memory (with K views for kd-views)
        meta = types.SimpleNamespace(view_policy=policy)

        def __init__(self):
            self.views = views

        def log_probs(self, ids, views=None):
            x = logits[ids] if views is None else view_logits[ids, views]
            return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)

    mode = args.worker.removesuffix("-ra")
    mode = "kd" if mode == "kd-views" else mode
    if mode == "passes":
        mode = "kd"
    kw = dict(mode="reducedmpl", student=args.student, steps=10_000, batch_size=args.labeled_batch,
              unlabeled_batch_size=args.unlabeled_batch, data=dataclasses.asdict(data_cfg), device="cpu")
    if mode in ("supervised", "kd", "online-kd"):
        kw["mode"] = "kd" if mode == "online-kd" else mode  # online-kd: kd's loop with the teacher below
    elif mode == "reinforce":
        kw["teacher_grad"] = "reinforce"
    elif mode.startswith("exact"):
        kw.update(teacher_grad="exact", exact_method=mode.split("-")[1])
    elif mode == "full-mpl":
        kw.update(teacher_grad="reinforce")
    cfg = DistillConfig(**kw)
    base_rss = _rss_mb()
    d = Distiller(cfg, data, MemoryStore(), torch.device("cpu"))

    step = d.step
    if mode == "online-kd":  # the large teacher in memory, run on the student's view every step
        from reducedmpl.methods import LargeTeacher, OnlineKDStep

        large = LargeTeacher(create_model(args.large, c, 3), data.prep, data.prep, torch.device("cpu"), False)
        d.method = OnlineKDStep(cfg, d.student, large=large)
    if mode == "full-mpl":
        large = create_model(args.large, c, 3)
        opt = torch.optim.SGD(large.parameters(), lr=0.01, momentum=0.9)

        def step(measure: bool):  # noqa: F811 - the full-MPL reference: the large teacher in the loop
            x_l, y_l, _ = d.labeled.next()
            x_u, _, _ = d.unlabeled.next()
            t_all = large(torch.cat([x_u, x_l]))
            t_u, t_l = t_all[:len(x_u)], t_all[len(x_u):]
            y_hat = torch.multinomial(F.softmax(t_u.detach(), -1), 1).squeeze(1)
            loss_old, _ = d.student.labeled_loss(x_l, y_l)
            s_loss = F.cross_entropy(d.student.forward(x_u), y_hat)
            d.student.update(s_loss)
            loss_new, _ = d.student.labeled_loss(x_l, y_l)
            h = loss_old - loss_new
            loss_t = h * F.cross_entropy(t_u, y_hat) + F.cross_entropy(t_l, y_l)
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            opt.step()

    if args.worker == "passes":
        return {"mode": "passes", **_time_passes(d, args), "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss}
    for _ in range(args.warmup):
        step(False)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(False)
        times.append(time.perf_counter() - t0)
    return {"mode": args.worker, "median_s": statistics.median(times), "peak_rss_mb": _rss_mb(),
            "base_rss_mb": base_rss}


def _time_passes(d, args) -> dict:
    """Median seconds of each pass a ReducedMPL step adds to kd's, alone, on the kd run's student."""
    import torch
    import torch.nn.functional as F

    from reducedmpl import mpl

    s = d.student
    x_l, y_l, _ = d.labeled.next()
    x_u, _, _ = d.unlabeled.next()

    def fwd_l():
        with torch.no_grad():
            s.forward_keep_stats(x_l)

    def fwd_bwd_l():
        torch.autograd.grad(F.cross_entropy(s.forward_keep_stats(x_l), y_l), s.params)

    def fwd_u():
        with torch.no_grad(), mpl.frozen_norm_stats(s.model):
            s.model(x_u)

    out = {}
    for name, f in (("fwd_l_s", fwd_l), ("fwd_bwd_l_s", fwd_bwd_l), ("fwd_u_s", fwd_u)):
        for _ in range(args.warmup):
            f()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--large", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--labeled-batch", type=int, default=32)
    p.add_argument("--unlabeled-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--views", type=int, default=8, help="stored views per row of the kd-views mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="each mode runs this many times, interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers (stored views of arrays in workers)")
    p.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    modes = [m for m in MODES if m in args.modes.split(",")] if args.modes else MODES
    if "kd" not in modes:
        p.error("--modes must include kd (the table's unit)")
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, list[dict]] = {m: [] for m in modes}
    passthrough = [a for a in sys.argv[1:]]
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate the order against drift
            out = subprocess.run([sys.executable, __file__, *passthrough, "--worker", mode], capture_output=True,
                                 text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"student {args.student}, large {args.large}, {args.size}x{args.size} RGB, batches "
          f"{args.labeled_batch} labeled + {args.unlabeled_batch} unlabeled, {args.steps} steps x {args.rounds} "
          f"rounds, {args.threads} threads, {args.workers} data workers; *-ra modes: {RANDAUGMENT}, crops, flips; "
          f"the others crops, flips; load average {load_before} before, "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} after")
    report(results, [m for m in modes if m != "passes"])


def report(results: dict[str, list[dict]], steps: list[str]) -> None:
    """The table of step times and memory, and the targets that the modes measured allow checking."""
    med = {m: statistics.median(r["median_s"] for r in results[m]) for m in steps}
    mem = {m: max(r["peak_rss_mb"] - r["base_rss_mb"] for r in results[m]) for m in steps}
    peak = {m: max(r["peak_rss_mb"] for r in results[m]) for m in steps}
    floor = {}
    if "passes" in results:
        passes = {k: statistics.median(r[k] for r in results["passes"]) for k in ("fwd_l_s", "fwd_bwd_l_s", "fwd_u_s")}
        floor = {"reinforce": med["kd"] + 2 * passes["fwd_l_s"],
                 "exact-fd": med["kd"] + passes["fwd_bwd_l_s"] + passes["fwd_u_s"]}
        print(f"passes alone: labeled forward {1000 * passes['fwd_l_s']:.1f} ms, labeled forward+backward "
              f"{1000 * passes['fwd_bwd_l_s']:.1f} ms, pseudo-label forward {1000 * passes['fwd_u_s']:.1f} ms")
    full = med.get("full-mpl")
    print(f"{'mode':<14}{'step ms':>9}{'x kd':>7}{'floor x kd':>12}{'x floor':>9}{'x full-mpl':>12}"
          f"{'peak RSS MB':>13}{'added MB':>10}{'x full-mpl mem':>16}")
    for m in steps:
        fl = f"{floor[m] / med['kd']:>12.2f}{med[m] / floor[m]:>9.3f}" if m in floor else f"{'':>12}{'':>9}"
        vs_full = f"{med[m] / full:>12.3f}" if full else f"{'-':>12}"
        vs_mem = f"{mem[m] / max(mem['full-mpl'], 1e-9):>16.2f}" if full else f"{'-':>16}"
        print(f"{m:<14}{1000 * med[m]:>9.1f}{med[m] / med['kd']:>7.2f}{fl}{vs_full}{peak[m]:>13.0f}{mem[m]:>10.0f}"
              f"{vs_mem}")
    checks = [("kd from stored crop views <= 0.5x online-kd step", ("kd-views", "online-kd"),
               lambda: med["kd-views"] / med["online-kd"] <= 0.5),
              (f"kd from stored {RANDAUGMENT} views <= 1.1x kd from clean targets (same augmentation)",
               ("kd-views-ra", "kd-ra"), lambda: med["kd-views-ra"] / med["kd-ra"] <= 1.1),
              (f"kd from stored {RANDAUGMENT} views <= 0.5x online-kd step (same augmentation)",
               ("kd-views-ra", "online-kd-ra"), lambda: med["kd-views-ra"] / med["online-kd-ra"] <= 0.5),
              ("reinforce <= 1.25x kd", ("reinforce",), lambda: med["reinforce"] / med["kd"] <= 1.25),
              ("exact (fd) <= 1.65x kd", ("exact-fd",), lambda: med["exact-fd"] / med["kd"] <= 1.65),
              ("reinforce within 5% of its floor", ("reinforce", "passes"),
               lambda: med["reinforce"] / floor["reinforce"] <= 1.05),
              ("exact (fd) within 5% of its floor", ("exact-fd", "passes"),
               lambda: med["exact-fd"] / floor["exact-fd"] <= 1.05),
              ("reinforce, exact (fd) <= 0.2x full-mpl step", ("reinforce", "exact-fd", "full-mpl"),
               lambda: max(med["reinforce"], med["exact-fd"]) / med["full-mpl"] <= 0.2),
              ("reinforce, exact added memory < 0.5x full-mpl", ("reinforce", "exact-jvp", "exact-fd", "full-mpl"),
               lambda: max(mem["reinforce"], mem["exact-jvp"], mem["exact-fd"]) / max(mem["full-mpl"], 1e-9) < 0.5)]
    for name, needs, ok in checks:
        if all(n in results for n in needs):
            print(f"{'met ' if ok() else 'MISSED'}  {name}")


if __name__ == "__main__":
    main()
