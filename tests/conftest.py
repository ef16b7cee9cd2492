"""Shared fixtures: a CLI runner and a tiny teacher trained once per test session."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Nothing in the tests downloads anything: pretrained weights come from a Hugging Face Hub cache the tests write
# (hub_cache below), read offline; hf: sources convert data files into a datasets cache of the tests' own. Set before
# timm, huggingface_hub and datasets are imported (they read these once); subprocesses inherit them.
HUB_CACHE = Path(tempfile.mkdtemp(prefix="reducedmpl-hub-"))
atexit.register(shutil.rmtree, HUB_CACHE, True)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(HUB_CACHE),
                  HF_HOME=str(HUB_CACHE / "home"))
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="reducedmpl-test-hf-cache-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist-t10k"

# A test process started with SIGINT ignored (under nohup, or as `cmd &` in a script) keeps it ignored, and the tool
# deliberately leaves an ignored SIGINT alone; the tests send real Ctrl-Cs, so they restore Python's own handler
# (their subprocesses then start with the default disposition too).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def cli(*args: str, check: bool = True):
    """Run the real app in-process; returns the click Result."""
    from reducedmpl.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if check and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                             f"{result.exception!r}")
    return result


def cli_subprocess(*args: str, **kwargs) -> subprocess.Popen:
    # the same number of threads as this process: float reductions (and so exact-resume checks) depend on it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "reducedmpl", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "Traceback" not in result.stdout
    for f in fragments:
        assert f.lower() in err.lower(), (f, err)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A test_resnet teacher trained for 2 epochs on digits (10 labels per class): runs/t/teacher.pt."""
    out = tmp_path_factory.mktemp("teacher") / "t"
    cli("train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "2", "--out", out,
        "--set", "data.labeled_per_class=10", "--quiet")
    return out / "teacher.pt"


@pytest.fixture(scope="session")
def tiny_targets(tiny_teacher) -> Path:
    """targets.h5 of the tiny teacher over all splits (float32, so tests can compare exactly)."""
    out = tiny_teacher.parent / "targets.h5"
    cli("precompute", "--teacher", tiny_teacher, "--out", out, "--dtype", "float32")
    return out


@pytest.fixture(scope="session")
def tiny_student(tiny_targets) -> Path:
    """A kd student of the tiny teacher, 10 distill steps on its targets: runs/t/kd/student.pt."""
    out = tiny_targets.parent / "kd"
    cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "10", "--set", "distill.batch_size=16",
        "--set", "distill.unlabeled_batch_size=32", "--out", out, "--quiet")
    return out / "student.pt"


def write_store(master: Path, meta, ids, labels, splits, logits, num_shards: int, batch: int,
                view_logits=None) -> Path:
    """A targets store at ``master`` through the real writer: ``num_shards`` shards appended ``batch`` rows at a
    time, then the master file (``view_logits`` (N, V-1, C): the augmented views of a store of V views)."""
    from reducedmpl.targets import ShardWriter, plan_shards, shard_paths, write_master

    paths = shard_paths(master, num_shards)
    for index, ((start, stop), path) in enumerate(zip(plan_shards(len(ids), num_shards), paths)):
        with ShardWriter(path, meta, stop - start, index, num_shards, start) as writer:
            for a in range(start, stop, batch):
                b = min(stop, a + batch)
                views = () if view_logits is None else (view_logits[a:b],)
                writer.append(ids[a:b], labels[a:b], splits[a:b], logits[a:b], *views)
    write_master(master, paths, meta)
    return master


HUB_REVISION = "3f2c1b0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"


def write_hub_model(repo: str, arch: str, num_classes: int = 1000, seed: int = 0, config: dict | None = None,
                    revision: str = HUB_REVISION, cache: Path = HUB_CACHE) -> dict:
    """A model repository in the test Hub cache (:func:`reducedmpl.hub.save_to_cache`: the hub's own layout), with
    random weights from ``seed``; ``config``: a timm ``config.json`` too (for hf-hub: names). Returns the weights."""
    import timm

    from reducedmpl.hub import save_to_cache

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = {k: v.contiguous() for k, v in timm.create_model(arch, num_classes=num_classes).state_dict().items()}
    save_to_cache(cache, repo, weights, config, revision)
    return weights


@pytest.fixture(scope="session")
def hub_cache() -> dict[str, dict]:
    """The test Hub cache: timm's test_resnet.r160_in1k and test_efficientnet.r160_in1k (1000 classes), and
    hf-hub:acme/digits-resnet, a test_resnet fine-tuned on 10 classes (with its config.json)."""
    digits_cfg = {"architecture": "test_resnet", "num_classes": 10,
                  "pretrained_cfg": {"input_size": [3, 24, 24], "crop_pct": 1.0, "interpolation": "bicubic",
                                     "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "num_classes": 10,
                                     "classifier": "fc", "first_conv": "conv1.0"}}
    return {"test_resnet.r160_in1k": write_hub_model("timm/test_resnet.r160_in1k", "test_resnet"),
            "test_efficientnet.r160_in1k": write_hub_model("timm/test_efficientnet.r160_in1k", "test_efficientnet",
                                                           seed=1),
            "hf-hub:acme/digits-resnet": write_hub_model("acme/digits-resnet", "test_resnet", 10, seed=2,
                                                         config=digits_cfg)}
