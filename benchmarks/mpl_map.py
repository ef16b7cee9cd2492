"""When does the MPL signal pay? A map over teacher strength (slow, not in CI).

For each teacher in ``--teacher-labels`` (labels per class the large teacher trains on, or ``all``), runs
``benchmarks/quality.py``'s protocol (MNIST split by seed, the student's 10 labels per class, ``--steps`` distill
steps, ``--seeds``) with the variants kd, ReducedMPL at mpl_weight 0 (the learned calibration alone) and ReducedMPL
at each of ``--weights``. The tuned mpl_weight of a teacher is the one with the best mean *validation* accuracy;
test accuracy is only reported. Each teacher's runs are cached by quality.py under ``OUT/teacher-N``, so the map
can be completed in parts (rerun the same command).

The table and the plot put, for each teacher, the paired test-accuracy difference to kd (same seed, same student
init, same batches) of mpl_weight 0 and of the tuned weight against the *gap*: the teacher's validation accuracy
minus the kd student's (both known to a user before choosing a mode). The large teacher trains for at least
``--teacher-steps`` steps (at most 40 epochs, at least 5), so the stronger teachers are not undertrained.

    python benchmarks/mpl_map.py --out runs/mpl-map                  # 5 teachers x 3 seeds x 4 variants
    python benchmarks/mpl_map.py --out runs/mpl-map --report-only    # redraw from what is cached
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _data import default_data, mean_std  # noqa: E402 - benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent


def teacher_epochs(labels: str, classes: int, pool: int, steps: int, batch: int) -> int:
    """Epochs for at least ``steps`` optimiser steps on the teacher's labeled set, clamped to 5..40."""
    n = pool if labels == "all" else min(pool, int(labels) * classes)
    return max(5, min(40, math.ceil(steps / max(1, n // batch))))


def variants(weights: list[float]) -> list[str]:
    return ["kd", "exact:mpl_weight=0", *[f"exact:mpl_weight={w:g}" for w in weights]]


def run_teacher(args, labels: str) -> Path:
    """quality.py for one teacher (cached by quality.py itself); returns its report JSON."""
    out = Path(args.out) / f"teacher-{labels}"
    epochs = teacher_epochs(labels, 10, 5000, args.teacher_steps, 25)  # quality.py: 10 classes, 5,000 train rows
    cmd = [sys.executable, str(HERE / "quality.py"), "--out", str(out), "--data", args.data,
           "--teacher-labels-per-class", labels, "--teacher-epochs", str(epochs), "--steps", str(args.steps),
           "--eval-every", str(args.steps // 4), "--student", args.student, "--jobs", str(args.jobs),
           "--threads", str(args.threads), "--tag", "map", "--seeds", *map(str, args.seeds),
           "--variants", *variants(args.weights)]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return out / "map.json"


def point(labels: str, report: dict, weights: list[float]) -> dict:
    """One teacher's row of the map, from quality.py's JSON report."""
    v = report["variants"]
    tuned = max((f"exact:mpl_weight={w:g}" for w in weights), key=lambda s: statistics.mean(v[s]["val_acc"]))
    kd_val = statistics.mean(v["kd"]["val_acc"])
    teacher_val = 100 * report["teacher"]["val_acc"]
    return {"labels": labels, "teacher_val": teacher_val, "teacher_test": 100 * report["teacher"]["test_acc"],
            "kd_val": kd_val, "kd_test": statistics.mean(v["kd"]["test_acc"]), "gap": teacher_val - kd_val,
            "tuned": tuned, "mpl0": v["exact:mpl_weight=0"]["diff_to_kd"], "best": v[tuned]["diff_to_kd"],
            "share": v[tuned]["diff_to_mpl0"], "seeds": v["kd"]["seeds"]}


def table(points: list[dict]) -> list[str]:
    lines = ["| teacher labels/class | teacher val % | kd student val % | gap (pts) | Δ test mpl_weight 0 − kd "
             "| tuned mpl_weight (val) | Δ test tuned − kd | Δ test tuned − mpl_weight 0 | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['labels']} | {p['teacher_val']:.2f} | {p['kd_val']:.2f} | {p['gap']:+.2f} "
                     f"| {mean_std(p['mpl0'], True)} | {p['tuned'].split('=')[-1]} | {mean_std(p['best'], True)} "
                     f"| {mean_std(p['share'], True)} | {len(p['seeds'])} |")
    return lines


def plot(points: list[dict], path: Path) -> None:
    """Paired Δ test to kd against the gap, one series per ReducedMPL setting (mean ± std over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for key, label, color in (("mpl0", "ReducedMPL, mpl_weight 0", "tab:blue"),
                              ("best", "ReducedMPL, tuned mpl_weight", "tab:red")):
        xs = [p["gap"] for p in points]
        ys = [statistics.mean(p[key]) for p in points]
        es = [statistics.stdev(p[key]) if len(p[key]) > 1 else 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, color=color)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(p["labels"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("teacher val acc − kd student val acc (points)")
    ax.set_ylabel("paired Δ test acc to kd (points)")
    ax.set_title("When does ReducedMPL pay? (labels: teacher's labels per class)")
    ax.legend()
    fig.savefig(path, dpi=120)


def measuring_command(argv: list[str]) -> str:
    """The command line that measured the map: this one without ``--report-only`` and ``--evidence PATH``."""
    kept, skip = [], False
    for a in argv:
        if skip or a == "--report-only":
            skip = False
            continue
        if a == "--evidence":
            skip = True
            continue
        kept.append(a)
    return " ".join(shlex.quote(a) for a in ["python", *kept])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mpl-map")
    p.add_argument("--data", default=default_data(fallback=None), help="mnist:DIR (default: the shared MNIST)")
    p.add_argument("--teacher-labels", nargs="+", default=["10", "20", "50", "100", "all"])
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 10.0], help="mpl_weight values tuned on val")
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--report-only", action="store_true", help="only the teachers whose report exists")
    p.add_argument("--evidence", default=None, help="also write the map where `reducedmpl run` reads its advice "
                                                    "(reducedmpl/mpl_map.json)")
    args = p.parse_args()
    t0 = time.perf_counter()
    points = []
    for labels in args.teacher_labels:
        path = Path(args.out) / f"teacher-{labels}" / "map.json"
        if not args.report_only:
            path = run_teacher(args, labels)
        if path.exists():
            points.append(point(labels, json.loads(path.read_text()), args.weights))
    points.sort(key=lambda q: q["gap"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(points, out / "mpl_map.png")
    md = [f"# When the MPL signal pays: {args.data}, student {args.student}, {args.steps} steps", "",
          *table(points), "", f"Plot: {out / 'mpl_map.png'}",
          f"Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
          f"Wall time of this invocation: {(time.perf_counter() - t0) / 60:.1f} min (cached runs are not rerun)."]
    (out / "mpl_map.md").write_text("\n".join(md) + "\n")
    doc = {"command": measuring_command(sys.argv), "data": args.data, "student": args.student,
           "steps": args.steps, "points": points}
    (out / "mpl_map.json").write_text(json.dumps(doc, indent=1))
    if args.evidence:
        Path(args.evidence).write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
