"""reducedmpl: low-memory Meta Pseudo Labels distillation for timm image classifiers.

``from reducedmpl import train_large, precompute, distill, run``: the stages as functions (:mod:`reducedmpl.api`),
imported on first use so that ``import reducedmpl`` (and ``reducedmpl --version``) stays fast.
"""

__version__ = "0.1.0"

_API = ("train_large", "precompute", "distill", "run", "StageResult", "RunResult")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'reducedmpl' has no attribute {name!r}")
