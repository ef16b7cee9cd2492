import json
import math
import shutil
import signal
import time

import numpy as np
import pytest
import timm
import torch

from conftest import assert_one_line_error, cli, cli_subprocess
from reducedmpl import mpl
from reducedmpl.config import DataConfig, DistillConfig, stage_config
from reducedmpl.data.loading import default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.stages.distill import Distiller, open_store
from reducedmpl.data.setup import setup_data

LOGGED = {"student_loss", "teacher_loss", "h", "baseline", "flip_rate", "entropy_teacher", "entropy_large",
          "train_acc_student", "train_acc_teacher"}


def test_example_command_end_to_end(tiny_targets, tmp_path):
    out = tmp_path / "distill"
    r = cli("distill", "--targets", tiny_targets, "--student", "test_resnet", "--steps", "200", "--out", out,
            "--teacher-grad", "reinforce", "--quiet")
    assert "test acc" in r.stdout
    art = torch.load(out / "student.pt", weights_only=True)
    assert art["kind"] == "student" and art["arch"] == "test_resnet"
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1, checkpoint_path=str(out / "student.pt"))
    assert all(torch.equal(v, art["state_dict"][k]) for k, v in model.state_dict().items())
    assert (out / "reduced_teacher.pt").exists() and (out / "config.yaml").exists()
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["test_acc"] <= 1 and result["mode"] == "reducedmpl"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "student_loss" in r]
    assert len(logged) == 20 and LOGGED <= set(logged[-1])
    assert any("val_acc" in r for r in rows) and any("val_acc_teacher" in r for r in rows)
    # step 0: the untrained reduced teacher is the large teacher
    first = rows[0]
    assert first["step"] == 0 and first["labeled_acc_teacher"] == first["labeled_acc_large"]
    probes = json.loads((out / "probes.json").read_text())
    assert set(probes["snapshots"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    np.testing.assert_allclose(probes["snapshots"]["0.0"], probes["large"], atol=1e-5)
    assert not np.allclose(probes["snapshots"]["1.0"], probes["large"], atol=1e-3)


@pytest.mark.parametrize("mode, extra", [("kd", ["--set", "distill.kd_temperature=2"]),
                                         ("supervised", []),
                                         ("reducedmpl", ["--teacher-grad", "exact", "--set", "exact_method=fd",
                                                         "--set", "distill.kl_weight=0.5"])])
def test_modes_run_on_the_same_loop(tiny_targets, tmp_path, mode, extra):
    out = tmp_path / mode
    cli("distill", "--targets", tiny_targets, "--mode", mode, "--steps", "30", "--out", out, "--quiet",
        "--set", "distill.finetune_steps=5", "--set", "distill.log_every=5", *extra)
    result = json.loads((out / "result.json").read_text())
    assert result["mode"] == mode and result["test_acc"] > 0.1
    assert (out / "reduced_teacher.pt").exists() == (mode == "reducedmpl")


def test_resume_after_kill_gives_the_same_student(tiny_targets, tmp_path):
    args = ["distill", "--targets", tiny_targets, "--steps", "80", "--teacher-grad", "reinforce", "--quiet",
            "--set", "distill.checkpoint_every=10", "--set", "distill.ema=true", "--set", "distill.finetune_steps=10",
            "--set", "data.hflip=true"]
    cli(*args, "--out", tmp_path / "full")
    proc = cli_subprocess(*args, "--out", tmp_path / "cut")
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "student.pt").exists()
    cli(*args, "--out", tmp_path / "cut", "--resume")
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ta = torch.load(tmp_path / "full" / "reduced_teacher.pt", weights_only=True)["state_dict"]
    tb = torch.load(tmp_path / "cut" / "reduced_teacher.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [json.loads(x).get("step") for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s is not None]
    assert steps == sorted(set(steps)), "metrics rows duplicated or out of order after resume"


def test_a_moved_run_and_store_still_resume(tiny_targets, tmp_path, monkeypatch):
    """--resume checks the store's run key, not where it lies: a run and its store moved elsewhere continue."""
    store = tmp_path / "old" / "targets"
    store.mkdir(parents=True)
    for f in tiny_targets.parent.glob("targets*.h5"):
        shutil.copy(f, store / f.name)
    args = ["--steps", "6", "--quiet", "--set", "distill.checkpoint_every=3"]
    calls = []
    original = Distiller.step

    def ctrl_c_at_step_5(self, measure):
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return original(self, measure)

    monkeypatch.setattr(Distiller, "step", ctrl_c_at_step_5)
    r = cli("distill", "--targets", store / "targets.h5", *args, "--out", tmp_path / "old" / "run", check=False)
    assert r.exit_code == 130, r.stderr
    monkeypatch.undo()
    shutil.move(tmp_path / "old", tmp_path / "new")
    # another store of the same data (another run key) is still refused
    other = tmp_path / "other.h5"
    cli("precompute", "--teacher", tiny_targets.parent / "teacher.pt", "--out", other, "--dtype", "float16")
    r = cli("distill", "--targets", other, *args, "--out", tmp_path / "new" / "run", "--resume", check=False)
    assert_one_line_error(r, "other settings (targets_run_key differ)")
    cli("distill", "--targets", tmp_path / "new" / "targets" / "targets.h5", *args, "--out",
        tmp_path / "new" / "run", "--resume")
    assert (tmp_path / "new" / "run" / "student.pt").exists()


def test_refuses_targets_for_other_data(tiny_targets, tmp_path):
    r = cli("distill", "--targets", tiny_targets, "--steps", "5", "--out", tmp_path / "a",
            "--set", "data.source=digits", "--set", "data.labeled_per_class=10", "--set", "data.split_seed=3",
            check=False)
    assert_one_line_error(r, "other data")
    r = cli("distill", "--targets", tmp_path / "none.h5", "--steps", "5", "--out", tmp_path / "b", check=False)
    assert_one_line_error(r, "does not exist")
    r = cli("distill", "--targets", tiny_targets, "--student", "tset_resnet", "--out", tmp_path / "c", check=False)
    assert_one_line_error(r, "unknown timm model", "test_resnet")
    r = cli("distill", "--targets", tiny_targets, "--mode", "mpl", "--out", tmp_path / "d", check=False)
    assert_one_line_error(r, "must be one of")
    assert not (tmp_path / "a" / "student.pt").exists()


@pytest.fixture
def distiller(tiny_targets):
    def make(**kw):
        cfg = stage_config("distill", flags={"steps": 50, **kw})
        store = open_store(tiny_targets, 64)
        data_cfg = DataConfig(**store.meta.config["data"])
        import dataclasses
        cfg = dataclasses.replace(cfg, data=dataclasses.asdict(data_cfg))
        return Distiller(cfg, setup_data(data_cfg), store, torch.device("cpu"))
    return make


def test_in_loop_finite_difference_matches_jvp(distiller):
    d = distiller(teacher_grad="exact")
    for _ in range(3):
        d.step(False)
    x_u, _, _ = d.unlabeled.batcher.batch(0, 0)
    theta = mpl.snapshot_params(d.student.model)
    v = {k: torch.randn_like(p) * 1e-2 for k, p in theta.items()}
    rng = torch.get_rng_state()
    logits = d.student.forward_keep_stats(x_u).detach()  # as the step passes its training forward's output
    J_fd = mpl.directional_loss_derivative(d.student.model, theta, x_u, v, method="fd", base_logits=logits,
                                           rng_state=rng)
    J_jvp = mpl.directional_loss_derivative(d.student.model, theta, x_u, v, method="jvp")
    cos = torch.nn.functional.cosine_similarity(J_fd.flatten(), J_jvp.flatten(), dim=0)
    assert cos > 0.99 and math.isclose(J_fd.norm().item(), J_jvp.norm().item(), rel_tol=0.05)


def test_mpl_step_updates_batchnorm_statistics_once(distiller):
    d = distiller(teacher_grad="exact")
    ref = distiller(mode="kd")  # kd: one plain training forward per step
    d.student.model.load_state_dict(ref.student.model.state_dict())
    d.step(True)
    ref.step(False)
    for (name, a), (_, b) in zip(d.student.model.named_buffers(), ref.student.model.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert a.item() == b.item() == 1, name


def test_config_rejects_bad_distill_values():
    from reducedmpl.errors import ConfigError

    with pytest.raises(ConfigError, match="mpl_weight"):
        stage_config("distill", flags={"mpl_weight": -1.0})
    with pytest.raises(ConfigError, match="did you mean 'teacher_grad'"):
        stage_config("distill", overrides=["distill.teacher_gard=exact"])
    assert isinstance(stage_config("distill"), DistillConfig)


def test_piped_to_a_log_distill_prints_a_line_per_logged_step(tiny_targets, tmp_path):
    """Not a terminal (a log file, CI): no progress bar to watch, so every log_every steps there is a line."""
    r = cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "20", "--out", tmp_path / "d",
            "--set", "distill.log_every=5", "--set", "distill.eval_every=10")
    lines = [line for line in r.stdout.splitlines() if line.startswith("distill kd step ")]
    assert [line.split()[3] for line in lines] == ["5/20", "10/20", "15/20", "20/20"], r.stdout
    assert "val " in lines[1] and "loss " in lines[0]
    quiet = cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "20", "--out", tmp_path / "q",
                "--set", "distill.log_every=5", "--quiet")
    assert "distill kd step" not in quiet.stdout + quiet.stderr


def test_eval_sample_is_evenly_spaced_and_bounded():
    from reducedmpl.stages.distill import eval_sample

    rows = np.arange(10, 1010, 2)
    assert eval_sample(rows, None) is rows and eval_sample(rows, 600) is rows
    sample = eval_sample(rows, 5)
    np.testing.assert_array_equal(sample, rows[[0, 125, 250, 374, 499]])  # both ends, evenly between


def test_labeled_accuracy_reads_a_fixed_sample_of_the_labeled_rows(tiny_targets, tmp_path):
    """With labeled_eval_size 7 every labeled accuracy (student and both teachers) is a count out of 7: the
    periodic evaluation costs the same for any size of labeled set."""
    out = tmp_path / "sampled"
    cli("distill", "--targets", tiny_targets, "--mode", "reducedmpl", "--steps", "4", "--out", out, "--quiet",
        "--set", "distill.labeled_eval_size=7", "--set", "distill.eval_every=2")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "labeled_acc_student" in r]
    assert len(evaluated) >= 2
    for r in evaluated:
        for key in ("labeled_acc_student", "labeled_acc_teacher", "labeled_acc_large"):
            assert r[key] * 7 == pytest.approx(round(r[key] * 7), abs=1e-6)
    assert any(0 < r[k] < 1 for r in evaluated for k in ("labeled_acc_student", "labeled_acc_large"))
