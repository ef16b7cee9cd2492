"""Shared by the benchmarks: where they find the MNIST test set (``../shared/data/mnist-t10k`` beside the
repository, read in place, never copied, as the pipelines and tests resolve it), and how their tables write a mean
over seeds."""
from __future__ import annotations

import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist-t10k"


def default_data(fallback: str | None = "digits") -> str | None:
    """``mnist:DIR`` when the folder is there, else ``fallback``."""
    return f"mnist:{MNIST_DIR}" if MNIST_DIR.is_dir() else fallback


def mean_std(xs: list[float], signed: bool = False) -> str:
    """``mean ± sample std`` to 2 decimals (the mean alone for one value, ``–`` for none; ``signed``: a + on the
    mean), as every benchmark table writes a figure over seeds."""
    if not xs:
        return "–"
    text = format(statistics.mean(xs), "+.2f" if signed else ".2f")
    return text if len(xs) < 2 else f"{text} ± {statistics.stdev(xs):.2f}"
