"""Stored views: inputs that ``precompute --views K`` runs the teacher on and ``distill`` rebuilds exactly.

View 0 of a row is its clean input (the evaluation transform). Views 1..K-1 are augmented inputs drawn from the
recorded :class:`ViewPolicy`, seeded by (policy seed, row id, view) alone, so the same view is rebuilt bit for
bit on the same machine, in any batch, by any process. For array sources the augmentation is the training one
of :class:`~reducedmpl.data.loading.Batcher` (RandAugment on the uint8 image, then the random crop and the flip),
drawn per image; for image folders it is timm's training transform, run with the process generators seeded per
view.

During distillation each drawn row picks one of its stored views (:func:`pick_views`, a function of the stream's
seed, the epoch and the row id), and the student trains on exactly that input, with the teacher's target for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..config import DataConfig, parse_randaugment
from ..errors import ArtifactError
from .loading import Preprocess, array_inputs, folder_transform, match_channels, seeded_process_rngs
from .sources import Source

# Salts that keep the view streams apart from each other and from the batch augmentation's seeds.
_VIEW_SALT, _PICK_SALT, _CROP_SALT = 0x5EED_71E5, 0x9C4E_51A7, 0xC409_F11B
# How a view is rebuilt from its seed; a store records it, and one made another way is refused (its views could
# not be rebuilt exactly).
REBUILD = 1
_MASK64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


@dataclass(frozen=True)
class ViewPolicy:
    """How the views of a store were made; recorded in the store (``view_policy``) so they can be rebuilt."""

    views: int  # V: view 0 clean, views 1..V-1 augmented
    seed: int
    input_size: int
    crop_padding: int  # array sources: random-crop padding at input_size (0: none)
    hflip: bool
    randaugment: str | None  # e.g. "rand-m9-n2", or None
    kind: str  # "array" (in-memory uint8 images) or "folder" (image files, timm's transform)
    rebuild: int = REBUILD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        """The policy a store records; refused when its views were made in a way this version cannot rebuild."""
        rebuild = int(d.get("rebuild", 0))
        if rebuild != REBUILD:
            raise ArtifactError(f"the store's views were made with view rebuild scheme {rebuild}, this reducedmpl "
                                f"rebuilds scheme {REBUILD}",
                                "rerun `reducedmpl precompute --views` with this reducedmpl (or "
                                "distill.replay_views=false)")
        return cls(int(d["views"]), int(d["seed"]), int(d["input_size"]), int(d["crop_padding"]), bool(d["hflip"]),
                   d.get("randaugment") or None, str(d["kind"]), rebuild)


def source_kind(source: Source) -> str:
    """``array`` (images held in memory) or ``folder`` (image files): how its views are made."""
    return "array" if source.images is not None else "folder"


def make_policy(views: int, seed: int, cfg: DataConfig, prep: Preprocess, source: Source) -> ViewPolicy:
    """The policy of a store of ``views`` views: the data's training augmentation at the teacher's input size."""
    return ViewPolicy(int(views), int(seed), prep.input_size, int(cfg.crop_padding), bool(cfg.hflip),
                      cfg.randaugment or None, source_kind(source))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays: a fast, well-mixed hash (wraps modulo 2**64 by design)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _hash(*parts: Any) -> np.ndarray:
    """One uint64 hash per element of the broadcast ``parts`` (non-negative integers)."""
    arrays = np.broadcast_arrays(*[np.asarray(p, dtype=np.int64).astype(np.uint64) for p in parts])
    h = np.zeros(arrays[0].shape, np.uint64)
    for a in arrays:
        h = _mix64(h ^ a)
    return h


def view_seed(policy_seed: int, row: int, view: int) -> int:
    """The seed of view ``view`` of row ``row`` (RandAugment's, timm's transform's): a function of these three
    numbers only. The crop and flip of an array view are drawn from the same numbers by hashing."""
    return int(_hash(_VIEW_SALT, policy_seed, row, view) >> np.uint64(1))  # < 2**63: a valid torch seed


def pick_views(seed: int, epoch: int, ids: np.ndarray, views: int) -> np.ndarray:
    """The stored view each row of ``ids`` uses in ``epoch`` of the stream seeded ``seed``: uniform over
    0..views-1, a function of (seed, epoch, row id) only, so batch composition, worker count and resuming
    never change it."""
    ids = np.asarray(ids, dtype=np.int64)
    if views <= 1:
        return np.zeros(ids.shape, np.int64)
    return (_hash(_PICK_SALT, seed, epoch, ids) % np.uint64(views)).astype(np.int64)


class ViewMaker:
    """Rebuilds views of rows of ``source``: ``inputs(ids, views)`` gives the normalised model inputs."""

    def __init__(self, source: Source, prep: Preprocess, policy: ViewPolicy):
        if source_kind(source) != policy.kind:
            raise ArtifactError(f"the stored views were made from {policy.kind} data, this data is "
                                f"{source_kind(source)} data",
                                "distill with the data the store was computed on")
        if prep.input_size != policy.input_size:
            raise ArtifactError(f"the stored views were made at input size {policy.input_size}, the student's input "
                                f"size is {prep.input_size}",
                                "set data.input_size to the store's, or distill.replay_views=false")
        self.source, self.prep, self.policy = source, prep, policy
        self.mean, self.std = prep.norm_tensors()
        self.randaugment = parse_randaugment(policy.randaugment) if policy.randaugment else None
        self._transforms: tuple[Any, Any] | None = None  # folders: (evaluation, training) transform

    def inputs(self, ids: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """float32 (n, C, H, W): view ``views[i]`` of row ``ids[i]``; each image depends on its own key only."""
        ids, views = np.asarray(ids, dtype=np.int64), np.asarray(views, dtype=np.int64)
        if ids.shape != views.shape:
            raise ValueError(f"{len(ids)} ids but {len(views)} views")
        if views.size and (views.min() < 0 or views.max() >= self.policy.views):
            raise ValueError(f"views must be in 0..{self.policy.views - 1}")
        if len(ids) == 0:
            size = self.prep.input_size
            return torch.zeros(0, self.prep.in_chans, size, size)
        if self.source.images is None:
            return torch.stack([self.folder_item(int(r), int(v)) for r, v in zip(ids, views)])
        return self._array_inputs(ids, views)

    def _array_inputs(self, ids: np.ndarray, views: np.ndarray) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(self.source.images[ids])).permute(0, 3, 1, 2)
        if self.randaugment is not None and views.any():
            images = self._randaugment(images, ids, views)
        return array_inputs(images, self.prep, self.mean, self.std, lambda x: self._crop_flip(x, ids, views))

    def _randaugment(self, images: torch.Tensor, ids: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """RandAugment of each augmented view, from the global generator seeded by the view (the global state is
        put back once for the batch)."""
        from torchvision.transforms import v2

        magnitude, ops = self.randaugment
        aug = v2.RandAugment(num_ops=ops, magnitude=magnitude)
        out = []
        with torch.random.fork_rng(devices=[]):
            for img, r, v in zip(images, ids.tolist(), views.tolist()):
                if v:
                    torch.manual_seed(view_seed(self.policy.seed, r, v))
                    img = aug(img)
                out.append(img)
        return torch.stack(out)

    def _crop_flip(self, x: torch.Tensor, ids: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """The random crop (offsets in 0..2p) and flip of every augmented view, for the whole batch at once; view 0
        is cropped at the centre (offset p: the clean image itself) and never flipped."""
        p, (n, _, h, w) = self.policy.crop_padding, x.shape
        augmented = views > 0
        if p > 0:
            span = np.uint64(2 * p + 1)
            oy = np.where(augmented, _hash(_CROP_SALT, self.policy.seed, ids, views, 1) % span, p).astype(np.int64)
            ox = np.where(augmented, _hash(_CROP_SALT, self.policy.seed, ids, views, 2) % span, p).astype(np.int64)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            ys = torch.from_numpy(oy)[:, None] + torch.arange(h)
            xs = torch.from_numpy(ox)[:, None] + torch.arange(w)
            x = padded[torch.arange(n)[:, None, None], :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
        if self.policy.hflip:
            flip = augmented & (_hash(_CROP_SALT, self.policy.seed, ids, views, 3) & np.uint64(1)).astype(bool)
            x = torch.where(torch.from_numpy(flip).view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def folder_item(self, row: int, view: int) -> torch.Tensor:
        """One folder image's view: the evaluation transform for view 0, else timm's training transform seeded
        by the view (channels matched to the model)."""
        if self._transforms is None:  # (evaluation, training); made once, on first use (also in a worker)
            self._transforms = tuple(folder_transform(self.prep, train, self.policy.randaugment, self.policy.hflip)
                                     for train in (False, True))
        img = self.source.pil_image(row, "RGB")
        if view == 0:
            x = self._transforms[0](img)
        else:
            with seeded_process_rngs(view_seed(self.policy.seed, row, view)):
                x = self._transforms[1](img)
        return match_channels(x[None], self.prep.in_chans)[0]

