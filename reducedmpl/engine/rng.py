"""Seeds and RNG state: what makes a run repeatable and a resumed run identical to an uninterrupted one."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _plain(state)


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj: Any) -> Any:
    """Convert RNG states to types that ``torch.load(weights_only=True)`` accepts."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64))
    if isinstance(obj, (tuple, list)):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def rank_rng_states(dist: Any) -> Any:
    """What a checkpoint keeps of the RNG: this process's state, or every rank's (a list) under torchrun."""
    return dist.gather(rng_state()) if dist.enabled else rng_state()


def restore_rank_rng(saved: Any, dist: Any) -> bool:
    """Restore this rank's RNG from :func:`rank_rng_states`; False (RNG left as seeded) when the checkpoint was
    written by another number of processes."""
    if isinstance(saved, list):
        saved = saved[dist.rank] if len(saved) == dist.world_size else None
    elif dist.enabled:
        saved = None
    if saved is None:
        return False
    set_rng_state(saved)
    return True
