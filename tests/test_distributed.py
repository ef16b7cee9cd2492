"""Every stage under ``torchrun`` with 2 CPU processes (gloo), on digits with tiny models.

Each launch starts two Python processes that import torch, so these tests take a few seconds each; every
``torchrun`` call has a timeout, so a hang fails the test instead of the suite.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from reducedmpl import distributed
from reducedmpl.config import DataConfig
from reducedmpl.data.loading import Batcher, default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.engine.runs import read_jsonl
from reducedmpl.errors import ConfigError
from reducedmpl.targets import TargetStore

LAUNCH_TIMEOUT = 300


def torchrun(*args, nproc: int = 2, cwd: Path | None = None, timeout: int = LAUNCH_TIMEOUT,
             check: bool = True, literal: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m reducedmpl ARGS`` (or a script when ARGS[0] ends in .py);
    ``literal``: ``torchrun ... reducedmpl ARGS`` in the repository folder, the form DESIGN.md and the README give."""
    target = ["-m", "reducedmpl"] if not str(args[0]).endswith(".py") else []
    if literal:
        target, cwd = ["reducedmpl"], REPO
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *target, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "REDUCEDMPL_DIST_TIMEOUT": "120"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r


def single(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "reducedmpl", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


# ---------------------------------------------------------------------------------------------- no processes
def test_ranks_split_each_global_batch_without_overlap():
    source = load_source("digits")
    cfg = DataConfig(source="digits")
    splits = make_splits(source, cfg)
    rows = splits.indices["labeled"]
    prep = default_preprocess(source, rows, cfg)
    one = Batcher(source, rows, prep, cfg, batch_size=8, train=True, seed=3, drop_last=True)
    ranks = [Batcher(source, rows, prep, cfg, batch_size=8, train=True, seed=3, drop_last=True,
                     dist=distributed.Dist(r, 2, r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for b in (0, 1, len(one) - 1):
        ids = [r.batch(1, b)[2] for r in ranks]
        assert len(ids[0]) == len(ids[1]) == 4
        assert sorted(torch.cat(ids).tolist()) == sorted(one.batch(1, b)[2].tolist())
    # the last short evaluation batch may leave a rank with no rows; that is an empty batch, not an error
    evals = [Batcher(source, rows[:9], prep, cfg, batch_size=8, train=False, seed=0,
                     dist=distributed.Dist(r, 2, r)) for r in range(2)]
    assert [len(e.batch(0, 1)[2]) for e in evals] == [1, 0]
    assert evals[1].batch(0, 1)[0].shape[1:] == evals[0].batch(0, 1)[0].shape[1:]


def test_global_batch_must_split_evenly():
    distributed.check_divisible("distill.batch_size", 8, distributed.Dist(0, 2, 0))
    with pytest.raises(ConfigError, match="multiple of 3"):
        distributed.check_divisible("distill.batch_size", 8, distributed.Dist(0, 3, 0))


def test_one_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup(torch.device("cpu"))
    assert (d.rank, d.world_size, d.enabled, d.is_main) == (0, 1, False, True)
    assert d.mean([1.0, 3.0]) == [1.0, 3.0] and d.on_main(lambda: 5) == 5 and d.gather("x") == ["x"]


# ---------------------------------------------------------------------------------------------- 2 processes
def test_train_large_two_processes(tmp_path):
    r = torchrun("train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "2", "--batch-size", "16",
                 "--out", tmp_path / "t", "--set", "data.labeled_per_class=10", "--quiet", literal=True)
    art = torch.load(tmp_path / "t" / "teacher.pt", weights_only=True)
    assert art["kind"] == "teacher" and art["metrics"]["test_acc"] is not None
    rows = read_jsonl(tmp_path / "t" / "metrics.jsonl")
    assert [r.get("epoch") for r in rows if "epoch" in r] == [0, 1]  # rank 0 alone writes the log
    assert r.stdout.count("teacher test_resnet:") == 1 and (r.stdout + r.stderr).count("epoch 2/2") == 1
    assert not (tmp_path / "t" / "last.pt").exists()
    # an odd global batch cannot be split over 2 processes: one line, from rank 0 only
    bad = torchrun("train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "1", "--batch-size",
                   "15", "--out", tmp_path / "odd", "--quiet", check=False)
    assert bad.returncode != 0
    assert [line for line in bad.stderr.splitlines() if "error" in line and "batch_size=15" in line] \
        == ["error: train_large.batch_size=15 does not split evenly over 2 processes — use a multiple of 2 (it is "
            "the global batch, split across processes)"]


def test_precompute_store_is_the_same_with_one_or_two_processes(tiny_teacher, tmp_path):
    single("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "one" / "targets.h5", "--shards", "3",
           "--dtype", "float32")
    r = torchrun("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "two" / "targets.h5", "--shards",
                 "3", "--dtype", "float32")
    assert r.stdout.count("3/3 shards computed") == 1
    with TargetStore.open(tmp_path / "one" / "targets.h5") as a, TargetStore.open(tmp_path / "two" /
                                                                                  "targets.h5") as b:
        assert a.meta.run_key == b.meta.run_key
        ids = np.concatenate([a.ids_in_split(s) for s in ("labeled", "unlabeled", "val", "test")])
        assert len(ids) == 1797
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    # rerunning under torchrun finds the store complete
    again = torchrun("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "two" / "targets.h5",
                     "--shards", "3", "--dtype", "float32")
    assert again.stdout.count("is up to date") == 1


@pytest.mark.parametrize("teacher_grad", ["exact", "reinforce"])
def test_distill_reduced_teacher_stays_identical_on_every_rank(tiny_targets, tmp_path, teacher_grad):
    targets = tiny_targets
    torchrun(REPO / "tests" / "ddp_worker.py", "--targets", targets, "--out", tmp_path, "--steps", "4",
             "--teacher-grad", teacher_grad)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][name]), name
    for name, value in r0["student"].items():  # DDP: the same weights (BatchNorm statistics are per rank)
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, r1["student"][name]), name
    assert r0["h"] == r1["h"] and all(np.isfinite(r0["h"]))  # the MPL signal is the ranks' mean, on each
    for name, value in r0["initial_teacher"].items():  # both ranks start from rank 0's parameters
        assert torch.equal(value, r1["initial_teacher"][name]), name
    # ... and the teacher trained, so the equality above is not that of two untouched copies
    assert any(not torch.equal(value, r0["teacher"][name]) for name, value in r0["initial_teacher"].items())


def test_run_pipeline_two_processes(tmp_path):
    doc = {"name": "tiny",
           "data": {"source": "digits", "labeled_per_class": 10},
           "train_large": {"model": "test_resnet", "epochs": 1, "batch_size": 32},
           "precompute": {"dtype": "float32", "shards": 2},
           "distill": {"student": "test_resnet", "steps": 6, "batch_size": 16, "unlabeled_batch_size": 32,
                       "eval_every": 3, "log_every": 3, "checkpoint_every": 3, "probe_size": 4},
           "compare": {"seeds": [0], "runs": [{"name": "kd", "mode": "kd"},
                                              {"name": "mpl", "mode": "reducedmpl"}]}}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = torchrun("run", path, "--out-root", tmp_path / "runs", "--quiet")
    run_dir = tmp_path / "runs" / "tiny"
    index = json.loads((run_dir / "index.json").read_text())
    assert [s["stage"] for s in index["stages"]] == ["train_large", "precompute", "distill", "distill"]
    for s in index["stages"]:
        assert (run_dir / s["folder"]).is_dir()
    assert (run_dir / "comparison.md").exists() and (run_dir / "report" / "report.md").exists()
    assert r.stdout.count("comparison:") == 1
    mpl_folder = next(s["folder"] for s in index["stages"] if s.get("run") == "mpl")
    result = json.loads((run_dir / mpl_folder / "result.json").read_text())
    assert result["mode"] == "reducedmpl" and result["test_acc"] is not None
    # everything cached: a second launch computes nothing
    again = torchrun("run", path, "--out-root", tmp_path / "runs", "--quiet")
    assert again.stdout.count("skipped, up to date") == 4


def launch_running(args: list[str], metrics: Path, rows: int, **popen) -> subprocess.Popen:
    """``torchrun`` with 2 processes on ``args``, returned once ``metrics`` holds ``rows`` rows (the loop runs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reducedmpl",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REDUCEDMPL_DIST_TIMEOUT": "600"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics)) >= rows:
            return proc
        time.sleep(0.1)
    _, err = proc.communicate() if proc.poll() is not None else ("", "still starting")
    proc.kill()
    raise AssertionError(f"the run did not reach its loop: {err[-3000:]}")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def test_a_dying_rank_does_not_leave_the_others_waiting(tiny_targets, tmp_path):
    targets = tiny_targets
    args = ["distill", "--targets", str(targets), "--student", "test_resnet", "--steps", "100000", "--out",
            str(tmp_path / "d"), "--quiet", "--set", "distill.log_every=1", "--set", "distill.eval_every=100000"]
    proc = launch_running(args, tmp_path / "d" / "metrics.jsonl", 3)
    try:
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # rank 1 dies mid-run, without a word
        # torchrun notices and stops rank 0, long before the process group's 600 s timeout
        code = proc.wait(timeout=120)
        assert code != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_ctrl_c_under_torchrun_stops_every_rank_after_a_checkpoint(tiny_targets, tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both workers (one process group); torchrun passes it on once
    more. Every rank stops at the same step, rank 0 writes last.pt there, and --resume finishes the run."""
    targets = tiny_targets
    args = ["distill", "--targets", str(targets), "--student", "test_resnet", "--steps", "60", "--out",
            str(tmp_path / "d"), "--quiet", "--set", "distill.log_every=1", "--set", "distill.eval_every=1000",
            "--set", "distill.checkpoint_every=1000"]
    metrics = tmp_path / "d" / "metrics.jsonl"
    proc = launch_running(args, metrics, 4, start_new_session=True)  # its own process group, like a terminal's
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    assert "/reducedmpl/" not in err, err[-3000:]  # no traceback of ours (torchrun prints its own on a signal)
    last = torch.load(tmp_path / "d" / "last.pt", weights_only=True)
    stopped = last["distiller"]["step"]
    assert 4 <= stopped < 60 and len(last["distiller"]["rng"]) == 2  # every rank's RNG state
    assert f"interrupted at step {stopped}/60" in err
    torchrun(*args, "--resume")
    result = json.loads((tmp_path / "d" / "result.json").read_text())
    assert result["steps"] == 60 and not (tmp_path / "d" / "last.pt").exists()
    steps = [r["step"] for r in read_jsonl(metrics) if "step" in r and "final" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no row twice, none lost
    # every rank's RNG state and stream position came back: the same student as an uninterrupted 2-process run
    ref = tmp_path / "ref"
    torchrun(*[str(ref) if a == str(tmp_path / "d") else a for a in args])
    a = torch.load(ref / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "d" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
