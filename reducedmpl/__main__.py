"""``python -m reducedmpl``; also ``python reducedmpl`` from the repository folder, which is what
``torchrun --nproc_per_node N reducedmpl ...`` runs there."""
import os
import sys

if not __package__:  # run as a folder: its modules (inspect.py) must not shadow the standard library's
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from reducedmpl.cli import run  # noqa: E402

run()
