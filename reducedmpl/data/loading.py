"""Batches of model inputs from a :class:`Source`, reproducible from (seed, epoch, batch).

Array-backed sources (digits, mnist, cifar, npz) are held as one uint8 tensor and augmented a batch at a
time, which is much faster on a CPU than per-image transforms. Image folders go through a DataLoader with
timm's ``create_transform``. Either way the order of an epoch and the augmentation of every batch are a
function of (seed, epoch, batch index) only, so a run resumed mid-epoch sees exactly the batches an
uninterrupted run would.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig, parse_randaugment
from ..distributed import Dist, rank_slice
from ..errors import DataError
from .sources import Source

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How stored images become model inputs; saved in every checkpoint so later stages match it."""

    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["in_chans"]), int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]))


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


def _match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_chans, -1, -1)
    return x.mean(dim=1, keepdim=True).expand(-1, in_chans, -1, -1)


class Batcher:
    """Makes the batches of one split: ``batch(epoch, b)`` is deterministic; ``epoch(e)`` yields them all.

    With ``dist`` (several processes) ``batch_size`` is the global batch: every rank makes the same number of
    batches, each holding its share of the global one (:func:`distributed.rank_slice`), so together the ranks
    see each row of an epoch once.
    """

    def __init__(self, source: Source, indices: np.ndarray, prep: Preprocess, cfg: DataConfig, *,
                 batch_size: int, train: bool, seed: int, drop_last: bool = False, dist: Dist | None = None):
        if len(indices) == 0:
            raise DataError("a split used for training or evaluation is empty", "check the data split sizes")
        self.source, self.indices, self.prep, self.cfg = source, np.asarray(indices), prep, cfg
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.dist = dist or Dist()
        self.drop_last = drop_last and len(indices) >= batch_size
        self.mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(prep.std).view(1, -1, 1, 1)
        self.randaugment = parse_randaugment(cfg.randaugment) if (train and cfg.randaugment) else None
        self._arrays = _ImageTensor(source, self.indices) if source.images is not None else None
        self._folder = None if source.images is not None else _FolderData(source, self.indices, prep, cfg, train)

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _positions(self, epoch: int, b: int) -> np.ndarray:
        order = epoch_order(len(self.indices), self.seed, epoch, self.train)
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
            return self._folder.collate(pos, seed)
        a = self._arrays
        x = a.images[pos]
        g = torch.Generator().manual_seed(seed)
        if self.randaugment is not None:
            x = self._apply_randaugment(x, g)
        x = x.float().div_(255.0)
        if x.shape[-1] != self.prep.input_size or x.shape[-2] != self.prep.input_size:
            x = F.interpolate(x, size=(self.prep.input_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)
        if self.train:
            x = self._crop_flip(x, g)
        x = _match_channels(x, self.prep.in_chans)
        mean, std = self.mean, self.std
        if mean.shape[1] != x.shape[1]:
            mean, std = mean.mean().view(1, 1, 1, 1), std.mean().view(1, 1, 1, 1)
        x = (x - mean) / std
        return x.contiguous(), a.labels[pos], a.ids[pos]

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
        from torchvision.transforms import v2

        magnitude, ops = self.randaugment
        aug = v2.RandAugment(num_ops=ops, magnitude=magnitude)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            return torch.stack([aug(img) for img in x])

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for b in range(start, len(self)):
            yield self.batch(epoch, b)


class BatchStream:
    """An endless stream of training batches over epochs, with a position that can be saved and restored."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.epoch, self.position = batcher, 0, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.position >= len(self.batcher):
            self.epoch, self.position = self.epoch + 1, 0
        out = self.batcher.batch(self.epoch, self.position)
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _FolderData:
    """Per-image loading and timm transforms for image folders, seeded per image."""

    def __init__(self, source: Source, indices: np.ndarray, prep: Preprocess, cfg: DataConfig, train: bool):
        from timm.data import create_transform

        self.source, self.indices = source, indices
        aa = None
        if train and cfg.randaugment:
            m, n = parse_randaugment(cfg.randaugment)
            aa = f"rand-m{m}-n{n}"
        self.transform = create_transform(
            prep.input_size, is_training=train, mean=prep.mean, std=prep.std, auto_augment=aa,
            hflip=0.5 if cfg.hflip else 0.0, interpolation="bilinear")
        self.in_chans = prep.in_chans
        self.workers = cfg.num_workers

    def item(self, pos: int, seed: int):
        from PIL import Image

        row = int(self.indices[pos])
        arr = self.source.load_image(row)
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        img = img.convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            try:
                x = self.transform(img)
            finally:
                random.setstate(state)
        return x, int(self.source.labels[row]), row

    def collate(self, pos: np.ndarray, seed: int):
        seeds = [_batch_seed(seed, 0, i) for i in range(len(pos))]
        if self.workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.workers) as ex:
                items = list(ex.map(self.item, pos.tolist(), seeds))
        else:
            items = [self.item(p, s) for p, s in zip(pos.tolist(), seeds)]
        x = _match_channels(torch.stack([i[0] for i in items]), self.in_chans)
        return x, torch.tensor([i[1] for i in items]), torch.tensor([i[2] for i in items])
