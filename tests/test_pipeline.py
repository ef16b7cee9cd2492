"""``reducedmpl run``: keys, caching, resume, --force, --dry-run, the comparison and bad pipeline files.

One tiny pipeline (test_resnet, 1 epoch, a few distill steps) is run once per session; tests that change it work
on a copy of its run folder.
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, assert_one_line_error, cli
from reducedmpl.report import aggregate, comparison_markdown, mean_std

TINY = {
    "name": "tiny",
    "data": {"source": "digits", "labeled_per_class": 10},
    "train_large": {"model": "test_resnet", "epochs": 1, "batch_size": 32},
    "precompute": {"dtype": "float32", "shards": 2},
    "distill": {"student": "test_resnet", "steps": 6, "batch_size": 16, "unlabeled_batch_size": 32,
                "eval_every": 3, "log_every": 3, "checkpoint_every": 3, "probe_size": 4},
}
COMPARE = {"seeds": [0, 1], "runs": [{"name": "supervised", "mode": "supervised"}, {"name": "kd", "mode": "kd"},
                                     {"name": "mpl", "mode": "reducedmpl", "mpl_weight": 1.0}]}
PLOTS = ("accuracy.png", "accuracy_latency.png", "learning_curves.png", "mpl_signal.png", "label_correction.png",
         "target_distributions.png")


def write_pipeline(folder: Path, doc: dict, name: str = "pipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(pipeline: Path, root: Path, *args: str, check: bool = True):
    return cli("run", pipeline, "--out-root", root, "--quiet", *args, check=check)


def copy_root(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(src, dst, symlinks=True)
    return dst


def folder_of(root: Path, label: str) -> Path:
    index = json.loads((root / "tiny" / "index.json").read_text())
    return root / "tiny" / next(e["folder"] for e in index["stages"] if e["label"] == label)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads per process spin against each other (measured:
    a 1-epoch tiny pipeline 3-5x slower), and these models are too small to gain from a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_thread, tmp_path_factory) -> tuple[Path, Path, str]:
    """The tiny pipeline without a compare section, run once: (pipeline file, out root, stdout)."""
    folder = tmp_path_factory.mktemp("pipeline")
    path = write_pipeline(folder, TINY)
    result = run(path, folder / "runs")
    return path, folder / "runs", result.stdout


@pytest.fixture(scope="module")
def compared(tiny, tmp_path_factory) -> tuple[Path, str]:
    """The tiny pipeline with a compare section (3 runs x 2 seeds) over a copy of the tiny run: (root, stdout)."""
    _, root, _ = tiny
    folder = tmp_path_factory.mktemp("compare")
    root = copy_root(root, folder)
    path = write_pipeline(folder, {**TINY, "compare": COMPARE})
    return root, run(path, root).stdout


# ---------------------------------------------------------------------------------------------- caching
def test_first_run_writes_keyed_folders_index_and_links(tiny):
    _, root, out = tiny
    run_dir = root / "tiny"
    index = json.loads((run_dir / "index.json").read_text())
    assert [e["label"] for e in index["stages"]] == ["large", "targets", "distill-reducedmpl-0"]
    for e in index["stages"]:
        assert e["folder"] == f"{e['label']}-{e['key'][:8]}"
        assert (run_dir / e["label"]).resolve() == (run_dir / e["folder"]).resolve()  # the stable link
        assert json.loads((run_dir / e["folder"] / "stage.json").read_text())["key"] == e["key"]
    assert (run_dir / "large" / "teacher.pt").exists() and (run_dir / "targets" / "targets.h5").exists()
    assert (run_dir / "distill-reducedmpl-0" / "student.pt").exists()
    assert out.count(": running ->") == 3 and "skipped" not in out
    assert (run_dir / "comparison.md").exists() and (run_dir / "report" / "report.md").exists()


def test_second_run_skips_every_stage(tiny, tmp_path):
    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    student = folder_of(root, "distill-reducedmpl-0") / "student.pt"
    before = student.stat().st_mtime_ns
    out = run(path, root).stdout
    assert out.count("skipped, up to date") == 3 and "running" not in out
    assert "report (up to date)" in out  # same stages, same index: nothing to redraw
    assert student.stat().st_mtime_ns == before


def test_one_run_at_a_time_per_run_folder(tiny, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    with open(root / "tiny" / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another `reducedmpl run` would
        assert_one_line_error(run(path, root, check=False), "another `reducedmpl run` is working")
        assert "would be computed" in run(path, root, "--dry-run").stdout  # a dry run writes nothing: no lock


def test_changed_distill_setting_reruns_only_distill(tiny, tmp_path):
    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    old = folder_of(root, "distill-reducedmpl-0")
    out = run(path, root, "--set", "distill.steps=3").stdout
    assert "[1/3] large" in out and out.count("skipped, up to date") == 2
    assert "[3/3] distill-reducedmpl-0" in out and out.count(": running ->") == 1
    new = folder_of(root, "distill-reducedmpl-0")
    assert new != old and old.exists()  # the old key's folder stays: switching back is a cache hit
    assert json.loads((new / "result.json").read_text())["steps"] == 3
    again = run(path, root).stdout  # back to the file's setting
    assert again.count("skipped, up to date") == 3


def test_changed_teacher_setting_reruns_everything(tiny, tmp_path):
    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    out = run(path, root, "--set", "train_large.epochs=2", "--set", "distill.steps=3").stdout
    assert out.count(": running ->") == 3 and "skipped" not in out


def test_force_reruns_that_stage_and_those_after(tiny, tmp_path):
    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    out = run(path, root, "--force", "precompute").stdout
    assert "[1/3] large (key" in out and out.count("skipped, up to date") == 1
    assert out.count(": running ->") == 2
    assert_one_line_error(run(path, root, "--force", "distil", check=False), "--force", "did you mean 'distill'")


def test_interrupted_distill_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    from reducedmpl.stages import distill

    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    folder = folder_of(root, "distill-reducedmpl-0")
    expected = json.loads((folder / "result.json").read_text())
    shutil.rmtree(folder)
    step = distill.Distiller.step

    def interrupted(self, measure):
        if self.step_count == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return step(self, measure)

    monkeypatch.setattr(distill.Distiller, "step", interrupted)
    assert run(path, root, check=False).exit_code == 130
    assert (folder / "last.pt").exists() and not (folder / "student.pt").exists()
    monkeypatch.setattr(distill.Distiller, "step", step)
    plan = run(path, root, "--dry-run").stdout
    assert "resume" in plan
    out = run(path, root).stdout
    assert "distill-reducedmpl-0 (key" in out and ": resuming ->" in out and out.count("skipped") == 2
    result = json.loads((folder / "result.json").read_text())
    assert result["test_acc"] == expected["test_acc"] and result["val_acc"] == expected["val_acc"]


def test_interrupted_precompute_is_planned_as_resume(tiny, tmp_path):
    path, root, _ = tiny
    root = copy_root(root, tmp_path)
    (folder_of(root, "targets") / "targets.h5").unlink()  # the master goes last: shards without it = interrupted
    out = run(path, root, "--dry-run").stdout
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert "cached" in rows["large"] and "resume" in rows["targets"] and " run " in rows["distill-reducedmpl-0"]


def test_dry_run_prints_the_plan_and_computes_nothing(tiny, tmp_path):
    path, root, _ = tiny
    fresh = tmp_path / "fresh"
    out = run(path, fresh, "--dry-run").stdout
    assert not fresh.exists()
    index = json.loads((root / "tiny" / "index.json").read_text())
    for e in index["stages"]:  # keys do not depend on where the run folder is
        assert e["label"] in out and e["key"][:8] in out
    assert "3 of 3 stages would be computed" in out
    cached = run(path, root, "--dry-run").stdout
    assert "0 of 3 stages would be computed" in cached and cached.count("cached") == 3


# ---------------------------------------------------------------------------------------------- comparison
def test_aggregate_mean_std_and_paired_difference():
    rows = [{"run": "kd", "mode": "kd", "seed": 0, "test_acc": 0.90, "val_acc": 0.80},
            {"run": "kd", "mode": "kd", "seed": 1, "test_acc": 0.92, "val_acc": 0.84},
            {"run": "mpl", "mode": "reducedmpl", "seed": 1, "test_acc": 0.95, "val_acc": 0.85},
            {"run": "mpl", "mode": "reducedmpl", "seed": 0, "test_acc": 0.91, "val_acc": 0.81},
            {"run": "one", "mode": "supervised", "seed": 0, "test_acc": 0.70, "val_acc": 0.60}]
    kd, mpl, one = aggregate(rows, baseline="kd")
    assert [kd.run, mpl.run, one.run] == ["kd", "mpl", "one"]
    np.testing.assert_allclose(mpl.test_stats, (0.93, math.sqrt(2 * 0.02 ** 2)))
    np.testing.assert_allclose(kd.val_stats, (0.82, math.sqrt(2 * 0.02 ** 2)))
    np.testing.assert_allclose(mpl.diff, [0.01, 0.03])  # seed 0 with seed 0, seed 1 with seed 1
    np.testing.assert_allclose(mpl.diff_stats, (0.02, math.sqrt(2 * 0.01 ** 2)))
    assert kd.diff is None and one.diff == [pytest.approx(-0.20)] and math.isnan(one.test_stats[1])
    table = comparison_markdown([kd, mpl, one], "kd")
    assert "| mpl | reducedmpl | 2 | 93.00 ± 2.83 | 83.00 ± 2.83 | +2.00 ± 1.41 |" in table
    assert "| one | supervised | 1 | 70.00 | 60.00 | -20.00 |" in table
    assert all(math.isnan(v) for v in mean_std([]))
    no_base = aggregate(rows, baseline=None)
    assert all(s.diff is None for s in no_base) and "Δ" not in comparison_markdown(no_base)


def test_comparison_table_is_computed_from_result_json(compared):
    root, out = compared
    run_dir = root / "tiny"
    index = json.loads((run_dir / "index.json").read_text())
    results: dict[str, dict[int, dict]] = {}
    for e in index["stages"]:
        if e["stage"] == "distill":
            results.setdefault(e["run"], {})[e["seed"]] = json.loads((run_dir / e["folder"] / "result.json").read_text())
    assert set(results) == {"supervised", "kd", "mpl"} and all(set(r) == {0, 1} for r in results.values())
    import csv

    rows = {r["run"]: r for r in csv.DictReader(open(run_dir / "comparison.csv"))}
    for name, by_seed in results.items():
        test = [by_seed[s]["test_acc"] for s in (0, 1)]
        assert float(rows[name]["test_acc_mean"]) == pytest.approx(np.mean(test), abs=1e-6)
        assert float(rows[name]["test_acc_std"]) == pytest.approx(np.std(test, ddof=1), abs=1e-6)
        val = [by_seed[s]["val_acc"] for s in (0, 1)]
        assert float(rows[name]["val_acc_mean"]) == pytest.approx(np.mean(val), abs=1e-6)
        if name != "kd":
            diff = [by_seed[s]["test_acc"] - results["kd"][s]["test_acc"] for s in (0, 1)]
            assert float(rows[name]["diff_test_mean"]) == pytest.approx(np.mean(diff), abs=1e-6)
        assert f"{100 * np.mean(test):.2f}" in out  # the terminal table
    assert out.count("skipped, up to date") == 2  # large and targets came from the tiny run
    md = (run_dir / "comparison.md").read_text()
    assert "Δ test vs kd" in md and "| mpl | reducedmpl | 2 |" in md
    # the advice under the table, in the terminal and in comparison.md: the best run on val, and the run placed on
    # the measured map by its teacher's and kd student's validation accuracy
    val = {name: np.mean([by_seed[s]["val_acc"] for s in (0, 1)]) for name, by_seed in results.items()}
    best = max(val, key=val.get)
    large = [json.loads(x) for x in (run_dir / "large" / "metrics.jsonl").read_text().splitlines()]
    gap = 100 * (next(r for r in reversed(large) if r.get("final"))["val_acc"] - val["kd"])
    for text in (" ".join(out.split()), md):
        assert f"advice: on this run's validation split the best is {best} ({100 * val[best]:.2f} %)" in text
        assert f"= {gap:+.2f} points" in text and "; on the measured map (benchmarks/mpl_map.py, MNIST)" in text


def test_comparison_has_measured_cost_of_the_teacher_and_each_student(compared):
    """Parameters, FLOPs and latency columns with student / teacher ratios, from each artifact's cost.json."""
    import csv

    root, out = compared
    run_dir = root / "tiny"
    teacher = json.loads((run_dir / "large" / "cost.json").read_text())["cost"]
    student = json.loads((run_dir / "distill-kd-0" / "cost.json").read_text())["cost"]
    assert teacher["params"] == student["params"] > 0  # both are test_resnet here
    assert {"1", "64"} == set(teacher["latency"]) and teacher["threads"] == torch.get_num_threads()
    for header in ("params", "FLOPs/img", "ms b1", "ms/img b64"):
        assert header in out
    assert "large teacher" in out and "(1.00×)" in out  # the ratio of the same architecture
    rows = {r["run"]: r for r in csv.DictReader(open(run_dir / "comparison.csv"))}
    assert int(float(rows["large teacher"]["params"])) == teacher["params"]
    assert float(rows["kd"]["flops_per_image"]) == student["flops_per_image"]
    assert float(rows["kd"]["params_vs_teacher"]) == 1.0
    kd_b1 = [json.loads((run_dir / f"distill-kd-{s}" / "cost.json").read_text())["cost"]["latency"]["1"]["median_ms"]
             for s in (0, 1)]
    assert float(rows["kd"]["latency_ms_b1"]) == pytest.approx(np.mean(kd_b1), rel=1e-5)  # mean over seeds
    assert float(rows["kd"]["latency_ms_b1_vs_teacher"]) == pytest.approx(
        np.mean(kd_b1) / teacher["latency"]["1"]["median_ms"], rel=1e-4)
    md = (run_dir / "comparison.md").read_text()
    assert md.count("| large teacher | teacher (test_resnet) | 1 |") == 1 and "torch thread" in md


def test_report_writes_every_plot(compared):
    root, _ = compared
    report_dir = root / "tiny" / "report"
    for name in PLOTS:
        data = (report_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name
    md = (report_dir / "report.md").read_text()
    assert all(f"]({name})" in md for name in PLOTS) and "| kd | kd | 2 |" in md
    r = cli("report", root / "tiny", "--out", root / "again")
    assert "mpl" in r.stdout and all((root / "again" / name).exists() for name in PLOTS)


def test_report_skips_plots_without_data(tmp_path):
    """A run with only a kd distill: no MPL signal and no analyses of the reduced teacher, each with a note."""
    run_dir = tmp_path / "kdonly"
    (run_dir / "distill-kd-0-aaaa").mkdir(parents=True)
    (run_dir / "index.json").write_text(json.dumps({"name": "kdonly", "baseline": "kd", "stages": [
        {"label": "distill-kd-0", "stage": "distill", "key": "a" * 64, "folder": "distill-kd-0-aaaa", "run": "kd",
         "mode": "kd", "seed": 0}]}))
    (run_dir / "distill-kd-0-aaaa" / "result.json").write_text(json.dumps({"test_acc": 0.9, "val_acc": 0.8}))
    (run_dir / "distill-kd-0-aaaa" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "val_acc": 0.5 + s / 100}) + "\n" for s in (0, 10, 20)))
    from reducedmpl.report import write_report

    report = write_report(run_dir)
    assert report.plots == ["accuracy.png", "learning_curves.png"]
    assert any("no reducedmpl run" in n for n in report.notes) and len(report.notes) == 4
    assert any("no measured latency" in n for n in report.notes)  # no student.pt: no accuracy-latency plot
    assert "## Skipped" in report.path.read_text()
    assert not (run_dir / "report" / "mpl_signal.png").exists()


def test_inspect_reduced_teacher(tiny, tmp_path):
    _, root, _ = tiny
    path = root / "tiny" / "distill-reducedmpl-0" / "reduced_teacher.pt"
    r = cli("inspect", path)
    assert "reduced teacher" in r.stdout and "hidden 128" in r.stdout and "sound" in r.stdout
    art = torch.load(path, weights_only=True)
    name = next(iter(art["state_dict"]))
    art["state_dict"][name] = torch.full_like(art["state_dict"][name], float("nan"))
    torch.save(art, tmp_path / "nan.pt")
    r = cli("inspect", tmp_path / "nan.pt", check=False)
    assert r.exit_code == 1 and "NaN/Inf" in r.stdout
    del art["state_dict"][name]
    torch.save(art, tmp_path / "missing.pt")
    r = cli("inspect", tmp_path / "missing.pt", "--json", check=False)
    assert r.exit_code == 1 and "does not load strictly" in r.stdout


# ---------------------------------------------------------------------------------------------- pipeline files
@pytest.mark.parametrize("name, sets", [
    ("digits", []),
    ("mnist", ["data.source=mnist:{data}"]),
    ("cifar10", ["data.source=cifar10:{data}", "train_large.init=checkpoint:{ckpt}"]),
    ("imagenet", ["data.source=folder:{data}", "train_large.init=checkpoint:{ckpt}"]),
])
def test_reference_pipelines_dry_run(name, sets, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "teacher.pth").write_bytes(b"")
    args = [a for s in sets for a in ("--set", s.format(data=tmp_path / "data", ckpt=tmp_path / "teacher.pth"))]
    out = run(REPO / "pipelines" / f"{name}.yaml", tmp_path / "runs", "--dry-run", *args).stdout
    assert "large" in out and "targets" in out and "distill-" in out and "would be computed" in out
    assert not (tmp_path / "runs").exists()


def test_reference_pipeline_without_its_data_is_one_line(tmp_path):
    r = run(REPO / "pipelines" / "cifar10.yaml", tmp_path / "runs", "--dry-run", check=False)
    assert_one_line_error(r, "does not exist")


@pytest.mark.parametrize("change, fragments", [
    ({"distil": {}}, ["unknown section 'distil'", "did you mean 'distill'"]),
    ({"distill": {"stepz": 3}}, ["distill.stepz", "did you mean 'steps'"]),
    ({"compare": {"runs": [{"name": "a", "mpl_weigth": 1}]}}, ["mpl_weigth", "did you mean 'mpl_weight'"]),
    ({"compare": {"runz": []}}, ["compare.runz", "did you mean 'runs'"]),
    ({"compare": {"runs": [{"name": "a", "mpl_weight": -1}]}}, ["compare run 'a'", "mpl_weight must be >= 0"]),
    ({"compare": {"runs": [{"mode": "kd"}]}}, ["compare.runs[0].name"]),
    ({"compare": {"runs": [{"name": "kd"}], "baseline": "kdd"}}, ["compare.baseline", "did you mean 'kd'"]),
    ({"distill": {"data": {"labeled_per_clas": 3}}}, ["labeled_per_clas", "did you mean 'labeled_per_class'"]),
    ({"train_large": {"model": "resnet_nope"}}, ["resnet_nope"]),
])
def test_bad_pipeline_files_are_one_line_errors(change, fragments, tmp_path):
    path = write_pipeline(tmp_path, {**TINY, **change})
    assert_one_line_error(run(path, tmp_path / "runs", "--dry-run", check=False), *fragments)


def test_bad_set_is_one_line_error(tiny, tmp_path):
    path, _, _ = tiny
    assert_one_line_error(run(path, tmp_path, "--dry-run", "--set", "distil.steps=3", check=False),
                          "did you mean 'distill'")
    assert_one_line_error(run(path, tmp_path, "--dry-run", "--set", "distill.steps=-3", check=False),
                          "steps must be >= 0")


# ---------------------------------------------------------------------------------------------- the demo
@pytest.mark.slow
def test_digits_pipeline_end_to_end(tmp_path):
    out = run(REPO / "pipelines" / "digits.yaml", tmp_path).stdout
    assert "comparison" in out
    again = run(REPO / "pipelines" / "digits.yaml", tmp_path).stdout
    assert "running" not in again
    final = [json.loads(line) for line in (tmp_path / "digits" / "large" / "metrics.jsonl").read_text().splitlines()]
    assert final[-1]["test_acc"] >= 0.97


def test_stage_keys_count_the_processes_of_training_stages(tmp_path, monkeypatch):
    """1 and N processes train different networks (per-rank BatchNorm statistics), so a run under torchrun does
    not reuse one-process results; a targets store is the same for any number, so its own key ignores it."""
    from reducedmpl.pipeline import load_pipeline, plan, stage_key

    path = write_pipeline(tmp_path, TINY)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = plan(load_pipeline(path), tmp_path / "runs")
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = plan(load_pipeline(path), tmp_path / "runs")
    assert one[0].key != two[0].key and one[-1].key != two[-1].key
    large = one[0]
    assert stage_key("precompute", one[1].config, large) == one[1].key  # same teacher: same store key


@pytest.mark.parametrize("setting", ["data.num_workers=2", "data.start_method=spawn", "distill.memory_budget_mb=1"])
def test_speed_only_settings_keep_every_stage_key(setting, tmp_path):
    """Worker count, how workers start and the store's memory budget never change a result, so a cached stage is
    reused when they change; a setting that does change results (the split seed) changes every key."""
    from reducedmpl.pipeline import load_pipeline, plan

    path = write_pipeline(tmp_path, TINY)
    keys = [s.key for s in plan(load_pipeline(path), tmp_path / "runs")]
    assert [s.key for s in plan(load_pipeline(path, [setting]), tmp_path / "runs")] == keys
    changed = [s.key for s in plan(load_pipeline(path, ["data.split_seed=7"]), tmp_path / "runs")]
    assert all(a != b for a, b in zip(changed, keys))
