"""What the report's plots show (read back from the matplotlib figures, not from the PNG bytes)."""
import numpy as np
import pytest

from reducedmpl import report
from reducedmpl.report import RunData, RunSummary, TeacherSummary


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, in order."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    return saved


def _cost(ms1, ms64, params=1000):
    return {"params": params, "flops_per_image": 10 * params, "device_name": "cpu", "threads": 1,
            "latency": {"1": {"batch": 1, "median_ms": ms1, "per_image_ms": ms1, "per_seed_ms": [ms1]},
                        "64": {"batch": 64, "median_ms": ms64, "per_image_ms": ms64 / 64, "per_seed_ms": [ms64]}}}


def test_accuracy_bars_start_at_zero(figures, tmp_path):
    runs = [RunSummary("kd", "kd", [0, 1], [0.97, 0.98], [0.9, 0.9]),
            RunSummary("mpl", "reducedmpl", [0, 1], [0.975, 0.985], [0.9, 0.9])]
    assert report.plot_accuracy(runs, tmp_path / "a.png", 0.99) is None
    low, high = figures[0].axes[0].get_ylim()
    assert low == 0.0 and high >= 100.0


def test_accuracy_latency_places_the_teacher_and_each_run(figures, tmp_path):
    kd = RunSummary("kd", "kd", [0, 1], [0.90, 0.92], [0.9, 0.9], costs=[_cost(1.0, 32.0), _cost(3.0, 96.0)])
    teacher = TeacherSummary("big", 0.95, 0.94, _cost(4.0, 256.0, params=8000))
    assert report.plot_accuracy_latency([kd], teacher, tmp_path / "l.png") is None
    left, right = figures[0].axes[:2]
    offsets = [c.get_offsets() for c in left.collections if len(c.get_offsets())]
    points = {tuple(np.round(o[0], 6)) for o in offsets}
    assert (4.0, 95.0) in points  # the teacher's star at batch 1
    kd_line = next(line for line in left.lines if len(line.get_xdata()) == 1)
    assert kd_line.get_xdata()[0] == pytest.approx(2.0) and kd_line.get_ydata()[0] == pytest.approx(91.0)
    right_kd = next(line for line in right.lines if len(line.get_xdata()) == 1)
    assert right_kd.get_xdata()[0] == pytest.approx(1.0)  # 64 ms / 64 images, mean of 0.5 and 1.5
    assert left.get_xlim()[0] == 0.0  # a linear axis from 0 when the latencies are close
    assert report.plot_accuracy_latency([RunSummary("x", "kd", [0], [0.5], [0.5])], None, tmp_path / "n.png")


def test_label_correction_keeps_the_reduced_teacher_visible_over_the_large_one(figures, tmp_path):
    rows = [{"step": s, "labeled_acc_large": 0.9, "labeled_acc_teacher": 0.9, "labeled_acc_student": 0.5 + s / 100}
            for s in (0, 10, 20)]
    run = RunData("mpl", "reducedmpl", 0, tmp_path, {"mpl_weight": 1.0}, rows)
    assert report.plot_label_correction({"mpl": [run]}, "mpl", tmp_path / "c.png") is None
    lines = {line.get_label(): line for line in figures[0].axes[0].lines}
    large, reduced = lines["large teacher (stored targets)"], lines["reduced teacher (mpl)"]
    np.testing.assert_array_equal(large.get_ydata(), reduced.get_ydata())  # the same curve here ...
    assert reduced.get_zorder() > large.get_zorder()  # ... drawn on top of the large teacher's,
    assert large.get_linewidth() > 2 * reduced.get_linewidth()  # which is a wide band around it,
    assert reduced.get_linestyle() == "--" and reduced.get_marker() == "s"  # dashed with markers
