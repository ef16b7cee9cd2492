"""Shared fixtures: a CLI runner and a tiny teacher trained once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist-t10k"


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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
