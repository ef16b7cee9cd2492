"""The advice under `run`'s comparison: which mode, from the run's own validation figures and the measured map."""
from __future__ import annotations

import json
import statistics

import pytest

from reducedmpl import advice
from reducedmpl.advice import MapPoint, advise, clear_gain, load_map, recommend
from reducedmpl.report import RunSummary


def summary(run: str, mode: str, val: list[float]) -> RunSummary:
    return RunSummary(run, mode, seeds=list(range(len(val))), test=list(val), val=list(val))


WEAK = MapPoint("10", -3.0, (0.4, 0.5, 0.3), (1.5, 1.3, 1.4), 10.0)  # MPL clearly ahead of its ablation
MID = MapPoint("50", 1.0, (0.5, 0.6, 0.55), (0.1, 0.9, -0.4), 1.0)  # only the calibration clearly ahead
STRONG = MapPoint("all", 4.0, (-0.1, 0.1, 0.0), (0.2, -0.3, 0.05), 1.0)  # nothing clear


def test_clear_gain_needs_a_mean_above_twice_its_standard_error():
    assert clear_gain([1.0, 1.1, 0.9])
    assert not clear_gain([1.0, -0.8, 0.9])  # positive mean, but within noise
    assert not clear_gain([-1.0, -1.1, -0.9]) and not clear_gain([2.0]) and not clear_gain([])


def test_recommend_each_case():
    assert recommend(WEAK) == "--mode reducedmpl --mpl-weight 10"
    assert recommend(MID).startswith("--mode reducedmpl --mpl-weight 0 ")
    assert recommend(STRONG).startswith("--mode kd ")


@pytest.mark.parametrize("teacher_val, kd_val, expected", [(0.88, 0.91, WEAK), (0.96, 0.95, MID), (0.99, 0.95, STRONG)])
def test_advise_places_the_run_at_the_nearest_measured_gap(teacher_val, kd_val, expected):
    runs = [summary("kd", "kd", [kd_val, kd_val]), summary("mpl", "reducedmpl", [kd_val + 0.01, kd_val + 0.01])]
    text = advise(teacher_val, runs, [WEAK, MID, STRONG])
    gap = 100 * (teacher_val - kd_val)
    assert text.startswith("advice: on this run's validation split the best is mpl")
    assert f"= {gap:+.2f} points" in text and f"(gap {expected.gap:+.2f})" in text
    assert text.endswith(recommend(expected))
    assert f"mpl_weight 0 {statistics.mean(expected.mpl0):+.2f}" in text
    assert "extrapolation" not in text  # every gap here lies within the map's (-3 to +4)


def test_advise_says_when_the_run_lies_outside_the_measured_gaps():
    runs = [summary("kd", "kd", [0.90, 0.90])]
    text = advise(0.99, runs, [WEAK, MID])  # gap +9 against measured -3 to +1
    assert "= +9.00 points (outside the measured gaps -3.00 to +1.00: an extrapolation);" in text
    assert text.endswith(recommend(MID))


def test_advise_without_kd_or_teacher_reports_only_the_runs_own_validation():
    runs = [summary("a", "reducedmpl", [0.9, 0.92]), summary("b", "reducedmpl", [0.93, 0.95])]
    assert advise(0.97, runs, [WEAK]) == "advice: on this run's validation split the best is b (94.00 %)"
    assert advise(None, [summary("kd", "kd", [0.9])], [WEAK]) is None  # one run, no teacher: nothing to say
    kd_only = advise(0.97, [summary("kd", "kd", [0.9])], [])
    assert kd_only is None  # no map, one run


def test_load_map_reads_what_the_benchmark_writes(tmp_path):
    doc = {"command": "python benchmarks/mpl_map.py", "points": [
        {"labels": "10", "gap": -2.5, "mpl0": [0.1, 0.2], "best": [1.0, 1.2], "tuned": "exact:mpl_weight=10"}]}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    assert load_map(path) == [MapPoint("10", -2.5, (0.1, 0.2), (1.0, 1.2), 10.0)]
    assert load_map(tmp_path / "absent.json") == []


def test_the_shipped_map_is_the_measured_one():
    """The packaged map parses, spans weak to strong teachers, and each point has its per-seed differences."""
    points = load_map(advice.MAP_PATH)
    assert len(points) >= 3
    assert min(p.gap for p in points) < 0 < max(p.gap for p in points)
    assert all(len(p.mpl0) == len(p.tuned) >= 2 for p in points)
