"""benchmarks/gpu_check.py on a machine without CUDA: it says that it needs a GPU and exits 0."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_without_cuda_says_it_needs_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "needs a CUDA GPU" in r.stdout and "nothing was checked" in r.stdout
    assert "Traceback" not in r.stderr
