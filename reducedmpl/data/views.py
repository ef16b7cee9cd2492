"""Stored views: inputs that ``precompute --views K`` runs the teacher on and ``distill`` rebuilds exactly.

A view is a *region* of the original image plus its augmentation, not a tensor of one size: the region (a crop
box in the image's own pixels, a flip) and the augmentation's seed are functions of (policy seed, row id, view)
alone, and :class:`ViewMaker` renders them at one model's input size, interpolation and normalisation. So the
teacher's view (rendered at its size at precompute) and the student's view of the same row (rendered at the
student's, in distill) show the same part of the same image, and the same view is rebuilt bit for bit on the same
machine, in any batch, by any process.

View 0 of a row is its clean input: the central ``crop_pct`` share the teacher's evaluation transform keeps. Views
1..K-1 are augmented:

* array sources: RandAugment on the uint8 image (seeded by the view), then a shifted crop of the image padded by
  ``crop_padding`` (counted at the teacher's input size, applied in the image's pixels) and the flip;
* image folders and other sources of encoded images: timm's training augmentation drawn per view: a random
  resized crop box (scale 0.08-1, ratio 3/4-4/3) of the image, the flip, then RandAugment at the rendered size.

During distillation each drawn row picks one of its stored views (:func:`pick_views`, a function of the stream's
seed, the epoch and the row id), and the student trains on exactly that region, with the teacher's target for it.

A store of mixed views (``view_mix="mixup"``: function matching, Beyer et al., CVPR 2022) stores the teacher's
outputs on mixup images instead: augmented view v of row i is ``lam * A + (1 - lam) * B``, A row i's view v as
above, B view v of a partner row j rendered from a second seed stream (:func:`partner_seed` of the policy seed), j
and ``lam ~ Beta(mix_alpha, mix_alpha)`` functions of (policy seed, i, v) alone (:func:`mix_partners`). j is drawn
from the partner pool: the sorted row ids the store holds, which the policy pins by their count and digest. Each
side is rendered at the model's own size and normalised, then the two are mixed (the same code for the teacher
and the student; normalising is affine, so this is mixing the pixels up to rounding). View 0 stays clean.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..config import DataConfig, parse_randaugment
from ..errors import ArtifactError
from .loading import (BatchedRandAugment, Preprocess, center_crop, folder_transform, match_channels, normalise,
                      resize, seeded_process_rngs)
from .sources import Source

# Salts that keep the view streams apart from each other and from the batch augmentation's seeds.
_VIEW_SALT, _PICK_SALT, _CROP_SALT = 0x5EED_71E5, 0x9C4E_51A7, 0xC409_F11B
_MIX_SALT, _PARTNER_SALT, _BATCH_MIX_SALT = 0x31C5_0B7D, 0x7A27_E3F1, 0x4B1D_5A3C
VIEW_MIXES = ("none", "mixup")
# How a view is rebuilt from its seed; a store records it, and one made another way is refused (its views could
# not be rebuilt exactly). Scheme 1 stored tensors of the teacher's size; scheme 2 stores regions.
REBUILD = 2
_MASK64 = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
FOLDER_SCALE, FOLDER_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # timm's random resized crop


@dataclass(frozen=True)
class ViewPolicy:
    """How the views of a store were made; recorded in the store (``view_policy``) so they can be rebuilt."""

    views: int  # V: view 0 clean, views 1..V-1 augmented
    seed: int
    input_size: int  # the teacher's: crop_padding is counted at this size
    crop_padding: int  # array sources: random-crop padding at input_size (0: none)
    hflip: bool
    randaugment: str | None  # e.g. "rand-m9-n2", or None
    kind: str  # "array" (in-memory uint8 images) or "folder" (encoded images, timm's augmentation)
    crop_pct: float | None = None  # view 0's region: the teacher's evaluation crop
    fill: tuple[int, ...] = (128, 128, 128)  # folders: RandAugment's fill colour (the teacher's mean)
    rebuild: int = REBUILD
    view_mix: str = "none"  # "mixup": views 1..V-1 mixed with a partner row's view (function matching)
    mix_alpha: float = 1.0  # lam ~ Beta(mix_alpha, mix_alpha)
    pool_rows: int = 0  # mixup: the partner pool (the store's sorted row ids): its size and digest
    pool_digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fill"] = list(self.fill)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewPolicy:
        """The policy a store records; refused when its views were made in a way this version cannot rebuild."""
        rebuild = int(d.get("rebuild", 0))
        if rebuild != REBUILD:
            raise ArtifactError(f"the store's views were made with view rebuild scheme {rebuild}, this reducedmpl "
                                f"rebuilds scheme {REBUILD}",
                                "rerun `reducedmpl precompute --views` with this reducedmpl (or "
                                "distill.replay_views=false)")
        mix = str(d.get("view_mix") or "none")  # a store made before mixed views: none
        if mix not in VIEW_MIXES:
            raise ArtifactError(f"the store's views are mixed by {mix!r}, this reducedmpl knows "
                                f"{', '.join(VIEW_MIXES)}", "rerun `reducedmpl precompute --views` with this "
                                "reducedmpl (or distill.replay_views=false)")
        crop = d.get("crop_pct")
        return cls(int(d["views"]), int(d["seed"]), int(d["input_size"]), int(d["crop_padding"]), bool(d["hflip"]),
                   d.get("randaugment") or None, str(d["kind"]), None if crop is None else float(crop),
                   tuple(int(v) for v in d.get("fill") or (128, 128, 128)), rebuild, mix,
                   float(d.get("mix_alpha", 1.0)), int(d.get("pool_rows", 0)), str(d.get("pool_digest", "")))


def source_kind(source: Source) -> str:
    """``array`` (images held in memory) or ``folder`` (image files): how its views are made."""
    return "array" if source.images is not None else "folder"


def make_policy(views: int, seed: int, cfg: DataConfig, prep: Preprocess, source: Source, view_mix: str = "none",
                mix_alpha: float = 1.0, pool: np.ndarray | None = None) -> ViewPolicy:
    """The policy of a store of ``views`` views: the data's training augmentation, regions taken from the
    teacher's preprocessing ``prep`` (its input size, its evaluation crop, its mean as the fill); mixed views
    (``view_mix="mixup"``) draw their partners from ``pool``, the row ids the store holds."""
    mean = list(prep.mean) * (3 if len(prep.mean) == 1 else 1)
    fill = tuple(min(255, round(255 * m)) for m in mean[:3])
    mixed = view_mix != "none"
    if mixed and pool is None:
        raise ValueError("mixed views need the partner pool (the store's row ids)")
    pool = partner_pool(pool) if mixed else np.zeros(0, np.int64)
    return ViewPolicy(int(views), int(seed), prep.input_size, int(cfg.crop_padding), bool(cfg.hflip),
                      cfg.randaugment or None, source_kind(source), prep.crop_pct, fill, REBUILD, view_mix,
                      float(mix_alpha), len(pool), pool_digest(pool) if mixed else "")


def partner_pool(ids: np.ndarray) -> np.ndarray:
    """The partner pool of a store holding the rows ``ids``: its sorted, distinct row ids."""
    return np.unique(np.asarray(ids, dtype=np.int64))


def pool_digest(pool: np.ndarray) -> str:
    """A short digest of a partner pool (its int64 ids, little-endian), which a mixed policy records."""
    return hashlib.sha256(np.asarray(pool, dtype="<i8").tobytes()).hexdigest()[:16]


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
    return int(view_seeds(policy_seed, row, view))


def view_seeds(policy_seed: int, rows: Any, views: Any) -> np.ndarray:
    """:func:`view_seed` of many (row, view) pairs at once (uint64 array)."""
    return _hash(_VIEW_SALT, policy_seed, rows, views) >> np.uint64(1)  # < 2**63: a valid torch seed


def pick_views(seed: int, epoch: int, ids: np.ndarray, views: int) -> np.ndarray:
    """The stored view each row of ``ids`` uses in ``epoch`` of the stream seeded ``seed``: uniform over
    0..views-1, a function of (seed, epoch, row id) only, so batch composition, worker count and resuming
    never change it."""
    ids = np.asarray(ids, dtype=np.int64)
    if views <= 1:
        return np.zeros(ids.shape, np.int64)
    return (_hash(_PICK_SALT, seed, epoch, ids) % np.uint64(views)).astype(np.int64)


def beta_draws(keys: np.ndarray, alpha: float) -> np.ndarray:
    """One draw of Beta(alpha, alpha) per uint64 key, each from a generator seeded by its key alone (float64)."""
    return np.array([np.random.Generator(np.random.PCG64(k)).beta(alpha, alpha) for k in keys.tolist()],
                    dtype=np.float64).reshape(keys.shape)


def mix_partners(policy_seed: int, rows: Any, views: Any, pool: np.ndarray,
                 alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The partner row (from the sorted ``pool``) and the weight ``lam`` (float32, ~ Beta(alpha, alpha)) of the
    mixed view ``views[i]`` of row ``rows[i]``: each a function of (policy seed, row, view) only. The partner may
    be the row itself (then two augmentations of one image are mixed)."""
    rows, views = np.broadcast_arrays(np.asarray(rows, np.int64), np.asarray(views, np.int64))
    picks = _hash(_MIX_SALT, policy_seed, rows, views, 1) % np.uint64(len(pool))
    lam = beta_draws(_hash(_MIX_SALT, policy_seed, rows, views, 2), alpha)
    return np.asarray(pool, np.int64)[picks.astype(np.int64)], lam.astype(np.float32)


def partner_seed(policy_seed: int) -> int:
    """The policy seed the partner side of a mixed view is rendered with: its own crops, flips and RandAugment."""
    return int(_hash(_PARTNER_SALT, policy_seed) >> np.uint64(1))


def batch_mixup(seed: int, step: int, n: int, alpha: float, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Online mixup of a batch of ``n`` rows: each row's partner (a permutation of the batch) and its weight
    ``lam`` (float32, ~ Beta(alpha, alpha)), functions of (seed, step, rank) only, so a resumed run replays them."""
    rng = np.random.Generator(np.random.PCG64(int(_hash(_BATCH_MIX_SALT, seed, step, rank))))
    return rng.permutation(n), rng.beta(alpha, alpha, n).astype(np.float32)


def mixup(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``lam * a + (1 - lam) * b`` per image (``lam`` of shape (n,)): the one mixing the teacher and the student
    share."""
    lam = lam.to(a.device, a.dtype).view(-1, *([1] * (a.dim() - 1)))
    return lam * a + (1 - lam) * b


def folder_box(width: int, height: int, seed: int) -> tuple[int, int, int, int]:
    """A random resized crop box (left, top, right, bottom) of a ``width`` x ``height`` image, drawn from
    ``seed`` alone (timm's scale and ratio ranges; the central crop of the nearest ratio after 10 misses)."""
    rng, area = random.Random(seed), width * height
    log_ratio = (math.log(FOLDER_RATIO[0]), math.log(FOLDER_RATIO[1]))
    for _ in range(10):
        target = rng.uniform(*FOLDER_SCALE) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < FOLDER_RATIO[0]:
        h = int(round(width / FOLDER_RATIO[0]))
    elif width / height > FOLDER_RATIO[1]:
        w = int(round(height * FOLDER_RATIO[1]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ViewMaker:
    """Renders views of rows of ``source`` at the model preprocessing ``prep``: ``inputs(ids, views)`` gives the
    normalised model inputs. Which region a view is depends on the policy alone, never on ``prep``. Mixed views
    need ``pool``: the row ids of the store (their sorted distinct ids must be the pool the policy records)."""

    def __init__(self, source: Source, prep: Preprocess, policy: ViewPolicy, pool: np.ndarray | None = None):
        if source_kind(source) != policy.kind:
            raise ArtifactError(f"the stored views were made from {policy.kind} data, this data is "
                                f"{source_kind(source)} data",
                                "distill with the data the store was computed on")
        self.source, self.prep, self.policy = source, prep, policy
        self.pool = None
        if policy.view_mix != "none":
            if pool is None:
                raise ValueError("mixed views need the partner pool (the store's row ids)")  # a bug
            self.pool = partner_pool(pool)
            if len(self.pool) != policy.pool_rows or pool_digest(self.pool) != policy.pool_digest:
                raise ArtifactError(f"the partner rows of the store's mixed views ({policy.pool_rows} rows) are not "
                                    f"the {len(self.pool)} rows it holds", "rerun `reducedmpl precompute` for "
                                    "this store (or distill.replay_views=false)")
        self.mean, self.std = prep.norm_tensors()
        self.randaugment = parse_randaugment(policy.randaugment) if policy.randaugment else None
        self._transforms: tuple[Any, Any] | None = None  # folders: (view 0's transform, RandAugment or None)
        self._augment: BatchedRandAugment | None = None  # arrays: made on first use
        self._draws = torch.Generator()  # arrays: RandAugment's draws, seeded per view
        self._shared: dict[str, torch.Tensor] | None = None  # arrays: images, labels in shared memory, for workers

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process gets: the transforms and the generator are made again there, on first use; an
        array source's images and labels go as tensors in shared memory (moved there once), which the workers map
        rather than each receiving a copy (and a small message starts a worker without waiting for it)."""
        state = {**self.__dict__, "_transforms": None, "_augment": None, "_draws": None}
        if self.source.images is not None:
            if self._shared is None:
                with warnings.catch_warnings():  # a read-only array (a memory map) is copied into shared memory
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    self._shared = {k: torch.from_numpy(np.ascontiguousarray(getattr(self.source, k))).share_memory_()
                                    for k in ("images", "labels")}
            state["source"] = dataclasses.replace(self.source, **{k: None for k in self._shared})
            state["_shared"] = self._shared
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._shared is not None:
            self.source = dataclasses.replace(self.source, **{k: t.numpy() for k, t in self._shared.items()})
        self._draws = torch.Generator()

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
        x = self.render(ids, views, self.policy.seed)
        if self.pool is None or not views.any():
            return x
        mixed = np.flatnonzero(views)
        partners, lam = mix_partners(self.policy.seed, ids[mixed], views[mixed], self.pool, self.policy.mix_alpha)
        other = self.render(partners, views[mixed], partner_seed(self.policy.seed))
        rows = torch.from_numpy(mixed)
        x[rows] = mixup(x[rows], other, torch.from_numpy(lam))
        return x

    def render(self, ids: np.ndarray, views: np.ndarray, seed: int) -> torch.Tensor:
        """The unmixed views ``views`` of rows ``ids``, their augmentation drawn from the policy seed ``seed``."""
        if self.source.images is None:
            return torch.stack([self.folder_item(int(r), int(v), seed) for r, v in zip(ids, views)])
        return self._array_inputs(ids, views, seed)

    def _array_inputs(self, ids: np.ndarray, views: np.ndarray, seed: int) -> torch.Tensor:
        images = torch.from_numpy(np.ascontiguousarray(self.source.images[ids])).permute(0, 3, 1, 2)
        if self.randaugment is not None and views.any():
            images = self._randaugment(images, ids, views, seed)
        x = center_crop(images.float().div_(255.0), self.policy.crop_pct)
        x = resize(self._crop_flip(x, ids, views, seed), self.prep.input_size, self.prep.interpolation)
        return normalise(x, self.prep, self.mean, self.std)

    def _randaugment(self, images: torch.Tensor, ids: np.ndarray, views: np.ndarray, seed: int) -> torch.Tensor:
        """RandAugment of each augmented view: torchvision's per-image ``v2.RandAugment`` after
        ``torch.manual_seed(view_seed(...))`` (what a store of scheme 2 records), its draws made from a generator
        of this maker's and its ops applied a batch at a time (:class:`loading.BatchedRandAugment`)."""
        if self._augment is None:
            self._augment = BatchedRandAugment(*self.randaugment)
        augmented = np.flatnonzero(views)
        seeds = view_seeds(seed, ids[augmented], views[augmented])
        h, w = images.shape[-2:]
        plans = []
        for one in seeds.tolist():
            self._draws.manual_seed(one)
            plans.append(self._augment.plan(self._draws, h, w))
        rows = torch.from_numpy(augmented)
        out = images.clone()
        out[rows] = self._augment.apply(images[rows], plans)
        return out

    def source_padding(self, side: int) -> int:
        """``crop_padding`` (counted at the teacher's input size) in pixels of an image of ``side`` pixels."""
        p = self.policy.crop_padding
        return 0 if p <= 0 else max(1, round(p * side / self.policy.input_size))

    def _crop_flip(self, x: torch.Tensor, ids: np.ndarray, views: np.ndarray, seed: int) -> torch.Tensor:
        """The shifted crop (offsets 0..2p of the p-padded image, in its own pixels) and the flip of every augmented
        view, for the whole batch at once; view 0 is cropped at the centre (the image itself), never flipped."""
        (n, _, h, w), augmented = x.shape, views > 0
        p = self.source_padding(min(h, w))
        if p > 0:
            span = np.uint64(2 * p + 1)
            oy = np.where(augmented, _hash(_CROP_SALT, seed, ids, views, 1) % span, p).astype(np.int64)
            ox = np.where(augmented, _hash(_CROP_SALT, seed, ids, views, 2) % span, p).astype(np.int64)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            ys = torch.from_numpy(oy)[:, None] + torch.arange(h)
            xs = torch.from_numpy(ox)[:, None] + torch.arange(w)
            x = padded[torch.arange(n)[:, None, None], :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
        if self.policy.hflip:
            flip = augmented & (_hash(_CROP_SALT, seed, ids, views, 3) & np.uint64(1)).astype(bool)
            x = torch.where(torch.from_numpy(flip).view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def folder_region(self, row: int, view: int, width: int, height: int,
                      seed: int | None = None) -> tuple[tuple[int, int, int, int], bool]:
        """The crop box (left, top, right, bottom, in the image's pixels) and flip of an augmented view (drawn
        from the policy seed, or from ``seed``)."""
        seed = self.policy.seed if seed is None else seed
        box = folder_box(width, height, view_seed(seed, row, view))
        flip = self.policy.hflip and bool(_hash(_CROP_SALT, seed, row, view, 3) & np.uint64(1))
        return box, flip

    def folder_item(self, row: int, view: int, seed: int | None = None) -> torch.Tensor:
        """One encoded image's view: view 0 through the evaluation transform with the teacher's crop; an augmented
        view's region cropped and resized in one step, flipped, then RandAugment seeded by the view."""
        from PIL import Image
        from timm.data.transforms import str_to_pil_interp
        from torchvision.transforms.functional import pil_to_tensor

        if self._transforms is None:  # made once, on first use (also in a worker)
            self._transforms = self._folder_transforms()
        img = self.source.pil_image(row, "RGB")
        if view == 0:
            return match_channels(self._transforms[0](img)[None], self.prep.in_chans)[0]
        seed = self.policy.seed if seed is None else seed
        box, flip = self.folder_region(row, view, *img.size, seed)
        size, interp = self.prep.input_size, str_to_pil_interp(self.prep.interpolation)
        img = img.resize((size, size), interp, box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self._transforms[1] is not None:
            with seeded_process_rngs(view_seed(seed, row, view)):
                img = self._transforms[1](img)
        x = pil_to_tensor(img)[None].float().div_(255.0)
        return normalise(x, self.prep, self.mean, self.std)[0]

    def _folder_transforms(self) -> tuple[Any, Any]:
        """(view 0's evaluation transform at the teacher's crop, RandAugment at this size or None)."""
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        clean = folder_transform(dataclasses.replace(self.prep, crop_pct=self.policy.crop_pct), False, None, False)
        augment = None
        if self.randaugment is not None:
            m, n = self.randaugment
            hparams = {"translate_const": int(self.prep.input_size * 0.45), "img_mean": self.policy.fill,
                       "interpolation": str_to_pil_interp(self.prep.interpolation)}
            augment = rand_augment_transform(f"rand-m{m}-n{n}", hparams)
        return clean, augment


class ViewBatches(torch.utils.data.Dataset):
    """Batches of views made by ``maker``, for a DataLoader in worker processes (or in this one): a key is one
    batch, ``(ids, views, labels)`` as arrays, its item ``(inputs, labels, ids)`` as tensors; keys come one to a
    batch (:meth:`collate` unwraps them). Each item is ``maker.inputs(ids, views)``, whichever process makes it."""

    def __init__(self, maker: ViewMaker):
        self.maker = maker

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[torch.Tensor, ...]:
        ids, views, labels = key
        return self.maker.inputs(ids, views), torch.from_numpy(labels), torch.from_numpy(ids)

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        return items[0]
