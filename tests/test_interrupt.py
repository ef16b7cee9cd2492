"""Interruption and full disks never cost a run its work: SIGKILL at random points, Ctrl-C, a full disk.

Every test compares the interrupted (and continued) run with an uninterrupted one — the same weights, logits and
metrics — and checks what the interruption left on disk: a file that says "finished" is finished and sound,
anything else is a temporary file that the next run ignores or removes.

Kill points are drawn at random within a run's duration. Every assertion message names the seed; set
``REDUCEDMPL_INTERRUPT_SEED=N`` to draw the same delays again (a real process on a loaded machine still varies in
speed, so a kill may land before the first checkpoint or after the end: both are checked). A full disk is a file
size limit in the child process (``RLIMIT_FSIZE``: writes past it fail with EFBIG, as on a full disk with ENOSPC).
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import random
import re
import resource
import signal
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import assert_one_line_error, cli, cli_subprocess
from reducedmpl.data.loading import Batcher
from reducedmpl.engine.interrupt import graceful_stop
from reducedmpl.engine.runs import RUN_FILES, read_jsonl
from reducedmpl.files import save_torch
from reducedmpl.errors import DiskFullError
from reducedmpl.models import load_artifact, safe_load
from reducedmpl.stages.distill import Distiller
from reducedmpl.targets import TargetStore

SEED = int(os.environ.get("REDUCEDMPL_INTERRUPT_SEED") or random.SystemRandom().randrange(2**31))
TIMING = {"images_per_s", "train_seconds", "seconds"}  # wall-clock figures: the only ones allowed to differ
# Ctrl-C while the interpreter exits, after the command finished: Python has put back the default action by then
AT_EXIT = -signal.SIGINT

TRAIN = ["train-large", "--data", "digits", "--model", "test_resnet", "--quiet", "--epochs", "6",
         "--batch-size", "16", "--set", "data.labeled_per_class=8", "--set", "train_large.drop_rate=0.1"]
STEPS_PER_EPOCH = 5  # 80 labeled rows in batches of 16
DISTILL_STEPS, DISTILL_FINETUNE = 40, 5
DISTILL = ["--steps", str(DISTILL_STEPS), "--teacher-grad", "reinforce", "--quiet", "--set", "distill.ema=true",
           "--set", f"distill.finetune_steps={DISTILL_FINETUNE}", "--set", "distill.log_every=1",
           "--set", "distill.eval_every=10", "--set", "distill.checkpoint_every=15", "--set", "data.hflip=true"]
PRECOMPUTE = ["--batch-size", "16", "--shards", "8", "--dtype", "float32", "--quiet"]
PIPELINE = {
    "name": "tiny",
    "data": {"source": "digits", "labeled_per_class": 10},
    "train_large": {"model": "test_resnet", "epochs": 2, "batch_size": 32},
    "precompute": {"dtype": "float32", "shards": 2},
    "distill": {"student": "test_resnet", "steps": 12, "batch_size": 16, "unlabeled_batch_size": 32,
                "eval_every": 3, "log_every": 3, "checkpoint_every": 3, "probe_size": 4},
}


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def one_thread():
    """One thread here and in the child processes: the same arithmetic in both, so results compare exactly (and
    two threads per process only spin against each other on a shared 2-core machine)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture
def chance(request, one_thread) -> Chance:
    return Chance(SEED + zlib.crc32(request.node.name.encode()))


class Chance:
    """The test's random generator; ``str()`` names the seed and the delays drawn, for assertion messages."""

    def __init__(self, seed: int):
        self.rng, self.delays = random.Random(seed), []

    def delay(self, seconds: float) -> float:
        self.delays.append(round(self.rng.uniform(0.0, seconds), 3))
        return self.delays[-1]

    def __str__(self) -> str:
        return f"REDUCEDMPL_INTERRUPT_SEED={SEED}, delays {self.delays} s"


@dataclass
class Reference:
    """An uninterrupted run, and how long its work took here (the range the random delays are drawn from)."""

    out: Path
    seconds: float


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def launch(*args, limit: int | None = None) -> subprocess.Popen:
    """The CLI in a child process; ``limit``: the largest file it may write, in bytes (a full disk)."""
    if limit is None:
        return cli_subprocess(*args)
    return cli_subprocess(*args, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Poll until ``ready()`` or until the process ended."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)


def rewritten(path: Path) -> Callable[[], bool]:
    """Ready once ``path`` is written anew (it may exist already, from the run being continued)."""
    before = path.stat().st_mtime_ns if path.exists() else None
    return lambda: path.exists() and path.stat().st_mtime_ns != before


def computing(store: Path) -> Callable[[], bool]:
    """Ready once precompute writes a shard (or the master): a temporary file newer than now."""
    now = time.time_ns()

    def ready() -> bool:
        try:
            return store.exists() or any(p.stat().st_mtime_ns >= now for p in store.parent.glob(".*.tmp"))
        except FileNotFoundError:  # renamed while we looked
            return True
    return ready


def signal_after(proc: subprocess.Popen, delay: float, sig: int) -> tuple[int, str, str]:
    """Send ``sig`` after ``delay`` seconds unless the process ended first; (exit code, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def assert_one_line(rc: int, err: str, *fragments: str, why: object = "") -> None:
    """What ``assert_one_line_error`` checks, for a child process (whose stage may have said "resuming" first)."""
    assert rc == 2, (rc, err, str(why))
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, (err, str(why))
    assert sum(line.startswith("error") for line in lines) == 1, (err, str(why))
    for f in fragments:
        assert f.lower() in lines[-1].lower(), (f, err, str(why))


def rows(path: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock figures."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(path)] if path.exists() else []


def assert_same_weights(a: Path, b: Path, why: object = "") -> None:
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys(), str(why)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (k, str(why))


def assert_same_run(ref: Path, cut: Path, artifact: str, why: object) -> None:
    """The continued run ends where the uninterrupted one does: weights, metrics, no temporary files."""
    assert_same_weights(ref / artifact, cut / artifact, why)
    assert rows(cut / "metrics.jsonl") == rows(ref / "metrics.jsonl"), str(why)
    assert not (cut / "last.pt").exists(), str(why)
    assert not [p.name for p in cut.iterdir() if p.name.startswith(".")], str(why)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_run_folder(out: Path, ref: Path, artifact: str, why: object, extra: frozenset = frozenset()) -> str:
    """What a killed train-large or distill run left is sound; returns how to go on: 'done', 'resume' or 'fresh'.

    Every file is one the stage writes (and then complete: it loads) or a temporary one. A run counts as finished
    once its artifact is there and ``last.pt`` is not; then every output is written, the final metrics row too.
    An artifact is never written early: when it exists it holds the final weights."""
    if not out.exists():
        return "fresh"
    kind = artifact.removesuffix(".pt")
    for p in out.iterdir():
        hidden = p.name.startswith(".") and (p.name.endswith(".tmp") or p.name == ".write-test")
        assert hidden or p.name in {artifact, *RUN_FILES, *extra}, (p.name, str(why))
    for name in ("last.pt", "best.pt", "reduced_teacher.pt"):
        if (out / name).exists():
            safe_load(out / name)  # complete: a truncated file raises
    if (out / artifact).exists():
        load_artifact(out / artifact, kind)
        assert_same_weights(ref / artifact, out / artifact, why)
    for name in ("probes.json", "result.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())
    if (out / "config.yaml").exists():
        assert isinstance(yaml.safe_load((out / "config.yaml").read_text()), dict), str(why)
    if (out / artifact).exists() and not (out / "last.pt").exists():
        assert any(r.get("final") for r in read_jsonl(out / "metrics.jsonl")), ("finished without", str(why))
        if kind == "student":
            assert (out / "result.json").exists() and (out / "probes.json").exists(), str(why)
        return "done"
    return "resume" if (out / "config.yaml").exists() else "fresh"


def continue_run(args: list, out: Path, how: str) -> None:
    """Continue a killed run in-process the way a user would."""
    if how == "resume":
        cli(*args, "--out", out, "--resume")
    elif how == "fresh":
        cli(*args, "--out", out)


def store_logits(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    with TargetStore.open(path) as store:
        ids = np.sort(store.ids)
        return ids, store.logits(ids), store.meta.run_key


def assert_same_store(ref: Path, cut: Path, why: object, same_teacher_file: bool = True) -> None:
    """The same logits for every id (and the same run key, which hashes the teacher file); no temporary files."""
    a, b = store_logits(ref), store_logits(cut)
    assert np.array_equal(a[0], b[0]) and (a[2] == b[2] or not same_teacher_file), str(why)
    assert np.array_equal(a[1], b[1]), str(why)
    assert not [p.name for p in cut.parent.iterdir() if p.name.startswith(".")], str(why)


def check_store_folder(folder: Path, ref_folder: Path, why: object, extra: frozenset = frozenset()) -> None:
    """After a kill: every shard there is complete and holds the uninterrupted run's rows; a master there is a
    sound store; anything else is a temporary file."""
    if not folder.exists():
        return
    for p in folder.iterdir():
        if p.name.startswith("."):
            assert p.name.endswith(".tmp"), (p.name, str(why))
        elif p.name == "targets.h5":
            TargetStore.open(p).close()
        elif p.name not in extra:
            assert re.fullmatch(r"targets-\d{5}-of-\d{5}\.h5", p.name), (p.name, str(why))
            with h5py.File(p, "r") as f, h5py.File(ref_folder / p.name, "r") as g:
                assert bool(f.attrs["complete"]), (p.name, str(why))
                for name in ("id", "logits"):
                    assert np.array_equal(f[name][...], g[name][...]), (p.name, name, str(why))


def raise_sigint_at(monkeypatch, cls, name: str, when: Callable[..., bool], times: int = 1,
                    sig: int = signal.SIGINT) -> None:
    """Press Ctrl-C (``times`` in a row; or send ``sig``) inside ``cls.name`` when ``when(self, *args)`` holds,
    once."""
    original, fired = getattr(cls, name), []

    def patched(self, *args):
        if not fired and when(self, *args):
            fired.append(True)
            for _ in range(times):
                signal.raise_signal(sig)
        return original(self, *args)

    monkeypatch.setattr(cls, name, patched)


# ---------------------------------------------------------------------------------------------- references
@pytest.fixture(scope="module")
def train_ref(one_thread, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("train") / "ref"
    return Reference(out, timed(lambda: cli(*TRAIN, "--out", out)))


@pytest.fixture(scope="module")
def distill_args(tiny_targets) -> list:
    return ["distill", "--targets", tiny_targets, *DISTILL]


@pytest.fixture(scope="module")
def distill_ref(one_thread, distill_args, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("distill") / "ref"
    return Reference(out, timed(lambda: cli(*distill_args, "--out", out)))


@pytest.fixture(scope="module")
def precompute_args(tiny_teacher) -> list:
    return ["precompute", "--teacher", tiny_teacher, *PRECOMPUTE]


@pytest.fixture(scope="module")
def precompute_ref(one_thread, precompute_args, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("precompute") / "ref" / "targets.h5"
    return Reference(out, timed(lambda: cli(*precompute_args, "--out", out)))


# ---------------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.parametrize("kills", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_train_large_killed_at_random_points_resumes_to_the_same_teacher(train_ref, chance, tmp_path, kills):
    ref, cut = train_ref.out, tmp_path / "cut"
    how = "fresh"
    for _ in range(kills):
        ready = rewritten(cut / "config.yaml")  # past the start-up (imports, data, model)
        proc = launch(*TRAIN, "--out", cut, *(["--resume"] if how == "resume" else []))
        wait_for(proc, ready)
        rc, _, err = signal_after(proc, chance.delay(train_ref.seconds), signal.SIGKILL)
        assert rc in (0, -signal.SIGKILL), (rc, err, str(chance))
        how = check_run_folder(cut, ref, "teacher.pt", chance)
        print(f"killed: exit {rc}, then {how} ({chance})")
        if how == "done":
            break
    continue_run(TRAIN, cut, how)
    assert_same_run(ref, cut, "teacher.pt", chance)


@pytest.mark.parametrize("kills", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_distill_killed_at_random_points_resumes_to_the_same_student(distill_args, distill_ref, chance, tmp_path,
                                                                     kills):
    ref, cut = distill_ref.out, tmp_path / "cut"
    how = "fresh"
    for _ in range(kills):
        ready = rewritten(cut / "config.yaml")
        proc = launch(*distill_args, "--out", cut, *(["--resume"] if how == "resume" else []))
        wait_for(proc, ready)
        rc, _, err = signal_after(proc, chance.delay(distill_ref.seconds), signal.SIGKILL)
        assert rc in (0, -signal.SIGKILL), (rc, err, str(chance))
        how = check_run_folder(cut, ref, "student.pt", chance)
        print(f"killed: exit {rc}, then {how} ({chance})")
        if how == "done":
            break
    continue_run(distill_args, cut, how)
    assert_same_run(ref, cut, "student.pt", chance)
    for name in ("result.json", "probes.json"):
        a, b = json.loads((ref / name).read_text()), json.loads((cut / name).read_text())
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


@pytest.mark.parametrize("kills", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_precompute_killed_at_random_points_resumes_to_the_same_store(precompute_args, precompute_ref, chance,
                                                                      tmp_path, kills):
    ref, cut = precompute_ref.out, tmp_path / "cut" / "targets.h5"
    for _ in range(kills):
        proc = launch(*precompute_args, "--out", cut)
        wait_for(proc, computing(cut))  # the teacher and the data are loaded
        rc, _, err = signal_after(proc, chance.delay(precompute_ref.seconds), signal.SIGKILL)
        assert rc in (0, -signal.SIGKILL), (rc, err, str(chance))
        check_store_folder(cut.parent, ref.parent, chance)
        print(f"killed: exit {rc}, left {sorted(p.name for p in cut.parent.iterdir())} ({chance})")
        if rc == 0:
            break
    cli(*precompute_args, "--out", cut)  # the same command again
    assert_same_store(ref, cut, chance)


@pytest.mark.slow
def test_pipeline_killed_at_random_points_resumes_to_the_same_results(one_thread, chance, tmp_path):
    pipeline = tmp_path / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    ref_root, root = tmp_path / "ref", tmp_path / "cut"
    seconds = timed(lambda: cli("run", pipeline, "--out-root", ref_root, "--quiet"))
    ref_dir, run_dir = ref_root / "tiny", root / "tiny"
    for _ in range(3):
        ready = rewritten(run_dir / ".lock")  # planned, and holding the run folder
        proc = launch("run", pipeline, "--out-root", root, "--quiet")
        wait_for(proc, ready)
        rc, _, err = signal_after(proc, chance.delay(seconds), signal.SIGKILL)
        assert rc in (0, -signal.SIGKILL), (rc, err, str(chance))
        stage = frozenset({"stage.json"})
        for folder in run_dir.glob("large-*"):
            check_run_folder(folder, ref_dir / "large", "teacher.pt", chance, stage)
        for folder in run_dir.glob("targets-*"):
            check_store_folder(folder, ref_dir / "targets", chance, stage)
        for folder in run_dir.glob("distill-*-*-*"):
            check_run_folder(folder, ref_dir / "distill-reducedmpl-0", "student.pt", chance, stage)
        if rc == 0:
            break
    out = cli("run", pipeline, "--out-root", root, "--quiet").stdout  # the same command again
    assert "report" in out
    assert_same_weights(ref_dir / "large" / "teacher.pt", run_dir / "large" / "teacher.pt", chance)
    # two trainings of the same teacher: the same weights, but teacher.pt records its training time
    assert_same_store(ref_dir / "targets" / "targets.h5", run_dir / "targets" / "targets.h5", chance, False)
    ref_student, student = ref_dir / "distill-reducedmpl-0", run_dir / "distill-reducedmpl-0"
    assert_same_weights(ref_student / "student.pt", student / "student.pt", chance)
    assert rows(student / "metrics.jsonl") == rows(ref_student / "metrics.jsonl"), str(chance)
    assert json.loads((run_dir / "index.json").read_text())["stages"] == \
        json.loads((ref_dir / "index.json").read_text())["stages"]


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_train_large_ctrl_c_checkpoints_inside_the_epoch_and_resumes_exactly(train_ref, one_thread, tmp_path,
                                                                             monkeypatch):
    """Ctrl-C during the 8th training batch (epoch 2, batch 3): the step finishes, last.pt keeps the position
    inside the epoch, its running loss/accuracy sums and the RNG state; --resume continues bit for bit. Then a
    full disk: the next checkpoint does not fit, the one there is kept untouched, and --resume still gets there."""
    cut = tmp_path / "cut"
    calls = itertools.count(1)
    raise_sigint_at(monkeypatch, Batcher, "batch", lambda self, epoch, b: self.train and next(calls) == 8)
    r = cli(*TRAIN, "--out", cut, check=False)
    assert r.exit_code == 130, (r.exit_code, r.stderr, r.exception)
    assert "interrupted at epoch 2/6, batch 3/5" in r.stderr and "continue with --resume" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    state = safe_load(cut / "last.pt")
    assert (state["epoch"], state["step"], state["partial"]["batch"], state["partial"]["seen"]) == (0, 8, 3, 48)
    assert len(rows(cut / "metrics.jsonl")) == 1 and not (cut / "teacher.pt").exists()
    monkeypatch.undo()

    # a full disk: best.pt (weights only) fits, last.pt (with the optimizer) does not
    last, before = cut / "last.pt", sha(cut / "last.pt")
    limit = ((cut / "best.pt").stat().st_size + last.stat().st_size) // 2
    rc, _, err = finish(launch(*TRAIN, "--out", cut, "--resume", limit=limit))
    assert_one_line(rc, err, f"could not write {last}", "disk is full", "free some space", "--resume")
    assert sha(last) == before and not (cut / ".last.pt.tmp").exists()

    cli(*TRAIN, "--out", cut, "--resume")
    assert_same_run(train_ref.out, cut, "teacher.pt", "")


def test_distill_ctrl_c_checkpoints_at_the_step_reached_and_resumes_exactly(distill_args, distill_ref, one_thread,
                                                                           tmp_path, monkeypatch):
    """Ctrl-C in step 13 (the periodic checkpoints are every 15): last.pt holds step 13. Then a full disk at the
    step-15 checkpoint keeps that last.pt; --resume ends with the uninterrupted student and metrics."""
    cut = tmp_path / "cut"
    raise_sigint_at(monkeypatch, Distiller, "step", lambda self, measure: self.step_count == 12)
    r = cli(*distill_args, "--out", cut, check=False)
    assert r.exit_code == 130, (r.exit_code, r.stderr, r.exception)
    assert f"interrupted at step 13/{DISTILL_STEPS + DISTILL_FINETUNE}" in r.stderr and "--resume" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert safe_load(cut / "last.pt")["distiller"]["step"] == 13
    assert rows(cut / "metrics.jsonl")[-1]["step"] == 13 and not (cut / "student.pt").exists()
    monkeypatch.undo()

    last, before = cut / "last.pt", sha(cut / "last.pt")
    rc, _, err = finish(launch(*distill_args, "--out", cut, "--resume", limit=last.stat().st_size // 2))
    assert_one_line(rc, err, f"could not write {last}", "disk is full", "--resume")
    assert sha(last) == before and not (cut / ".last.pt.tmp").exists()
    assert max(r["step"] for r in rows(cut / "metrics.jsonl")) == 15  # written before the checkpoint failed

    cli(*distill_args, "--out", cut, "--resume")  # the rows past step 13 are dropped and computed again
    assert_same_run(distill_ref.out, cut, "student.pt", "")


def test_second_ctrl_c_stops_at_once(train_ref, one_thread, tmp_path, monkeypatch):
    cut = tmp_path / "cut"
    calls = itertools.count(1)
    raise_sigint_at(monkeypatch, Batcher, "batch", lambda self, epoch, b: self.train and next(calls) == 8, times=2)
    r = cli(*TRAIN, "--out", cut, check=False)
    assert r.exit_code == 130 and "continue with --resume" in r.stderr and "Traceback" not in r.stderr
    assert safe_load(cut / "last.pt")["partial"] is None  # not inside the epoch: the one of the epoch before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    cli(*TRAIN, "--out", cut, "--resume")
    assert_same_run(train_ref.out, cut, "teacher.pt", "")


def test_distill_sigterm_finishes_the_step_and_exits_130(distill_args, one_thread, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption) in step 13 acts as Ctrl-C: the step finishes, last.pt holds step 13 (the
    periodic checkpoints are every 15), exit 130. A guard stands in for SIGTERM's default action, so a SIGTERM that
    the tool does not catch fails the test instead of ending it."""
    def default_action(signum, frame):
        raise AssertionError("SIGTERM was not caught: the default action would end the process")

    cut = tmp_path / "cut"
    raise_sigint_at(monkeypatch, Distiller, "step", lambda self, measure: self.step_count == 12, sig=signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, default_action)
    try:
        r = cli(*distill_args, "--out", cut, check=False)
        assert signal.getsignal(signal.SIGTERM) is default_action  # the handler is restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 130, (r.exit_code, r.stderr, r.exception)
    assert f"interrupted at step 13/{DISTILL_STEPS + DISTILL_FINETUNE}" in r.stderr and "--resume" in r.stderr
    assert safe_load(cut / "last.pt")["distiller"]["step"] == 13 and not (cut / "student.pt").exists()
    assert rows(cut / "metrics.jsonl")[-1]["step"] == 13


def test_distill_second_ctrl_c_stops_at_once(distill_args, one_thread, tmp_path, monkeypatch):
    """Two Ctrl-Cs in step 18: the run stops inside the step, without a checkpoint there; last.pt is the periodic
    one of step 15, and it is sound."""
    cut = tmp_path / "cut"
    raise_sigint_at(monkeypatch, Distiller, "step", lambda self, measure: self.step_count == 17, times=2)
    r = cli(*distill_args, "--out", cut, check=False)
    assert r.exit_code == 130 and "--resume" in r.stderr and "Traceback" not in r.stderr, (r.stderr, r.exception)
    assert safe_load(cut / "last.pt")["distiller"]["step"] == 15 and not (cut / "student.pt").exists()
    assert max(row["step"] for row in rows(cut / "metrics.jsonl")) == 17  # the step in progress never finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_graceful_stop_agreement_hook():
    """``requested`` goes through ``agree`` (what a distributed run replaces) and stays true once true."""
    votes = []
    with graceful_stop(agree=lambda local: votes.append(local) or len(votes) >= 2) as stop:
        assert not stop.requested and stop.requested and stop.requested
    assert votes == [False, False]
    with graceful_stop() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.stop("step 3/9", Path("last.pt"))


def test_train_large_ctrl_c_at_a_random_point(train_ref, chance, tmp_path):
    cut = tmp_path / "cut"
    metrics = cut / "metrics.jsonl"
    proc = launch(*TRAIN, "--out", cut)
    wait_for(proc, lambda: len(rows(metrics)) >= 1)  # training: the handler is in place
    seen = len(rows(metrics))
    rc, out, err = signal_after(proc, chance.delay(train_ref.seconds * 0.8), signal.SIGINT)
    why = f"{chance}; exit {rc}; stdout {out!r}; stderr {err!r}"
    assert rc in (0, 130, AT_EXIT) and "Traceback" not in err + out, why
    if rc == 130:
        assert "interrupted" in err and "--resume" in err, why
        how = check_run_folder(cut, train_ref.out, "teacher.pt", why)
        stopped = re.search(r"interrupted at (?:epoch (\d+)/\d+, batch (\d+)/\d+|the end of epoch (\d+)/)", err)
        if stopped:  # in the loop: last.pt is where it stopped, and the metrics end there
            state = safe_load(cut / "last.pt")
            epoch, batch, end = stopped.groups()
            done = int(end) if end else int(epoch) - 1
            assert state["epoch"] + 1 == done == len(rows(metrics)) and done >= seen, why
            assert (state["partial"] or {}).get("batch") == (int(batch) if batch else None), why
        continue_run(TRAIN, cut, how)
    elif rc == AT_EXIT:
        assert check_run_folder(cut, train_ref.out, "teacher.pt", why) == "done", why
    assert_same_run(train_ref.out, cut, "teacher.pt", why)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_distill_ctrl_c_at_a_random_point(distill_args, distill_ref, chance, tmp_path, sig):
    """Ctrl-C, or SIGTERM (a scheduler's preemption): a checkpoint at the step reached, exit 130."""
    cut = tmp_path / "cut"
    metrics = cut / "metrics.jsonl"
    proc = launch(*distill_args, "--out", cut)
    wait_for(proc, lambda: len(rows(metrics)) >= 2)  # past step 1: the handler is in place
    seen = rows(metrics)[-1]["step"]
    rc, out, err = signal_after(proc, chance.delay(distill_ref.seconds * 0.8), sig)
    why = f"{chance}; exit {rc}; stdout {out!r}; stderr {err!r}"
    assert rc in (0, 130, -sig) and "Traceback" not in err + out, why
    if rc == 130:
        assert "interrupted" in err and "--resume" in err, why
        how = check_run_folder(cut, distill_ref.out, "student.pt", why)
        stopped = re.search(r"interrupted at step (\d+)/", err)
        if stopped:  # at a step boundary: last.pt holds that step, not the last periodic checkpoint
            step = int(stopped.group(1))
            assert safe_load(cut / "last.pt")["distiller"]["step"] == step >= seen, why
            assert max(r["step"] for r in rows(metrics) if "step" in r) == step, why
        continue_run(distill_args, cut, how)
    elif rc == -sig:  # after the loop the default action is back: like a kill, nothing half-done is trusted
        assert max(r["step"] for r in rows(metrics) if "step" in r) == DISTILL_STEPS + DISTILL_FINETUNE, why
        continue_run(distill_args, cut, check_run_folder(cut, distill_ref.out, "student.pt", why))
    assert_same_run(distill_ref.out, cut, "student.pt", why)


def test_precompute_ctrl_c_keeps_finished_shards(precompute_args, precompute_ref, chance, tmp_path):
    cut = tmp_path / "cut" / "targets.h5"
    proc = launch(*precompute_args, "--out", cut)
    wait_for(proc, computing(cut))
    rc, out, err = signal_after(proc, chance.delay(precompute_ref.seconds), signal.SIGINT)
    why = f"{chance}; exit {rc}; stdout {out!r}; stderr {err!r}"
    assert rc in (0, 130, AT_EXIT) and "Traceback" not in err + out, why
    if rc == 130:
        assert "finished shards are kept" in err and "run the same command again" in err, why
        check_store_folder(cut.parent, precompute_ref.out.parent, why)
        assert not [p for p in cut.parent.iterdir() if p.name.startswith(".")], why  # the shard in work is removed
    elif rc == AT_EXIT:
        TargetStore.open(cut).close()
    cli(*precompute_args, "--out", cut)
    assert_same_store(precompute_ref.out, cut, why)


# ---------------------------------------------------------------------------------------------- full disk
def test_precompute_disk_full_leaves_no_store_a_later_stage_would_take(precompute_args, precompute_ref,
                                                                      one_thread, tmp_path):
    """A shard that does not fit: a one-line error naming it, nothing left behind, the same store once there is
    room (HDF5 writes through reducedmpl, so the failed write never reaches HDF5: see ``targets.writer._NewFile``)."""
    shard = min(p.stat().st_size for p in precompute_ref.out.parent.glob("targets-*.h5"))
    cut = tmp_path / "cut" / "targets.h5"
    rc, _, err = finish(launch(*precompute_args, "--out", cut, limit=shard // 2))
    assert_one_line(rc, err, f"could not write {cut.parent / 'targets-00000-of-00008.h5'}", "disk is full",
                    "run the same precompute command again")
    assert sorted(p.name for p in cut.parent.iterdir()) == []  # the shard's temporary file is removed too
    cli(*precompute_args, "--out", cut)
    assert_same_store(precompute_ref.out, cut, "")


@pytest.mark.parametrize("full", ["targets-00002-of-00008.h5", "targets.h5"])
def test_precompute_out_of_space_on_a_shard_or_the_master(precompute_args, precompute_ref, one_thread, tmp_path,
                                                          monkeypatch, full):
    """ENOSPC while writing the third shard, or the master once every shard is written: a one-line error naming
    the file; the shards before it are complete, nothing else is there (no master that distill would take), and
    running the command again finishes the same store, keeping the finished shards."""
    cut = tmp_path / "cut" / "targets.h5"
    pwrite = os.pwrite

    def full_disk(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".{full}.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    r = cli(*precompute_args, "--out", cut, check=False)
    assert_one_line_error(r, f"could not write {cut.parent / full}", "no space left on device",
                          "run the same precompute command again")
    done = 2 if full != "targets.h5" else 8
    assert sorted(p.name for p in cut.parent.iterdir()) == [f"targets-{i:05d}-of-00008.h5" for i in range(done)]
    check_store_folder(cut.parent, precompute_ref.out.parent, full)
    r = cli("distill", "--targets", cut, "--steps", "2", "--out", tmp_path / "d", check=False)
    assert_one_line_error(r, "does not exist")
    monkeypatch.undo()
    r = cli(*precompute_args, "--out", cut)
    assert f"{done} of 8 shards are already complete" in r.stderr
    assert_same_store(precompute_ref.out, cut, full)


def test_atomic_save_on_a_full_disk_keeps_the_file_there(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_torch({"step": 1}, path)
    before = sha(path)

    def fsync(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=re.escape(f"could not write {path}")) as e:
        save_torch({"step": 2}, path)
    assert "quota" in str(e.value).lower() and "--resume" in str(e.value)
    assert sha(path) == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_anywhere_else_is_one_line(tmp_path, monkeypatch):
    """A writer that does not name its file still gives a one-line error (with the path when the OS names it);
    ``run`` says to run it again, as it has no --resume."""
    from reducedmpl import pipeline
    from reducedmpl.stages import train_large

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.png"))

    monkeypatch.setattr(train_large, "run", full)
    r = cli(*TRAIN, "--out", tmp_path / "t", check=False)
    assert_one_line_error(r, f"could not write {tmp_path / 'x.png'}", "no space left", "--resume")

    def stage_full(*args, **kwargs):
        raise DiskFullError(tmp_path / "last.pt", "No space left on device")

    monkeypatch.setattr(pipeline, "run_pipeline", stage_full)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump(PIPELINE))
    r = cli("run", pipe, "--out-root", tmp_path / "runs", check=False)
    assert_one_line_error(r, f"could not write {tmp_path / 'last.pt'}", "run the same command again")
    assert "--resume" not in r.stderr
