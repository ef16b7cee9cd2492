"""Data sources: load images and labels from a spec such as ``mnist:DIR`` or ``folder:DIR``."""
from reducedmpl.data.sources import Source, load_source

__all__ = ["Source", "load_source"]
