"""A stage's data in one object: the source, its deterministic splits, and the preprocessing of its inputs."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from .loading import Preprocess, default_preprocess
from .sources import Source, load_source
from .splits import Splits, make_splits


@dataclass
class DataSetup:
    config: DataConfig
    source: Source
    splits: Splits
    prep: Preprocess


def setup_data(cfg: DataConfig) -> DataSetup:
    """Load the source and split it; the preprocessing (input size, normalisation) is measured on the labeled
    training rows, the only ones every stage shares."""
    source = load_source(cfg.source, cfg)
    splits = make_splits(source, cfg)
    return DataSetup(cfg, source, splits, default_preprocess(source, splits.indices["labeled"], cfg))
