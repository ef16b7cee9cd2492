"""Where the benchmarks find the MNIST test set: ``../shared/data/mnist-t10k`` beside the repository (read in
place, never copied), as the pipelines and tests resolve it."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist-t10k"


def default_data(fallback: str | None = "digits") -> str | None:
    """``mnist:DIR`` when the folder is there, else ``fallback``."""
    return f"mnist:{MNIST_DIR}" if MNIST_DIR.is_dir() else fallback
