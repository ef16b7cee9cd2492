"""reducedmpl: low-memory Meta Pseudo Labels distillation for timm image classifiers."""

__version__ = "0.1.0"
