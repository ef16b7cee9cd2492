"""Which mode to pick, from a run's own validation figures and the measured map of when the MPL signal pays.

The map (``mpl_map.json`` beside this module) is written by ``python benchmarks/mpl_map.py --evidence
reducedmpl/mpl_map.json``: for each of several large teachers (trained on 10 to all labels per class), the *gap*
(teacher validation accuracy minus the kd student's, in points) and the paired test-accuracy difference to kd of
ReducedMPL at mpl_weight 0 and at its tuned mpl_weight, over seeds. :func:`advise` finds the measured teacher whose
gap is nearest the run's and recommends the mode that was ahead there by more than twice its standard error, else
kd; it also says which run is best on this run's own validation split, the evidence that counts most.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

MAP_PATH = Path(__file__).with_name("mpl_map.json")


@dataclass(frozen=True)
class MapPoint:
    """One measured teacher of the map: its gap and the per-seed paired Δ test to kd (points)."""

    labels: str  # the teacher's labels per class ("all": every training row)
    gap: float  # teacher val acc − kd student val acc, in points
    mpl0: tuple[float, ...]  # ReducedMPL at mpl_weight 0 − kd, per seed
    tuned: tuple[float, ...]  # ReducedMPL at the tuned mpl_weight − kd, per seed
    tuned_weight: float


def load_map(path: Path = MAP_PATH) -> list[MapPoint]:
    """The measured map; empty when the file is absent (then only the run's own figures are reported)."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    return [MapPoint(str(p["labels"]), float(p["gap"]), tuple(p["mpl0"]), tuple(p["best"]),
                     float(p["tuned"].rsplit("=", 1)[-1])) for p in doc["points"]]


def clear_gain(diffs: Sequence[float]) -> bool:
    """A mean paired gain above twice its standard error (needs two seeds or more)."""
    if len(diffs) < 2:
        return False
    mean = statistics.mean(diffs)
    return mean > 0 and mean > 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def recommend(point: MapPoint) -> str:
    """The mode that paid at a measured teacher: the tuned MPL, the calibration alone, or kd."""
    tuned, mpl0 = clear_gain(point.tuned), clear_gain(point.mpl0)
    if tuned and (not mpl0 or statistics.mean(point.tuned) > statistics.mean(point.mpl0)):
        return f"--mode reducedmpl --mpl-weight {point.tuned_weight:g}"
    if mpl0:
        return "--mode reducedmpl --mpl-weight 0 (the calibration alone; the MPL term added nothing clear)"
    return "--mode kd (no ReducedMPL setting was clearly ahead)"


def advise(teacher_val: float | None, runs: Sequence[Any], points: Sequence[MapPoint] | None = None) -> str | None:
    """One paragraph of advice for a comparison: ``runs`` are report summaries (``run``, ``mode``, ``val``
    fractions per seed), ``teacher_val`` the large teacher's validation accuracy (a fraction). None when the run
    has no kd run or no teacher figure to place it on the map, and no two runs to compare on val."""
    points = load_map() if points is None else points
    val = {r.run: statistics.mean(r.val) for r in runs if r.val and all(v is not None for v in r.val)}
    lines = []
    if len(val) >= 2:
        best = max(val, key=val.get)
        lines.append(f"on this run's validation split the best is {best} ({100 * val[best]:.2f} %)")
    kd = next((r for r in runs if r.mode == "kd" and r.run in val), None)
    if kd is not None and teacher_val is not None and points:
        gap = 100 * (teacher_val - val[kd.run])
        near = min(points, key=lambda p: abs(p.gap - gap))
        lo, hi = min(p.gap for p in points), max(p.gap for p in points)
        inside = lo - 0.005 <= gap <= hi + 0.005  # as shown, to 2 decimals
        outside = "" if inside else f" (outside the measured gaps {lo:+.2f} to {hi:+.2f}: an extrapolation)"
        lines.append(f"teacher val {100 * teacher_val:.2f} % − kd student val {100 * val[kd.run]:.2f} % = "
                     f"{gap:+.2f} points{outside}; on the measured map (benchmarks/mpl_map.py, MNIST) the nearest "
                     f"teacher (gap {near.gap:+.2f}) gave mpl_weight 0 {statistics.mean(near.mpl0):+.2f} and mpl_weight "
                     f"{near.tuned_weight:g} {statistics.mean(near.tuned):+.2f} test points over kd: "
                     f"{recommend(near)}")
    return "advice: " + "; ".join(lines) if lines else None
