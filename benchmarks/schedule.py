"""Patient and consistent, from storage: does a longer schedule make stored views pay? (slow, not in CI)

``benchmarks/quality.py``'s protocol (MNIST split by seed, the student's 10 labels per class, 5,000-row pool) with
a *strong* large teacher (``--teacher-labels-per-class``, default 100) trained with the augmentation that makes the
views (crop and ``--randaugment``), so it is robust to them. At each schedule length in ``--steps`` it runs, for
every seed:

    kd               the fixed teacher: clean stored targets
    online-kd        the consistent teacher: the large teacher on the student's augmented view, every step
    kd:views=8/32    the consistent teacher from storage: 8 and 32 stored views per row
    kd:views=32,view_mix=mixup   stored function matching (mixup of two views; teacher on the mixed image)
    online-kd:online_mix=mixup   online function matching
    exact:mpl_weight=0/1 over the best stored variant (chosen on val at that length)

Everything is cached: the teacher and the stores once under ``OUT/shared``, each length's runs under
``OUT/steps-N`` (quality.py's own cache), so the experiment can be completed in parts (rerun the same command,
or give ``--steps`` a subset). The report (``OUT/schedule.md``, ``OUT/schedule.png``, ``OUT/schedule.json``) puts
test accuracy against schedule length per variant, the paired Δ to kd and of each stored variant to its online
counterpart, and the step time of each stored variant as a ratio to its online counterpart's (same machine, same
invocation is not guaranteed: the ratio reads each run's own ``train_seconds``, so run alone). The best stored
variant is chosen on val only.

    python benchmarks/schedule.py --out runs/schedule                          # 1,000 / 3,000 / 10,000 steps
    python benchmarks/schedule.py --out runs/schedule --steps 1000 --seeds 0    # a first part
    python benchmarks/schedule.py --out runs/schedule --report-only             # the table from the cache
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import quality as quality_benchmark  # noqa: E402 - benchmarks/ is on sys.path when a script runs
from _data import default_data, mean_std  # noqa: E402

HERE = Path(__file__).resolve().parent
STORED = {"kd:views=8": "online-kd", "kd:views=32": "online-kd",
          "kd:views=32,view_mix=mixup": "online-kd:online_mix=mixup"}  # stored variant -> its online counterpart
FIXED = ["kd", "online-kd", "online-kd:online_mix=mixup", *STORED]


def quality(args, steps: int, variants: list[str]) -> dict:
    """quality.py at one schedule length (cached by quality.py itself); returns its JSON report."""
    out = Path(args.out) / f"steps-{steps}"
    cmd = [sys.executable, str(HERE / "quality.py"), "--out", str(out), "--shared", str(Path(args.out) / "shared"),
           "--data", args.data, "--teacher-labels-per-class", str(args.teacher_labels_per_class),
           "--teacher-randaugment", args.randaugment, "--randaugment", args.randaugment,
           "--steps", str(steps), "--eval-every", str(max(1, steps // 4)), "--student", args.student,
           "--jobs", str(args.jobs), "--threads", str(args.threads), "--tag", "schedule",
           "--seeds", *map(str, args.seeds), "--variants", *variants]
    if not args.report_only:
        print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
    path = out / "schedule.json"
    return json.loads(path.read_text()) if path.exists() else {}


def best_stored(report: dict) -> str:
    """The stored variant with the best mean validation accuracy (never test)."""
    have = [s for s in STORED if s in report.get("variants", {})]
    return max(have, key=lambda s: statistics.mean(report["variants"][s]["val_acc"]))


def step_seconds(out: Path, steps: int, spec: str, student: str) -> list[float]:
    """Seconds per training step of each cached seed of ``spec`` (of the run's last part if it was resumed)."""
    folder = quality_benchmark.run_folder(argparse.Namespace(out=str(out / f"steps-{steps}"), student=student), spec)
    return [quality_benchmark.seconds_per_step(p.parent) for p in sorted(folder.glob("seed*/result.json"))]


def teacher_on_views(shared: Path) -> list[str]:
    """The large teacher's accuracy and mean entropy on the clean view and on its augmented views, per store
    (``reducedmpl inspect``'s figures: rows with a label; for a mixup store, the row's own label)."""
    from reducedmpl.targets.verify import verify_store

    lines = []
    for store in sorted(shared.glob("targets-views*/targets.h5")):
        views = verify_store(store)["views"]
        if not views or views[0]["teacher_accuracy"] is None:
            continue
        aug = [v for v in views[1:] if v["teacher_accuracy"] is not None]
        acc = [100 * v["teacher_accuracy"] for v in aug]
        ent = [v["mean_entropy"] for v in aug]
        lines.append(f"| {store.parent.name} | {100 * views[0]['teacher_accuracy']:.2f} | "
                     f"{statistics.mean(acc):.2f} ({min(acc):.2f}–{max(acc):.2f}) | "
                     f"{views[0]['mean_entropy']:.3f} → {statistics.mean(ent):.3f} |")
    head = ["| store | teacher acc % clean | on augmented views: mean (min–max) | entropy clean → views (nats) |",
            "|---|---|---|---|"]
    return head + lines if lines else []


def paired(a: dict, b: dict) -> list[float]:
    """Per-seed test-accuracy differences a − b (points), over the seeds both have."""
    pa, pb = dict(zip(a["seeds"], a["test_acc"])), dict(zip(b["seeds"], b["test_acc"]))
    return [pa[s] - pb[s] for s in sorted(pa) if s in pb]


def rows(args, steps: int, report: dict) -> list[str]:
    v = report["variants"]
    out = []
    for spec, r in v.items():
        online = STORED.get(spec)
        to_online = mean_std(paired(r, v[online]), True) if online in v else "–"
        ratio = "–"
        if online in v:
            mine, theirs = (step_seconds(Path(args.out), steps, s, args.student) for s in (spec, online))
            ratio = f"{statistics.mean(mine) / statistics.mean(theirs):.2f}×" if mine and theirs else "–"
        out.append(f"| {steps} | {spec} | {mean_std(r['test_acc'])} | {mean_std(r['val_acc'])} "
                   f"| {mean_std(paired(r, v['kd']), True) if spec != 'kd' else '—'} | {to_online} | {ratio} "
                   f"| {len(r['seeds'])} |")
    return out


def targets(args, reports: dict[int, dict]) -> list[str]:
    """The issue's targets at the longest schedule that ran, each marked met or missed (test accuracy means)."""
    steps = max(reports)
    v = reports[steps]["variants"]
    mean = lambda spec: statistics.mean(v[spec]["test_acc"]) if spec in v else float("nan")  # noqa: E731
    mark = lambda ok: "met" if ok else "missed"  # noqa: E731
    lines = [f"Targets at {steps} steps:"]
    for fm, cons in (("online-kd:online_mix=mixup", "online-kd"), ("kd:views=32,view_mix=mixup", "kd:views=32")):
        ok = mean(fm) >= mean(cons) >= mean("kd")
        lines.append(f"- function matching ≥ consistent ≥ fixed ({fm} {mean(fm):.2f}, {cons} {mean(cons):.2f}, "
                     f"kd {mean('kd'):.2f}): {mark(ok)}")
    for spec, online in STORED.items():
        if spec in v and online in v:
            d = statistics.mean(paired(v[spec], v[online]))
            mine, theirs = (step_seconds(Path(args.out), steps, s, args.student) for s in (spec, online))
            r = statistics.mean(mine) / statistics.mean(theirs)
            lines.append(f"- {spec} within 0.2 points of {online} ({d:+.2f}) at ≤ 0.5× its step time ({r:.2f}×): "
                         f"{mark(d >= -0.2 and r <= 0.5)}")
    best = next((s for s in v if s.startswith("exact:mpl_weight=1,")), None)
    if best is not None:
        base, ablation = "kd:" + best.split(",", 1)[1], "exact:mpl_weight=0," + best.split(",", 1)[1]
        to_base, to_ablation = (paired(v[best], v[o]) if o in v else [] for o in (base, ablation))
        lines.append(f"- ReducedMPL over the best stored variant ({mean(best):.2f}) ahead of {base} ({mean(base):.2f}; "
                     f"paired {mean_std(to_base, True)}) and of its mpl_weight 0 ablation ({mean(ablation):.2f}; paired "
                     f"{mean_std(to_ablation, True)}): {mark(mean(best) > mean(base) and mean(best) > mean(ablation))}")
    return lines


def plot(reports: dict[int, dict], path: Path) -> None:
    """Test accuracy (mean ± std over seeds) against schedule length, one line per variant."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    names = list(dict.fromkeys(s for r in reports.values() for s in r["variants"]))
    cmap = colormaps["tab10"]
    for i, spec in enumerate(names):
        pts = [(n, r["variants"][spec]["test_acc"]) for n, r in sorted(reports.items()) if spec in r["variants"]]
        xs = [n for n, _ in pts]
        ys = [statistics.mean(a) for _, a in pts]
        es = [statistics.stdev(a) if len(a) > 1 else 0.0 for _, a in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=spec, color=cmap(i % 10))
    ax.set_xscale("log")
    ax.set_xlabel("distill steps")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Schedule length: fixed, consistent and function-matching teachers")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/schedule")
    p.add_argument("--data", default=default_data(fallback=None), help="mnist:DIR (default: the shared MNIST)")
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 3000, 10000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-labels-per-class", default="100")
    p.add_argument("--randaugment", default="rand-m9-n2", help="the teacher's, the student's and the views' policy")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    reports: dict[int, dict] = {}
    for steps in sorted(args.steps):
        report = quality(args, steps, FIXED)
        if not report:
            continue
        best = best_stored(report)
        report = quality(args, steps, [*FIXED, f"exact:mpl_weight=0,{best.split(':', 1)[1]}",
                                       f"exact:mpl_weight=1,{best.split(':', 1)[1]}"]) or report
        reports[steps] = report
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = ["| steps | variant | test acc % | val acc % | paired Δ to kd | paired Δ to its online counterpart "
             "| step time vs online | seeds |", "|---|---|---|---|---|---|---|---|"]
    for steps, report in sorted(reports.items()):
        table += rows(args, steps, report)
    if reports:
        plot(reports, out / "schedule.png")
    teacher = next(iter(reports.values()))["teacher"] if reports else {}
    md = [f"# Schedule length: {args.data}, student {args.student}, teacher on {args.teacher_labels_per_class} "
          f"labels/class with {args.randaugment}", "",
          f"Large teacher: val {100 * teacher.get('val_acc', float('nan')):.2f} %, test "
          f"{100 * teacher.get('test_acc', float('nan')):.2f} % (clean images).", "",
          *teacher_on_views(out / "shared"), "", *table, "", *(targets(args, reports) if reports else []), "",
          f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
          f"Wall time of this invocation: {(time.perf_counter() - t0) / 60:.1f} min (cached runs are not rerun)."]
    (out / "schedule.md").write_text("\n".join(md) + "\n")
    (out / "schedule.json").write_text(json.dumps({str(k): v for k, v in reports.items()}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
