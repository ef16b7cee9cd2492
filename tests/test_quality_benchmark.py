"""benchmarks/quality.py, which schedule.py and mpl_map.py drive: a run cut off resumes where its last checkpoint
left it, with the same result and a step time of the part that ran; the report's title names the students that
ran."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402
import schedule  # noqa: E402

from reducedmpl.stages.distill import Distiller  # noqa: E402


@pytest.fixture(autouse=True)
def keep_threads():
    """quality.py sets torch's thread count for its process; give the suite's back (tests after these compare
    stores made at the suite's count bit for bit)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def bench_args(out: Path, **kw) -> argparse.Namespace:
    base = dict(out=str(out), data="digits", split_seed=0, val_size=200, test_size=200, labels_per_class=5,
                teacher_model="test_resnet", teacher_labels_per_class=None, teacher_epochs=1, teacher_batch=25,
                teacher_lr=1e-3, steps=30, student="test_resnet", shared=None, teacher_randaugment=None,
                randaugment=None, eval_every=10, checkpoint_every=10, threads=1, hide_test=False)
    return argparse.Namespace(**{**base, **kw})


def test_a_run_cut_off_resumes_from_its_checkpoint_with_the_same_result(tmp_path, monkeypatch):
    args = bench_args(tmp_path / "bench")
    quality.teacher_and_targets(args)
    whole = quality.distill_one(vars(bench_args(tmp_path / "whole", shared=args.out)), "kd", 0)

    original, calls = Distiller.step, []

    def killed_at_step_25(self, measure):  # the process dies inside step 25: no checkpoint there
        if self.step_count == 24:
            calls.append(self.step_count)
            raise RuntimeError("killed")
        return original(self, measure)

    monkeypatch.setattr(Distiller, "step", killed_at_step_25)
    with pytest.raises(RuntimeError, match="killed"):
        quality.distill_one(vars(args), "kd", 0)
    run_dir = quality.run_folder(args, "kd") / "seed0"
    assert calls == [24] and not (run_dir / "result.json").exists()
    assert quality.resume_step(run_dir) == 20  # the last periodic checkpoint
    monkeypatch.undo()

    resumed = quality.distill_one(vars(args), "kd", 0)
    assert (resumed["val_acc"], resumed["test_acc"]) == (whole["val_acc"], whole["test_acc"])
    a, b = (torch.load(d / "student.pt", weights_only=True)["state_dict"]
            for d in (run_dir, quality.run_folder(bench_args(tmp_path / "whole"), "kd") / "seed0"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same student, bit for bit
    timing = json.loads((run_dir / "timing.json").read_text())
    assert timing["steps"] == 10 and timing["seconds"] == resumed["train_seconds"]
    assert quality.seconds_per_step(run_dir) == pytest.approx(resumed["train_seconds"] / 10)
    assert quality.distill_one(vars(args), "kd", 0) == resumed  # finished: read back, not run again
    # the schedule benchmark's step times read the same figure
    out = tmp_path / "schedule"
    (out / "steps-30" / "distill").mkdir(parents=True)
    (run_dir.parent).rename(out / "steps-30" / "distill" / "kd")
    assert schedule.step_seconds(out, 30, "kd", "test_resnet") == [pytest.approx(resumed["train_seconds"] / 10)]


def test_the_report_title_names_the_students_that_ran(tmp_path):
    args = bench_args(tmp_path, _teacher={"val_acc": 0.9, "test_acc": 0.9})
    run = {"val_acc": 0.8, "test_acc": 0.7}
    text, _ = quality.build_report(args, {"kd": {0: run}, "kd:student=resnet10t": {0: run}}, "cmd", 60.0)
    assert "student resnet10t, test_resnet," in text.splitlines()[0]
    text, _ = quality.build_report(bench_args(tmp_path, student="resnet10t", _teacher=args._teacher),
                                   {"kd": {0: run}}, "cmd", 60.0)
    assert "student resnet10t," in text.splitlines()[0] and "test_resnet" not in text.splitlines()[0]


def fake_length(out: Path, steps: int, accs: dict[str, tuple[list[float], list[float]]],
                seconds: dict[str, float]) -> dict:
    """schedule.py's view of one schedule length: quality.py's report (test and val accuracies per seed) and each
    run's result.json with its training seconds."""
    variants = {}
    for spec, (test, val) in accs.items():
        variants[spec] = {"seeds": list(range(len(test))), "test_acc": test, "val_acc": val}
        for s in range(len(test)):
            d = quality.run_folder(argparse.Namespace(out=str(out / f"steps-{steps}"), student="test_resnet"), spec)
            (d / f"seed{s}").mkdir(parents=True)
            (d / f"seed{s}" / "result.json").write_text(json.dumps({"train_seconds": seconds[spec] * steps,
                                                                    "steps": steps}))
    return {"variants": variants, "teacher": {"val_acc": 0.98, "test_acc": 0.97}}


def test_schedule_picks_the_best_stored_variant_on_val_and_marks_each_target(tmp_path):
    online, fm, views8 = "online-kd", "online-kd:online_mix=mixup", "kd:views=8"
    accs = {"kd": ([97.0, 97.2], [97.0, 97.0]), online: ([97.5, 97.5], [97.0, 97.0]),
            fm: ([97.8, 97.8], [97.0, 97.0]),
            views8: ([97.5, 97.3], [98.0, 98.0]),            # best on val, not on test
            "kd:views=32": ([97.9, 97.9], [97.1, 97.1]),    # best on test: never chosen by it
            "kd:views=32,view_mix=mixup": ([97.95, 98.0], [97.0, 97.0]),
            "exact:mpl_weight=0,views=8": ([97.4, 97.4], [98.0, 98.0]),
            "exact:mpl_weight=1,views=8": ([97.6, 97.5], [98.0, 98.0])}
    seconds = {spec: 0.1 for spec in accs} | {online: 0.3, fm: 0.3, "kd:views=32": 0.2}
    report = fake_length(tmp_path, 500, accs, seconds)
    assert schedule.best_stored(report) == views8
    args = argparse.Namespace(out=str(tmp_path), student="test_resnet")
    lines = schedule.targets(args, {500: report})
    assert lines[0] == "Targets at 500 steps:"
    assert lines[1].endswith(": met") and lines[2].endswith(": met")  # 97.8 ≥ 97.5 ≥ 97.1 and 97.975 ≥ 97.9 ≥ 97.1
    views = {line.split(" within")[0]: line for line in lines if " within 0.2 points" in line}
    assert views["- kd:views=8"].endswith("(0.33×): met")           # −0.10 points at a third of the step time
    assert views["- kd:views=32"].endswith("(0.67×): missed")       # +0.40 points, but at two thirds
    assert "(+0.18)" in views["- kd:views=32,view_mix=mixup"] and views["- kd:views=32,view_mix=mixup"].endswith("met")
    assert lines[-1].startswith("- ReducedMPL over the best stored variant (97.55)") and lines[-1].endswith(": met")
    rows = schedule.rows(args, 500, report)
    row = next(r for r in rows if r.startswith("| 500 | kd:views=8 |"))
    assert "| +0.30 ± 0.28 | -0.10 ± 0.14 | 0.33× | 2 |" in row
    # one variant ahead of its own ablation by nothing: the last target is missed
    accs["exact:mpl_weight=1,views=8"] = ([97.4, 97.4], [98.0, 98.0])
    report = fake_length(tmp_path / "b", 500, accs, seconds)
    assert schedule.targets(argparse.Namespace(out=str(tmp_path / "b"), student="test_resnet"),
                            {500: report})[-1].endswith(": missed")
    schedule.plot({500: report, 1000: report}, tmp_path / "schedule.png")
    assert (tmp_path / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
