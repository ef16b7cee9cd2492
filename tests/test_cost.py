"""Cost figures: parameters, FLOPs from FlopCounterMode, latency, the cache beside an artifact, the table cells."""
import json

import pytest
import torch
from torch import nn

from conftest import cli
from reducedmpl import cost
from reducedmpl.models import model_from_artifact


def test_flops_of_a_linear_layer_are_two_per_multiply_add():
    layer = nn.Linear(12, 5)
    assert cost.flops_per_image(layer, (12,), batch=3) == 2 * 12 * 5
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # the total over a batch: 2 * in * out * batch
        layer(torch.zeros(7, 12))
    assert counter.get_total_flops() == 2 * 12 * 5 * 7


def test_flops_of_a_convolution_and_params_of_a_known_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    assert cost.parameter_count(model) == 3 * 4 * 9 + 2 * 4 + 4 * 36 * 2 + 2  # BN statistics are buffers
    conv = 2 * (3 * 9) * 4 * 36  # 2 FLOPs per multiply-add, per output element
    assert cost.flops_per_image(model, (3, 6, 6)) == conv + 2 * 144 * 2
    assert model.training  # the mode is restored


def test_latency_is_a_median_of_timed_runs_with_the_environment_recorded():
    model = nn.Linear(8, 8)
    lat = cost.measure_latency(model, (8,), batch=4, runs=5, warmup=1)
    assert lat["runs"] == 5 and lat["batch"] == 4 and lat["warmup"] == 1
    assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["max_ms"]
    assert lat["per_image_ms"] == pytest.approx(lat["median_ms"] / 4)
    figures = cost.model_cost(model, (8,), runs=3)
    assert set(figures["latency"]) == {"1", "64"} and figures["threads"] == torch.get_num_threads()
    assert figures["device"] == "cpu" and "latency" not in cost.model_cost(model, (8,), latency=False)


def test_latency_stops_at_its_time_budget():
    lat = cost.measure_latency(nn.Linear(4, 4), (4,), batch=1, runs=10_000, warmup=0, budget_s=0.0)
    assert lat["runs"] == 3  # never fewer than 3


def test_cached_cost_is_kept_beside_the_artifact_until_it_changes(tiny_student, tmp_path):
    import shutil

    artifact = tmp_path / "student.pt"
    shutil.copy(tiny_student, artifact)
    first = cost.cached_cost(artifact, runs=3)
    assert first["arch"] == "test_resnet" and first["size_bytes"] == artifact.stat().st_size
    assert first["params"] == cost.parameter_count(model_from_artifact(torch.load(artifact, weights_only=True)))
    saved = json.loads((tmp_path / "cost.json").read_text())
    saved["cost"]["params"] = -1  # a cached figure is read back, not measured again
    (tmp_path / "cost.json").write_text(json.dumps(saved))
    assert cost.cached_cost(artifact, runs=3)["params"] == -1
    artifact.touch()  # a rewritten artifact is measured again
    assert cost.cached_cost(artifact, runs=3)["params"] == first["params"]
    assert cost.cached_cost(tmp_path / "missing.pt") is None


def test_cost_cells_and_ratios():
    teacher = {"params": 1000, "flops_per_image": 4e6,
               "latency": {"1": {"median_ms": 2.0, "per_image_ms": 2.0, "batch": 1},
                           "64": {"median_ms": 64.0, "per_image_ms": 1.0, "batch": 64}}}
    student = {"params": 250, "flops_per_image": 1e6,
               "latency": {"1": {"median_ms": 1.0, "per_image_ms": 1.0, "batch": 1},
                           "64": {"median_ms": 16.0, "per_image_ms": 0.25, "batch": 64}}}
    assert cost.ratios(student, teacher) == [0.25, 0.25, 0.5, 0.25]
    assert cost.cost_cells(student, teacher) == ["250 (0.25×)", "1 M (0.25×)", "1 (0.50×)", "0.25 (0.25×)"]
    assert cost.cost_cells(teacher, teacher) == ["1 k", "4 M", "2", "1"]
    assert cost.cost_cells(None) == ["n/a"] * 4
    two = cost.mean_cost([student, {**student, "latency": {k: {**v, "median_ms": 3 * v["median_ms"]}
                                                          for k, v in student["latency"].items()}}])
    assert two["latency"]["1"]["median_ms"] == 2.0 and two["latency"]["64"]["per_image_ms"] == 0.5
    assert two["latency"]["1"]["per_seed_ms"] == [1.0, 3.0]


def test_inspect_reports_cost_of_a_student(tiny_student):
    r = cli("inspect", tiny_student, "--json", "--runs", "3")
    report = json.loads(r.stdout)
    c = report["cost"]
    assert c["params"] > 0 and c["flops_per_image"] > 0 and c["size_bytes"] == tiny_student.stat().st_size
    assert c["latency"]["1"]["runs"] == 3 and c["latency"]["64"]["batch"] == 64
    assert c["threads"] >= 1 and c["device"] == "cpu"
    text = cli("inspect", tiny_student, "--no-latency").stdout
    assert "FLOPs per image" in text and "latency" not in text
