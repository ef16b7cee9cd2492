"""--log tensorboard: every numeric value of metrics.jsonl as a TensorBoard scalar, beside it."""
import json
import sys

import pytest

from conftest import assert_one_line_error, cli


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_distill_logs_every_metrics_row_to_tensorboard(tiny_targets, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "d"
    cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "6", "--set", "log_every=2",
        "--set", "eval_every=3", "--set", "probe_size=0", "--out", out, "--quiet", "--log", "tensorboard")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(out / "tensorboard")
    steps = [r for r in rows if "step" in r and "student_loss" in r]
    assert len(steps) >= 2
    logged = dict(scalars["student_loss"])
    for r in steps:
        assert logged[r["step"]] == pytest.approx(r["student_loss"], rel=1e-6)
    val = [r for r in rows if "val_acc" in r and "step" in r]
    assert dict(scalars["val_acc"]) == pytest.approx({r["step"]: r["val_acc"] for r in val})
    final = next(r for r in rows if r.get("final"))
    assert scalars["final/test_acc"][0][1] == pytest.approx(final["test_acc"])


def test_train_large_logs_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "t"
    cli("train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "2", "--out", out,
        "--set", "data.labeled_per_class=5", "--quiet", "--log", "tensorboard")
    scalars = _scalars(out / "tensorboard")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["epoch"]: r["val_acc"] for r in rows if "epoch" in r}
    assert len(epochs) == 2 and dict(scalars["val_acc"]) == pytest.approx(epochs)


def test_log_refuses_unknown_sinks_and_a_missing_package(tiny_targets, tmp_path, monkeypatch):
    args = ["distill", "--targets", tiny_targets, "--steps", "2", "--out", tmp_path / "d", "--quiet"]
    assert_one_line_error(cli(*args, "--log", "wandb", check=False), "unknown --log 'wandb'", "tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert_one_line_error(cli(*args, "--log", "tensorboard", check=False), "needs the tensorboard package",
                          "pip install tensorboard")
    assert not (tmp_path / "d" / "student.pt").exists()


def test_a_resumed_run_purges_the_events_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from reducedmpl.logsinks import TensorBoardWriter

    first = TensorBoardWriter(tmp_path / "tb")
    for step in range(5):
        first.write({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardWriter(tmp_path / "tb", keep_until=("step", 2))  # the checkpoint was at step 2
    resumed.write({"step": 3, "loss": 30.0})
    resumed.write({"final": True, "test_acc": 0.5})
    resumed.close()
    scalars = _scalars(tmp_path / "tb")
    assert dict(scalars["loss"]) == {0: 0.0, 1: 1.0, 2: 2.0, 3: 30.0}  # step 4 of the killed run is gone
    assert scalars["final/test_acc"] == [(3, 0.5)]
    fresh = TensorBoardWriter(tmp_path / "tb")  # a fresh run starts without the old events
    fresh.close()
    assert "loss" not in _scalars(tmp_path / "tb")
