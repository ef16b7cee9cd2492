"""``select: best`` keeps the weights that were best on validation, and model selection never looks at the test
split: in ``train-large`` and ``distill``, no test image is evaluated before the weights are chosen.

The validation accuracies the stage sees during training are replaced by a made-up sequence whose best is not the
last evaluation (the real ones of a tiny run could rise to the end, where best and last are the same weights); the
weights evaluated each time are recorded, so the artifact can be compared with those of the best evaluation.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cli
from reducedmpl.engine.stage import StageRun
from reducedmpl.models import safe_load, weights_of
from reducedmpl.stages import distill, train_large

MADE_UP_VAL = [0.5, 0.2, 0.9, 0.3, 0.4]  # distill: steps 0, 3, 6, 9, 12 (the best is step 6)


class Spy:
    """Records which split is evaluated when (``select``: the moment the weights are chosen) and, before that,
    gives validation the made-up accuracies and keeps a copy of the weights evaluated."""

    def __init__(self, monkeypatch, made_up: list[float]):
        self.calls: list[str] = []
        self.weights: list[dict] = []
        self.made_up = made_up
        final_model = StageRun.final_model

        def select(run, model, how):
            self.calls.append("select")
            return final_model(run, model, how)

        monkeypatch.setattr(StageRun, "final_model", select)

    def evaluated(self, split: str, model, result: dict) -> dict:
        selected = "select" in self.calls
        self.calls.append(split)
        if split != "val" or selected:
            return result
        self.weights.append(weights_of(model))
        return {**result, "acc": self.made_up[len(self.weights) - 1]}

    def before_selection(self) -> list[str]:
        return self.calls[:self.calls.index("select")]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_distill_select_best_keeps_the_best_validation_step_and_never_evaluates_test(tiny_targets, tmp_path,
                                                                                      monkeypatch):
    spy = Spy(monkeypatch, MADE_UP_VAL)
    accuracy = distill.Evaluation.accuracy
    monkeypatch.setattr(distill.Evaluation, "accuracy",
                        lambda self, split, model: spy.evaluated(split, model, accuracy(self, split, model)))
    out = tmp_path / "d"
    cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "12", "--out", out, "--quiet",
        "--set", "distill.eval_every=3", "--set", "distill.log_every=3", "--set", "distill.select=best")
    assert "test" not in spy.before_selection()
    assert spy.calls[spy.calls.index("select"):] == ["select", "val", "test"]  # the chosen weights, once
    result = json.loads((out / "result.json").read_text())
    assert result["best_step"] == 6
    student = safe_load(out / "student.pt")["state_dict"]
    assert_same_weights(student, spy.weights[2])
    assert differs(student, spy.weights[-1])  # the last step's weights were another set
    logged = {r["step"]: r["val_acc"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "val_acc" in r and not r.get("final")}
    assert list(logged.values()) == MADE_UP_VAL


@pytest.mark.parametrize("select", ["best", "last"])
def test_train_large_select_keeps_the_best_validation_epoch_and_never_evaluates_test(tmp_path, monkeypatch, select):
    spy = Spy(monkeypatch, [0.2, 0.9, 0.3, 0.4])  # epochs 0..3: the best is epoch 1
    evaluate = train_large.Trainer.evaluate

    def spied(self, split, model=None):
        return spy.evaluated(split, model or self.eval_model(), evaluate(self, split, model))

    monkeypatch.setattr(train_large.Trainer, "evaluate", spied)
    out = tmp_path / "t"
    cli("train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "4", "--out", out, "--quiet",
        "--set", "data.labeled_per_class=8", "--set", f"train_large.select={select}")
    assert spy.before_selection() == ["val"] * 4
    assert spy.calls[4:] == ["select", "val", "test"]
    teacher = safe_load(out / "teacher.pt")
    assert teacher["metrics"]["best_epoch"] == 1
    assert_same_weights(teacher["state_dict"], spy.weights[1 if select == "best" else 3])
    assert differs(spy.weights[1], spy.weights[3])
