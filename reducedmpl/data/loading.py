"""Batches of model inputs from a :class:`Source`, reproducible from (seed, epoch, batch).

Array-backed sources (digits, mnist, cifar, npz) are held as one uint8 tensor and augmented a batch at a
time, which is much faster on a CPU than per-image transforms. Image folders go through a
``torch.utils.data.DataLoader`` with timm's ``create_transform``: ``data.num_workers`` worker processes that
stay alive across epochs and prefetch, pinned memory when CUDA is there; so do the stored views an array
source replays (:class:`views.ViewBatches`), when ``data.num_workers > 0``. Either way the order of an epoch is a
function of (seed, epoch), and the augmentation of an array batch of (seed, epoch, batch index), of a folder
image of (seed, epoch, row id); so the worker count never changes a batch, and a run resumed mid-epoch sees
exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import random
import sys
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig, parse_randaugment
from ..distributed import Dist, rank_slice
from ..errors import DataError
from .sources import Source

if TYPE_CHECKING:
    from .views import ViewMaker

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class Preprocess:
    """How stored images become one model's inputs; saved in every artifact so later stages match it.

    ``crop_pct`` is the share of the image the evaluation transform keeps at the centre (timm's ``crop_pct``; None:
    the whole image for array sources, timm's default for image folders); ``interpolation`` resizes."""

    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float | None = None
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def norm_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as (1, C, 1, 1) tensors, for :func:`array_inputs`."""
        return torch.tensor(self.mean).view(1, -1, 1, 1), torch.tensor(self.std).view(1, -1, 1, 1)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        crop = d.get("crop_pct")
        return cls(int(d["in_chans"]), int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]),
                   None if crop is None else float(crop), str(d.get("interpolation") or "bilinear"))


def default_preprocess(source: Source, train_indices: np.ndarray, cfg: DataConfig) -> Preprocess:
    """Input size from the config (or the source), mean/std measured on the training rows of array sources."""
    if source.images is None:
        size = cfg.input_size or 224
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if source.in_chans == 3 else ((0.5,), (0.5,))
        return Preprocess(source.in_chans, size, mean, std)
    h, w = source.image_size
    size = cfg.input_size or max(h, w)
    rows = source.images[train_indices[:20000]].astype(np.float64) / 255.0
    axes = (0, 1, 2)
    mean = tuple(float(m) for m in rows.mean(axis=axes))
    std = tuple(max(float(s), 1e-3) for s in rows.std(axis=axes))
    return Preprocess(source.in_chans, size, mean, std)


def model_preprocess(data_prep: Preprocess, data_input_size: int | None, own: dict,
                     pretrained_cfg: dict | None = None) -> Preprocess:
    """One model's preprocessing: each of input_size, crop_pct, interpolation, mean and std is the model's own
    setting (``own``, None where unset), else (the input size) ``data.input_size`` when set, else the model's
    pretrained configuration, else the data's."""
    pre = dict(pretrained_cfg or {})
    if pre.get("interpolation") and pre["interpolation"] not in INTERPOLATIONS:
        pre["interpolation"] = "bicubic"  # e.g. lanczos: the nearest kind these batches make
    size = pre.get("input_size")
    size = int(size[-1]) if isinstance(size, (list, tuple)) and size else None

    def pick(key: str, *fallbacks):
        for value in (own.get(key), *fallbacks):
            if value is not None:
                return value
        return None

    mean = pick("mean", pre.get("mean"), data_prep.mean)
    std = pick("std", pre.get("std"), data_prep.std)
    crop = pick("crop_pct", pre.get("crop_pct"), data_prep.crop_pct)
    return Preprocess(data_prep.in_chans, int(pick("input_size", data_input_size, size, data_prep.input_size)),
                      tuple(float(m) for m in mean), tuple(float(v) for v in std),
                      None if crop is None else float(crop),
                      str(pick("interpolation", pre.get("interpolation"), data_prep.interpolation)))


def _batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    key = [seed, epoch, batch] + ([rank] if rank else [])  # rank 0 (and one process) keeps the plain key
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


class _ImageTensor:
    """The uint8 images of some rows as an (N, C, H, W) tensor, plus labels and ids."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(source.images[indices])).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(source.labels[indices].astype(np.int64))
        self.ids = torch.from_numpy(indices.astype(np.int64))


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_chans, -1, -1)
    return x.mean(dim=1, keepdim=True).expand(-1, in_chans, -1, -1)


def center_crop(x: torch.Tensor, crop_pct: float | None) -> torch.Tensor:
    """The central ``crop_pct`` share of each side of images (B, C, H, W) (None or 1: all of it)."""
    if crop_pct is None or crop_pct >= 1:
        return x
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * crop_pct)), max(1, round(w * crop_pct))
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def resize(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Float images (B, C, H, W) resized to ``size`` x ``size`` (antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if interpolation == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    out = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def normalise(x: torch.Tensor, prep: Preprocess, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[0, 1] images with their channels matched to the model and normalised."""
    x = match_channels(x, prep.in_chans)
    if mean.shape[1] != x.shape[1]:
        mean, std = mean.mean().view(1, 1, 1, 1), std.mean().view(1, 1, 1, 1)
    return ((x - mean) / std).contiguous()


def array_inputs(x: torch.Tensor, prep: Preprocess, mean: torch.Tensor, std: torch.Tensor,
                 crop_flip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Model inputs from uint8 images (B, C, H, W): scaled to [0, 1], the central ``crop_pct`` kept, resized to the
    input size, cropped and flipped by ``crop_flip`` (training), channels matched and normalised. Each image's
    result depends on that image alone, not on the others in the batch."""
    x = resize(center_crop(x.float().div_(255.0), prep.crop_pct), prep.input_size, prep.interpolation)
    if crop_flip is not None:
        x = crop_flip(x)
    return normalise(x, prep, mean, std)


class BatchedRandAugment:
    """torchvision's ``v2.RandAugment(num_ops, magnitude)``, drawn from an explicit generator and applied a batch at
    a time, with the very result of the per-image transform.

    ``plan(g, h, w)`` makes the draws ``v2.RandAugment`` makes for one image (an op, then the sign of its magnitude,
    per step) from ``g`` instead of the global generator; ``apply(images, plans)`` then runs each step's op once on
    all the images that drew it. Every op is computed image by image inside the batch (elementwise, per-image
    reductions and histograms, the same affine grid for the group), so each image comes out bit for bit as the
    per-image transform after ``torch.manual_seed`` would make it (tests check every op against it). A quarter of the
    time of the per-image path at 28 px, without touching the global generator.
    """

    def __init__(self, magnitude: int, num_ops: int):
        from torchvision.transforms import v2

        self.aug = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.ops = tuple(self.aug._AUGMENTATION_SPACE)
        self._magnitudes: dict[tuple[int, int], dict[str, tuple[float | None, bool]]] = {}

    def _space(self, height: int, width: int) -> dict[str, tuple[float | None, bool]]:
        """Each op's magnitude at this image size (None: it takes none) and whether it draws a sign."""
        key = (height, width)
        if key not in self._magnitudes:
            space = {}
            for op, (magnitudes, signed) in self.aug._AUGMENTATION_SPACE.items():
                m = magnitudes(self.aug.num_magnitude_bins, height, width)
                space[op] = (None if m is None else float(m[self.aug.magnitude]), signed)
            self._magnitudes[key] = space
        return self._magnitudes[key]

    def plan(self, g: torch.Generator, height: int, width: int) -> tuple[tuple[str, float], ...]:
        """One image's (op, magnitude) per step, drawn from ``g`` in the order ``v2.RandAugment`` draws them."""
        space, steps = self._space(height, width), []
        for _ in range(self.aug.num_ops):
            op = self.ops[int(torch.randint(len(self.ops), (), generator=g))]
            magnitude, signed = space[op]
            if magnitude is None:
                magnitude = 0.0
            elif signed and torch.rand((), generator=g) <= 0.5:
                magnitude = -magnitude
            steps.append((op, magnitude))
        return tuple(steps)

    def apply(self, images: torch.Tensor, plans: list[tuple[tuple[str, float], ...]]) -> torch.Tensor:
        """uint8 images (n, C, H, W), image i augmented by ``plans[i]`` (a new tensor)."""
        out, aug = images.clone(), self.aug
        for step in range(aug.num_ops):
            groups: dict[tuple[str, float], list[int]] = {}
            for i, plan in enumerate(plans):
                groups.setdefault(plan[step], []).append(i)
            for (op, magnitude), members in groups.items():
                if op != "Identity":
                    rows = torch.tensor(members)
                    out[rows] = aug._apply_image_or_video_transform(out[rows], op, magnitude,
                                                                    interpolation=aug.interpolation, fill=aug._fill)
        return out


class Batcher:
    """Makes the batches of one split: ``batch(epoch, b)`` is deterministic; ``epoch(e)`` yields them all.

    With ``dist`` (several processes) ``batch_size`` is the global batch: every rank makes the same number of
    batches, each holding its share of the global one (:func:`distributed.rank_slice`), so together the ranks
    see each row of an epoch once.
    """

    def __init__(self, source: Source, indices: np.ndarray, prep: Preprocess, cfg: DataConfig, *,
                 batch_size: int, train: bool, seed: int, drop_last: bool = False, dist: Dist | None = None,
                 replay: ViewMaker | None = None):
        if len(indices) == 0:
            raise DataError("a split used for training or evaluation is empty", "check the data split sizes")
        self.source, self.indices, self.prep, self.cfg = source, np.asarray(indices), prep, cfg
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.dist = dist or Dist()
        self.drop_last = drop_last and len(indices) >= batch_size
        self.mean, self.std = prep.norm_tensors()
        self.randaugment = parse_randaugment(cfg.randaugment) if (train and cfg.randaugment) else None
        # replay: each row then uses one of its stored views (views.pick_views) as its input
        self.replay = replay
        self._arrays = _ImageTensor(source, self.indices) if source.images is not None else None
        self._folder = None if source.images is not None else _FolderItems(source, self.indices, prep, cfg, train,
                                                                          seed, replay)
        self._views = None  # array sources with replay: the views' batches (views.ViewBatches)
        if replay is not None and self._folder is None:
            from .views import ViewBatches

            self._views = ViewBatches(replay)
        self._loader = None  # the DataLoader of folder items or views, made on first use when cfg.num_workers > 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order of positions)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _positions(self, epoch: int, b: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:  # drawn once per epoch, not per batch (ms at 1 M rows)
            self._order = (epoch, epoch_order(len(self.indices), self.seed, epoch, self.train))
        order = self._order[1]
        return rank_slice(order[b * self.batch_size:(b + 1) * self.batch_size], self.dist)

    def batch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs float32 (B,C,H,W) normalised, labels int64 (B,), ids int64 (B,))."""
        pos = self._positions(epoch, b)
        seed = _batch_seed(self.seed, epoch, b, self.dist.rank)
        if len(pos) == 0:  # a short last batch with fewer rows than ranks: this rank has none
            size = self.prep.input_size
            return (torch.zeros(0, self.prep.in_chans, size, size), torch.zeros(0, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64))
        if self._folder is not None:
            with process_rngs_kept():  # the generators saved once for the batch, not once per image
                return self._folder.collate(self._folder.__getitems__([(int(p), epoch) for p in pos]))
        if self._views is not None:
            return self._views[self._view_key(epoch, pos)]
        a = self._arrays
        x = a.images[pos]
        g = torch.Generator().manual_seed(seed)
        if self.randaugment is not None:
            x = self._apply_randaugment(x, g)
        x = array_inputs(x, self.prep, self.mean, self.std, (lambda v: self._crop_flip(v, g)) if self.train else None)
        return x, a.labels[pos], a.ids[pos]

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        p = self.cfg.crop_padding
        n, _, h, w = x.shape
        if p > 0:
            padded = F.pad(x, (p, p, p, p))
            off = torch.randint(0, 2 * p + 1, (n, 2), generator=g)
            x = torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(off.tolist())])
        if self.cfg.hflip:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def _apply_randaugment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """torchvision's RandAugment of each image in turn, from one generator seeded by the batch's."""
        aug = BatchedRandAugment(*self.randaugment)
        draws = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        h, w = x.shape[-2:]
        return aug.apply(x, [aug.plan(draws, h, w) for _ in range(len(x))])

    def _view_key(self, epoch: int, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows at positions ``pos``, as a key of :class:`views.ViewBatches`: (ids, their views, labels)."""
        ids = self.indices[pos].astype(np.int64)
        return ids, self.views_of(epoch, ids), self.source.labels[ids].astype(np.int64)

    def loader_keys(self, epoch: int, b: int) -> list:
        """Batch ``b`` of ``epoch`` as the DataLoader's keys: one per image (folders), or one for the batch."""
        pos = self._positions(epoch, b)
        if self._views is not None:
            return [self._view_key(epoch, pos)]
        return [(int(p), epoch) for p in pos]

    def views_of(self, epoch: int, ids: np.ndarray) -> np.ndarray | None:
        """The stored view each row of ``ids`` uses in ``epoch`` (None without replay)."""
        if self.replay is None:
            return None
        from .views import pick_views

        return pick_views(self.seed, epoch, ids, self.replay.policy.views)

    @property
    def prefetches(self) -> bool:
        """Whether :meth:`epoch` makes its batches in worker processes ahead of use (image folders, and the stored
        views of array sources)."""
        return (self._folder is not None or self._views is not None) and self.cfg.num_workers > 0

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches ``start..len-1`` of ``epoch``, the same as :meth:`batch` would make one by one."""
        if not self.prefetches:
            for b in range(start, len(self)):
                yield self.batch(epoch, b)
            return
        with warnings.catch_warnings():  # torch's advice on more workers than cores: the user chose the count
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            if self._loader is None:
                self._loader = _folder_loader(self, self._folder if self._folder is not None else self._views,
                                              self.cfg.num_workers)
            self._loader.batch_sampler.epoch, self._loader.batch_sampler.start = epoch, start
            batches = iter(self._loader)
        yield from batches


class BatchStream:
    """An endless stream of training batches over epochs, with a position that can be saved and restored."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.epoch, self.position = batcher, 0, 0
        self._batches: Iterator | None = None  # the epoch being read, for a batcher that prefetches

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position >= len(self.batcher):
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        if self.batcher.prefetches:
            if self._batches is None:
                self._batches = self.batcher.epoch(self.epoch, start=self.position)
            out = next(self._batches)
        else:
            out = self.batcher.batch(self.epoch, self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def views(self, ids: torch.Tensor) -> np.ndarray | None:
        """The stored views of the rows of the batch just drawn (None when the batcher does not replay views)."""
        return self.batcher.views_of(self.epoch, ids.numpy())

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None


class _FolderItems(torch.utils.data.Dataset):
    """Per-image loading and timm transforms for image folders, for a DataLoader (in worker processes or not).

    A key is ``(pos, epoch)``; the item's augmentation is seeded from (seed, epoch, row) only, so an image
    gets the same augmentation in any worker, with any number of workers, and in a resumed epoch. timm's
    transforms draw from the process-wide Python, NumPy and torch generators, so each item sets them from its
    own seed and puts them back afterwards, under a lock (threads of one process never share a draw).
    """

    def __init__(self, source: Source, indices: np.ndarray, prep: Preprocess, cfg: DataConfig, train: bool,
                 seed: int, replay: ViewMaker | None = None):
        self.source, self.indices, self.seed, self.train, self.replay = source, indices, seed, train, replay
        self.transform = folder_transform(prep, train, cfg.randaugment, cfg.hflip)
        self.in_chans, self.input_size = prep.in_chans, prep.input_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int, int]]:
        """The items of a batch's keys (a DataLoader fetches a batch with one call); the augmentation seeds of all
        of them computed at once (:func:`item_seeds`)."""
        rows = self.indices[np.array([pos for pos, _ in keys], dtype=np.int64)].astype(np.int64)
        epochs = np.array([epoch for _, epoch in keys], dtype=np.int64)
        seeds = item_seeds(self.seed, epochs, rows) if self.train and self.replay is None else epochs
        return [self._item(row, epoch, seed) for row, epoch, seed in zip(rows.tolist(), epochs.tolist(),
                                                                        seeds.tolist())]

    def _item(self, row: int, epoch: int, seed: int) -> tuple[torch.Tensor, int, int]:
        if self.replay is not None:  # the row's stored view of this epoch
            from .views import pick_views

            view = int(pick_views(self.seed, epoch, np.array([row]), self.replay.policy.views)[0])
            x = self.replay.inputs(np.array([row]), np.array([view]))[0]  # mixed with its partner, if so stored
            return x, int(self.source.labels[row]), row
        img = self.source.pil_image(row, "RGB")  # straight to PIL: timm's transforms take it
        if not self.train:  # evaluation transforms draw nothing
            return self.transform(img), int(self.source.labels[row]), row
        with seeded_process_rngs(seed):
            x = self.transform(img)
        return x, int(self.source.labels[row]), row

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not items:  # a short last batch with fewer rows than ranks: this rank has none
            return (torch.zeros(0, self.in_chans, self.input_size, self.input_size),
                    torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        x = match_channels(torch.stack([i[0] for i in items]), self.in_chans)
        return (x.contiguous(), torch.tensor([i[1] for i in items], dtype=torch.int64),
                torch.tensor([i[2] for i in items], dtype=torch.int64))


def folder_transform(prep: Preprocess, train: bool, randaugment: str | None, hflip: bool):
    """timm's transform of one folder image: the evaluation one, or the training one (random resized crop, the
    flip, RandAugment ``randaugment``) that draws from the process generators."""
    from timm.data import create_transform

    aa = None
    if train and randaugment:
        m, n = parse_randaugment(randaugment)
        aa = f"rand-m{m}-n{n}"
    crop = {} if prep.crop_pct is None else {"crop_pct": prep.crop_pct}
    return create_transform(prep.input_size, is_training=train, mean=prep.mean, std=prep.std, auto_augment=aa,
                            hflip=0.5 if hflip else 0.0, interpolation=prep.interpolation, **crop)


def item_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one image's augmentation in one epoch: a function of (seed, epoch, row id) only."""
    return int(np.random.SeedSequence([seed, epoch, row, 0x1F0]).generate_state(1)[0])


_MIX_A, _MIX_B, _MIX_L, _MIX_R = 0x43B0D7E5, 0x8B51F9DD, 0xCA01F9DD, 0x4973F715  # numpy's SeedSequence constants
_MULT_A, _MULT_B = 0x931E8875, 0x58F38DED


def item_seeds(seed: int, epochs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """:func:`item_seed` of many (epoch, row) pairs at once, as uint64: numpy's ``SeedSequence`` hash of the four
    32-bit words [seed, epoch, row, 0x1F0] and its first state word, computed on arrays (~10 us an image saved);
    values of 2**32 or more (more words) go through ``SeedSequence`` itself."""
    epochs, rows = np.asarray(epochs, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    if not (0 <= seed < 2**32) or (epochs.size and (epochs.max() >= 2**32 or rows.max() >= 2**32)):
        return np.array([item_seed(seed, int(e), int(r)) for e, r in zip(epochs, rows)], dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    words = [np.full(rows.shape, seed, np.uint64), epochs.astype(np.uint64), rows.astype(np.uint64),
             np.full(rows.shape, 0x1F0, np.uint64)]
    const = [_MIX_A]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint64(const[0])
        const[0] = const[0] * _MULT_A & 0xFFFFFFFF
        value = value * np.uint64(const[0]) & mask
        return value ^ (value >> np.uint64(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = (np.uint64(_MIX_L) * x - np.uint64(_MIX_R) * y) & mask
        return r ^ (r >> np.uint64(16))

    pool = [hashmix(w) for w in words]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    out = (pool[0] ^ np.uint64(_MIX_B)) * np.uint64(_MIX_B * _MULT_B & 0xFFFFFFFF) & mask
    return out ^ (out >> np.uint64(16))


_RNG_LOCK = threading.RLock()
_KEPT = threading.local()  # depth of process_rngs_kept() blocks open in this thread


def _seed_process_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues CUDA's


@contextmanager
def process_rngs_kept():
    """Python's, NumPy's and torch's (CPU) global generators as they were on entry, restored on exit, under the lock;
    :func:`seeded_process_rngs` inside only seeds them (saving NumPy's state costs ~40 us: once per batch, not per
    image)."""
    with _RNG_LOCK:
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        _KEPT.depth = getattr(_KEPT, "depth", 0) + 1
        try:
            yield
        finally:
            _KEPT.depth -= 1
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


@contextmanager
def seeded_process_rngs(seed: int):
    """Python's, NumPy's and torch's (CPU) global generators seeded from ``seed``, restored on exit: by this block, by
    an enclosing :func:`process_rngs_kept`, or not at all in a DataLoader worker (whose generators are its own, each
    item seeding them afresh)."""
    if getattr(_KEPT, "depth", 0) or torch.utils.data.get_worker_info() is not None:
        with _RNG_LOCK:
            _seed_process_rngs(seed)
            yield
        return
    with process_rngs_kept():
        _seed_process_rngs(seed)
        yield


class _EpochBatches(torch.utils.data.Sampler):
    """The batch keys of one epoch from a start batch (:meth:`Batcher.loader_keys`); set before each pass."""

    def __init__(self, batcher: "Batcher"):
        # a weak reference: no cycle keeps a dropped Batcher's worker processes alive until the next collection
        self.batcher, self.epoch, self.start = weakref.proxy(batcher), 0, 0

    def __len__(self) -> int:
        return max(0, len(self.batcher) - self.start)

    def __iter__(self):
        for b in range(self.start, len(self.batcher)):
            yield self.batcher.loader_keys(self.epoch, b)


def start_method(setting: str = "auto") -> str:
    """How DataLoader workers start (``data.start_method``). ``auto``: forked, as torch's own default on Linux, when
    that is safe: fork is available, CUDA is not initialised and the caller is the main thread with no other Python
    thread alive (a fork copies whatever lock another thread holds at that moment; seen: a worker forked from a
    thread pool hung for good in its first ``torch.manual_seed``); otherwise spawned. (Not a fork server: its
    workers outlive a killed run, as their parent, the server, lives on.)"""
    if setting != "auto":
        return setting
    import multiprocessing

    if ("fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
            and threading.active_count() == 1 and threading.current_thread() is threading.main_thread()):
        return "fork"
    return "spawn"


def _folder_loader(batcher: "Batcher", items: torch.utils.data.Dataset, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``items`` (folder images, or batches of stored views) in ``workers`` processes that stay
    alive across epochs, prefetching, started as :func:`start_method` says (a spawned worker imports torch itself:
    seconds, once per loader, as the workers persist; a forked one starts at once)."""
    return torch.utils.data.DataLoader(
        items, batch_sampler=_EpochBatches(batcher), num_workers=workers, collate_fn=items.collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=True, prefetch_factor=4,
        multiprocessing_context=start_method(batcher.cfg.start_method), worker_init_fn=die_with_parent)


def die_with_parent(_worker: int = 0) -> None:
    """Have Linux kill this worker when the process that started it dies. A forked worker holds the read end of its
    siblings' result pipes: left alone after a SIGKILL of the run, it could wait for good on a full pipe, holding the
    run's output open."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
