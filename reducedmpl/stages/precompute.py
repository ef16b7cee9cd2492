"""``reducedmpl precompute``: run the large teacher once over the data and store its logits.

Reads top to bottom: open the teacher (a ``teacher.pt`` artifact, or plain timm weights), rebuild the data and
splits, lay the rows out (by split, then id), derive the run key, look at what ``--out`` already holds, then
compute the missing shards and write the master file that joins them.

Crash safety comes from the store (:mod:`reducedmpl.targets`): every shard is written under a temporary name and
renamed only when complete, and the master is written last. Running the same command again after a crash keeps
the complete shards of this exact job (same run key), recomputes the others and writes the master, which gives
the same store as an uninterrupted run. Rows are written from a background thread, in blocks, while the teacher
runs on the next batches; the inputs of stored views are rendered in ``data.num_workers`` DataLoader workers
ahead of the teacher (:class:`ViewInputs`).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from rich.console import Console
from torch import nn

from .. import __version__, distributed
from ..config import DataConfig, PrecomputeConfig, to_dict
from ..data.loading import Batcher, Preprocess, default_preprocess
from ..data.sources import Source, load_source
from ..data.splits import Splits, make_splits
from ..data.views import ViewBatches, ViewMaker, ViewPolicy, make_policy
from ..engine.device import prepare_model, resolve_device
from ..engine.evaluation import predict_logits
from ..engine.interrupt import stop_point
from ..engine.progress import HeldConsole, progress, rank_output
from ..errors import ArtifactError, ConfigError, DataError
from ..files import refuse_overwrite
from ..models import (ARTIFACT_KEYS, check_finite, check_model_name, create_model, load_artifact, load_state_dict_file,
                      check_artifact_data, load_weights, model_from_artifact)
from ..targets import (MASTER_NAME, SPLIT_NAMES, ShardWriter, StoreLock, StoreMeta, derive_run_key, file_sha256, plan_shards,
                       prepare_store, shard_is_complete, shard_paths, stored_predictions, target_bytes_per_row,
                       write_master)

# The data settings that decide which rows go into which split (the rest only change augmentation/loading).
SPLIT_KEYS = ("source", "split_seed", "val_size", "test_size", "use_official_test", "labeled_per_class",
              "labeled_fraction", "image_column", "label_column", "hf_config", "hf_splits", "hf_test_split")
UNLABELED = -1


# ---------------------------------------------------------------------------------------------- the teacher
@dataclass
class Teacher:
    """Where the teacher comes from: a ``teacher.pt`` artifact, or plain weights plus a timm name."""

    path: Path  # teacher.pt, or the weights file
    arch: str
    artifact: dict | None = None  # None for plain weights (--model/--checkpoint)

    @property
    def recorded_data(self) -> dict | None:
        """The DataConfig dict the teacher was trained on (artifacts only)."""
        return dict(self.artifact["data"]) if self.artifact is not None else None


def open_teacher(teacher: str | Path | None = None, model: str | None = None,
                 checkpoint: str | Path | None = None) -> Teacher:
    """``--teacher teacher.pt``, or ``--model NAME --checkpoint PATH`` (.pt/.pth/.safetensors weights)."""
    if teacher is not None and (model is not None or checkpoint is not None):
        raise ConfigError("pass either --teacher or --model with --checkpoint, not both",
                          "--teacher takes a teacher.pt written by train-large; --model/--checkpoint plain weights")
    if teacher is not None:
        art = _mapped_artifact(Path(teacher)) or load_artifact(teacher, "teacher")
        check_finite(art["state_dict"], teacher, "teacher")
        return Teacher(Path(teacher), art["arch"], art)
    if model is None or checkpoint is None:
        missing = "--checkpoint" if model is not None else "--model" if checkpoint is not None else "--teacher"
        raise ConfigError(f"no teacher given ({missing} is missing)",
                          "pass --teacher runs/NAME/teacher.pt, or --model NAME --checkpoint PATH")
    check_model_name(model)
    if not Path(checkpoint).is_file():
        raise ArtifactError(f"checkpoint {checkpoint} does not exist", "check the path")
    return Teacher(Path(checkpoint), model)


def _mapped_artifact(path: Path) -> dict | None:
    """A teacher artifact whose tensors are memory-mapped, not read: 7 ms instead of 30 ms for a resnet18, so
    the data can start loading sooner (the weights are read when the model copies them, beside the data).
    None for anything :func:`models.load_artifact` would not accept as it is; that one then says why."""
    try:
        art = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_artifact names the problem
        return None
    if isinstance(art, dict) and art.get("kind") == "teacher" and all(k in art for k in ARTIFACT_KEYS):
        return art
    return None


def config_base(teacher: Teacher) -> dict | None:
    """Lowest layer of the precompute config: the teacher's recorded data, so `--set data.x=...` edits it."""
    data = teacher.recorded_data
    return {"data": data} if data is not None else None


def teacher_model(teacher: Teacher) -> nn.Module:
    """The artifact's model, as :func:`models.model_from_artifact` builds it, without the throw-away init.

    The model is created on the meta device, given fresh uninitialised memory, then a copy of the artifact's
    weights: 0.04 s instead of 0.11 s for a resnet18, which counts in precompute's overhead, and forward passes
    as fast (measured). Models with buffers outside the state dict (e.g. swin's attention index) are built the
    ordinary way.
    """
    art = teacher.artifact
    prep = Preprocess.from_dict(art["preprocess"])
    try:
        with torch.device("meta"):
            model = create_model(art["arch"], art["num_classes"], art["in_chans"], input_size=prep.input_size,
                                 **art.get("model_args", {}))
        tensors = {name for name, _ in itertools.chain(model.named_parameters(), model.named_buffers())}
        if tensors <= set(art["state_dict"]):  # every tensor comes from the artifact
            model = model.to_empty(device="cpu")
            model.load_state_dict(art["state_dict"])
            return model
    except (RuntimeError, NotImplementedError):
        pass  # the ordinary path below names the problem
    try:
        return model_from_artifact(art)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ArtifactError(f"the weights in teacher {teacher.path} do not fit {art['arch']!r} ({first[:120]})",
                            "write the teacher again with train-large") from None


def _teacher_from_weights(teacher: Teacher, source: Source, prep: Preprocess) -> tuple[nn.Module, Preprocess]:
    """A timm model with the checkpoint's weights; its class count must be the data's."""
    sd = load_state_dict_file(teacher.path)
    model = create_model(teacher.arch, source.num_classes, prep.in_chans, input_size=prep.input_size)
    classifier = model.pretrained_cfg.get("classifier", "fc")
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    head = sd.get(f"{classifier}.weight")
    if head is not None and head.ndim >= 1 and head.shape[0] != source.num_classes:
        raise ArtifactError(f"checkpoint {teacher.path} has a classifier for {head.shape[0]} classes, the data "
                            f"{source.spec!r} has {source.num_classes}",
                            "pass weights trained on this data's classes (or fine-tune them with train-large)")
    first_conv = model.pretrained_cfg.get("first_conv")
    stem = sd.get(f"{first_conv}.weight") if isinstance(first_conv, str) else None
    if stem is not None and stem.ndim == 4 and stem.shape[1] != prep.in_chans:  # e.g. RGB weights, grey data
        prep = dataclasses.replace(prep, in_chans=int(stem.shape[1]))
        model = create_model(teacher.arch, source.num_classes, prep.in_chans, input_size=prep.input_size)
    load_weights(model, teacher.path, teacher.arch)
    return model, prep


# ---------------------------------------------------------------------------------------------- the rows
@dataclass
class Rows:
    """The rows of the store in order (by split in SPLIT_NAMES order, then id)."""

    ids: np.ndarray  # int64 row ids of the source
    labels: np.ndarray  # int64, -1 for unlabeled rows
    splits: np.ndarray  # uint8 codes into SPLIT_NAMES
    sizes: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.ids))


def lay_out_rows(source: Source, splits: Splits, names: list[str]) -> Rows:
    chosen = [s for s in SPLIT_NAMES if s in names]
    ids = [splits.indices[s] for s in chosen]
    labels = [np.full(len(i), UNLABELED, np.int64) if s == "unlabeled" else source.labels[i].astype(np.int64)
              for s, i in zip(chosen, ids)]
    codes = [np.full(len(i), SPLIT_NAMES.index(s), np.uint8) for s, i in zip(chosen, ids)]
    return Rows(np.concatenate(ids).astype(np.int64), np.concatenate(labels), np.concatenate(codes),
                {s: int(len(i)) for s, i in zip(chosen, ids)})


# ---------------------------------------------------------------------------------------------- the output
def resolve_out(out: str | Path | None, teacher: Teacher) -> Path:
    """``--out`` as the master file: a folder (or a name without .h5) gets ``targets.h5`` inside."""
    if out is None:
        if teacher.artifact is None:
            raise ConfigError("--out is required with --model/--checkpoint", "pass --out PATH/targets.h5")
        return teacher.path.parent / MASTER_NAME
    out = Path(out)
    refuse_overwrite({"the teacher": teacher.path}, [out], "choose another --out: the teacher is this command's input")
    if out.is_dir() or out.suffix not in (".h5", ".hdf5"):
        out = out / MASTER_NAME
    return out


# Ctrl-C inside graceful_stop(notice=STOP_NOTICE) stops at the next stop_point(): between two batches
STOP_NOTICE = "stopping after this batch; finished shards are kept (Ctrl-C again to stop at once)"


# ---------------------------------------------------------------------------------------------- writing
WRITE_BLOCK_BYTES = 1 << 20  # rows are written in blocks of about this much float32 logits (at least a batch)


class _BackgroundWriter:
    """Writes rows into a :class:`ShardWriter` from one background thread, in blocks, beside the forward passes.

    ``add`` only collects a batch's rows. ``dispatch``, called right after the next batch is made and before
    its forward pass, hands a full block to the thread, so the write runs beside that forward pass (which
    leaves Python's GIL free) instead of beside the making of the batch. Blocks of ~1 MiB mean few HDF5 calls
    when the rows are small. At most one block is in flight; its error is raised at the next ``dispatch`` or on
    leaving the ``with`` block, which always waits for it (so the shard is never closed under a write).
    """

    def __init__(self, writer: ShardWriter, pool: ThreadPoolExecutor):
        self.writer, self.pool = writer, pool
        self.block_rows = max(1, WRITE_BLOCK_BYTES // (4 * writer.meta.num_classes * writer.meta.views))
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._rows = 0
        self._pending: Future | None = None

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.dispatch(force=True)
            self._wait()
        elif self._pending is not None:
            wait([self._pending])  # its own error, if any, is secondary to the one in flight

    def add(self, *columns: np.ndarray) -> None:
        self._parts.append(columns)
        self._rows += len(columns[0])

    def dispatch(self, force: bool = False) -> None:
        if not self._parts or (self._rows < self.block_rows and not force):
            return
        self._wait()
        parts, self._parts, self._rows = self._parts, [], 0
        columns = parts[0] if len(parts) == 1 else [np.concatenate(c) for c in zip(*parts)]
        self._pending = self.pool.submit(self.writer.append, *columns)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def _dispatching(batches: Iterable, out: _BackgroundWriter) -> Iterator:
    """``batches``, starting the write of the rows so far after each batch is made (before its forward pass)."""
    for batch in batches:
        out.dispatch()
        yield batch


def split_accuracy(pred: np.ndarray, rows: Rows) -> dict[str, float]:
    """The teacher's top-1 accuracy on the rows with labels, per split."""
    out = {}
    for code, name in enumerate(SPLIT_NAMES):
        mask = (rows.splits == code) & (rows.labels >= 0)
        if mask.any():
            out[name] = float((pred[mask] == rows.labels[mask]).mean())
    return out


def _prefetched(batcher: Batcher, pool: ThreadPoolExecutor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches of ``batcher`` in order; the next one is made in ``pool`` while the caller uses this one.

    Only for a GPU teacher: on a CPU the forward pass already uses every core, and making batches beside it
    was measured to slow it down more than it saves (resnet18 on MNIST, 2 cores: +12 % wall time).
    """
    pending = pool.submit(batcher.batch, 0, 0)
    for b in range(len(batcher)):
        batch = pending.result()
        if b + 1 < len(batcher):
            pending = pool.submit(batcher.batch, 0, b + 1)
        yield batch


class ViewInputs:
    """The inputs of views 1..V-1 of the rows of each shard, in row order, made by ``maker`` in ``workers``
    DataLoader processes (``data.num_workers``) ahead of use, or in this process with 0.

    ``start(ids)`` sets the rows of a shard and ``take(n)`` gives the chunks of the next ``n`` of them: for every
    batch of ``batch_size`` rows precompute runs, the keys (row, view) of its views in chunks of ``batch_size``
    inputs, the same chunks with any worker count. The workers stay alive across shards; spawned, not forked, as
    :func:`data.loading._folder_loader` explains."""

    def __init__(self, maker: ViewMaker, batch_size: int, workers: int):
        self.maker, self.batch_size, self.extra = maker, batch_size, maker.policy.views - 1
        self._sampler = _Keys()
        extra = {"persistent_workers": True, "prefetch_factor": 4, "multiprocessing_context": "spawn",
                 "pin_memory": torch.cuda.is_available()} if workers > 0 else {}
        batches = ViewBatches(maker)
        self._loader = torch.utils.data.DataLoader(batches, batch_sampler=self._sampler, num_workers=workers,
                                                   collate_fn=batches.collate, **extra)
        self._chunks: Iterator | None = None

    def _keys(self, ids: np.ndarray) -> Iterator[list]:
        for b in range(0, len(ids), self.batch_size):
            rows = np.asarray(ids[b:b + self.batch_size], np.int64)
            keys = np.repeat(rows, self.extra), np.tile(np.arange(1, self.extra + 1), len(rows))
            for s in range(0, len(keys[0]), self.batch_size):
                chunk = keys[0][s:s + self.batch_size]
                yield [(chunk, keys[1][s:s + self.batch_size], np.full(len(chunk), UNLABELED, np.int64))]

    def start(self, ids: np.ndarray) -> None:
        self._sampler.keys = list(self._keys(ids))
        with warnings.catch_warnings():  # torch's advice on more workers than cores: the user chose the count
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            self._chunks = iter(self._loader)

    def take(self, n: int) -> Iterator[torch.Tensor]:
        """The input chunks of the views of the next ``n`` rows (a batch of at most ``batch_size``)."""
        for _ in range(-(-n * self.extra // self.batch_size)):
            yield next(self._chunks)[0]


class _Keys(torch.utils.data.Sampler):
    """A fixed list of batch keys, set before each pass."""

    def __init__(self):
        self.keys: list = []

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return iter(self.keys)


def view_logits(model: nn.Module, views: ViewInputs, n: int, device: torch.device, cfg: PrecomputeConfig,
                amp: bool) -> np.ndarray:
    """float32 (n, V-1, C): the teacher's logits on views 1..V-1 of the next ``n`` rows of ``views``."""
    chunks = ((x, None, None) for x in views.take(n))
    out = [logits.numpy() for logits, _, _ in predict_logits(model, chunks, device, amp, cfg.channels_last)]
    return np.concatenate(out).reshape(n, views.extra, -1)


def compute_shard(model: nn.Module, batcher: Batcher | None, rows: Rows, start: int, stop: int, writer: ShardWriter,
                  pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor], device: torch.device, cfg: PrecomputeConfig,
                  pred: np.ndarray, advance: Callable[[int], None], views: ViewInputs | None = None) -> None:
    """Teacher logits for rows ``start:stop`` into ``writer`` (and their top-1 class on view 0 into ``pred``), in
    row order; with ``views`` also on each row's augmented views."""
    if batcher is None:  # an empty shard (more shards than rows)
        return
    if views is not None:
        views.start(rows.ids[start:stop])
    amp = cfg.amp and device.type == "cuda"
    pos = start
    write_pool, batch_pool = pools
    batches = _prefetched(batcher, batch_pool) if device.type == "cuda" and not batcher.prefetches \
        else batcher.epoch(0)
    with _BackgroundWriter(writer, write_pool) as out:
        for logits, _, ids in predict_logits(model, _dispatching(batches, out), device, amp, cfg.channels_last):
            n = len(ids)
            sl = slice(pos, pos + n)
            if not np.array_equal(ids.numpy(), rows.ids[sl]):
                raise RuntimeError("batches came out of row order")  # a bug, never a user error
            logits = logits.numpy()
            pred[sl] = logits.argmax(axis=1)
            extra = () if views is None else (view_logits(model, views, n, device, cfg, amp),)
            out.add(rows.ids[sl], rows.labels[sl], rows.splits[sl], logits, *extra)
            pos += n
            advance(n)
            stop_point()  # a Ctrl-C stops here, between batches


# ---------------------------------------------------------------------------------------------- the stage
@dataclass
class TeacherData:
    config: DataConfig
    source: Source
    splits: Splits


def setup_data(cfg: PrecomputeConfig, teacher: Teacher, console: Console) -> TeacherData:
    """The data to run over; refuses a teacher whose own recorded data no longer matches what is on disk."""
    if cfg.data is None:
        raise ConfigError("--model/--checkpoint needs --data (plain weights do not record their data)",
                          "pass --data SOURCE, e.g. --data mnist:DIR")
    source = load_source(cfg.data.source, cfg.data)
    splits = make_splits(source, cfg.data)
    art = teacher.artifact
    if art is None:
        return TeacherData(cfg.data, source, splits)
    if source.num_classes != art["num_classes"] or list(source.class_names) != list(art["class_names"]):
        raise ArtifactError(f"teacher {teacher.path} predicts {art['num_classes']} classes "
                            f"({_short(art['class_names'])}), the data {source.spec!r} has {source.num_classes} "
                            f"({_short(source.class_names)})", "precompute with data of the teacher's classes")
    recorded = teacher.recorded_data or {}
    if all(to_dict(cfg.data).get(k) == recorded.get(k) for k in SPLIT_KEYS):
        check_artifact_data(art, splits.fingerprints, teacher.path)  # the teacher's own data: it must still be the same
    else:
        differs = [k for k, fp in splits.fingerprints.items() if art["data_fingerprints"].get(k) != fp]
        if differs:
            leak = " (the teacher may have seen some val/test rows)" if {"val", "test"} & set(differs) else ""
            console.print(f"note: splits {', '.join(differs)} differ from the data the teacher was trained on; "
                          f"the store records the new fingerprints{leak}")
    return TeacherData(cfg.data, source, splits)


def _short(names: list[str], n: int = 4) -> str:
    return ", ".join(map(str, names[:n])) + (", ..." if len(names) > n else "")


def build_meta(cfg: PrecomputeConfig, teacher: Teacher, data: TeacherData, prep: Preprocess, class_names: list[str],
               sha256: str, ids: np.ndarray) -> StoreMeta:
    """The store's metadata; ``ids`` are the rows it holds (mixed views draw their partners from them)."""
    kept = [s for s in SPLIT_NAMES if s in cfg.splits]
    policy = make_policy(cfg.views, cfg.view_seed, data.config, prep, data.source, cfg.view_mix, cfg.mix_alpha,
                         ids).to_dict() if cfg.views > 1 else {}
    meta = StoreMeta(
        teacher_arch=teacher.arch, teacher_sha256=sha256, class_names=list(class_names),
        data_spec=data.config.source, split_seed=data.config.split_seed,
        fingerprints={s: data.splits.fingerprints[s] for s in kept}, temperature=cfg.temperature,
        dtype=cfg.dtype, topk=cfg.topk, tool_version=__version__,
        config={"data": to_dict(data.config), "precompute": to_dict(cfg), "preprocess": prep.to_dict()},
        views=cfg.views, view_policy=policy)
    try:
        meta.validate()
    except ValueError as e:
        raise ConfigError(f"precompute settings do not fit this teacher: {e}",
                          f"the teacher has {len(class_names)} classes; use --topk below that (0: dense)") from None
    meta.run_key = derive_run_key(meta, len(ids), cfg.shards)
    return meta


def _prepare(cfg: PrecomputeConfig, teacher: Teacher,
             console: Console) -> tuple[nn.Module, TeacherData, Preprocess, Rows, StoreMeta]:
    """The teacher network, the data, its preprocessing, the rows to compute and the store's metadata."""
    with ThreadPoolExecutor(2) as pool:  # hashing the teacher and loading the data overlap building the model
        sha_future = pool.submit(file_sha256, teacher.path)
        data_future = pool.submit(setup_data, cfg, teacher, console)
        if teacher.artifact is not None:
            prep = Preprocess.from_dict(teacher.artifact["preprocess"])
            model, class_names = teacher_model(teacher), list(teacher.artifact["class_names"])
            data = data_future.result()
        else:
            data = data_future.result()
            prep = default_preprocess(data.source, data.splits.indices["labeled"], data.config)
            model, prep = _teacher_from_weights(teacher, data.source, prep)
            class_names = list(data.source.class_names)
        rows = lay_out_rows(data.source, data.splits, cfg.splits)
        if len(rows) == 0:
            raise DataError(f"the splits {', '.join(cfg.splits)} of {data.source.spec!r} hold no rows",
                            "choose other --splits or data settings")
        return model, data, prep, rows, build_meta(cfg, teacher, data, prep, class_names, sha_future.result(),
                                                   rows.ids)


def run(cfg: PrecomputeConfig, teacher: Teacher, out: str | Path | None = None, *, overwrite: bool = False,
        console: Console | None = None, quiet: bool = False) -> dict:
    """Write the targets store for ``teacher`` at ``out``; returns a summary (see :func:`summary_line`)."""
    t0 = time.perf_counter()
    out = resolve_out(out, teacher)
    device = resolve_device(cfg.device)
    dist = distributed.setup(device)
    console, quiet = rank_output(dist, console, quiet)
    console = HeldConsole(console)  # notes wait until the checks pass: a refusal prints one line
    model, data, prep, rows, meta = _prepare(cfg, teacher, console)

    if cfg.shards > len(rows):
        raise ConfigError(f"precompute.shards is {cfg.shards}, more than the {len(rows)} rows to store",
                          f"choose at most {len(rows)} shards")
    paths = shard_paths(out, cfg.shards)
    refuse_overwrite({"the teacher": teacher.path}, [out, *paths], "choose another --out: the teacher is the input")
    result = {"path": str(out), "rows": len(rows), "rows_per_split": rows.sizes, "run_key": meta.run_key,
              "views": meta.views, "target_bytes_per_row": target_bytes_per_row(meta),
              "shards": cfg.shards}
    lock = StoreLock(out) if dist.is_main else None  # one writer of `out` until this returns
    try:
        up_to_date = dist.on_main(lambda: prepare_store(out, meta, paths, overwrite, console.print))
        console.release()
        if up_to_date:
            return {**result, "up_to_date": True, "seconds": time.perf_counter() - t0, "bytes": _bytes(out, paths)}
        # which shards are left is decided once, by rank 0, for every rank: a rank that looked for itself could
        # see a shard another rank had already finished and deal the work out differently, leaving a shard undone
        todo = dist.on_main(lambda: [i for i, p in enumerate(paths) if not shard_is_complete(p, meta)])
        if len(todo) < len(paths):
            console.print(f"resuming: {len(paths) - len(todo)} of {len(paths)} shards are already complete")
        if 0 < len(todo) < dist.world_size:
            console.print(f"note: {len(todo)} shard(s) to compute for {dist.world_size} processes, so some "
                          f"processes wait; pass --shards {dist.world_size} (precompute.shards; or a multiple) to "
                          f"use them all")
        pred = _compute(cfg, model, data, prep, rows, meta, out, paths, todo, device, dist, quiet)
    finally:
        if lock is not None:
            lock.release()
    return {**result, "up_to_date": False, "computed_shards": len(todo), "accuracy": split_accuracy(pred, rows),
            "seconds": time.perf_counter() - t0, "bytes": _bytes(out, paths)}


def _compute(cfg: PrecomputeConfig, model: nn.Module, data: TeacherData, prep: Preprocess, rows: Rows,
             meta: StoreMeta, out: Path, paths: list[Path], todo: list[int], device: torch.device,
             dist: distributed.Dist, quiet: bool) -> np.ndarray:
    """This rank's share of the shards still to do, then (rank 0) the master; the teacher's top-1 class per row."""
    ranges = plan_shards(len(rows), len(paths))
    mine = todo[dist.rank::dist.world_size]  # the shards still to do, dealt out round the ranks
    model = prepare_model(model, device, cfg.channels_last)
    pred = np.zeros(len(rows), np.int64)
    views = ViewInputs(ViewMaker(data.source, prep, ViewPolicy.from_dict(meta.view_policy), rows.ids),
                       cfg.batch_size, data.config.num_workers) if meta.views > 1 else None
    todo_rows = sum(ranges[i][1] - ranges[i][0] for i in mine)
    with progress(disable=quiet) as bar, ThreadPoolExecutor(1) as write_pool, ThreadPoolExecutor(1) as batch_pool:
        task = bar.add_task("teacher logits", total=todo_rows, info="")
        for i in mine:
            start, stop = ranges[i]
            batcher = Batcher(data.source, rows.ids[start:stop], prep, data.config, batch_size=cfg.batch_size,
                              train=False, seed=0) if stop > start else None
            with ShardWriter(paths[i], meta, stop - start, i, len(paths), start) as writer:
                compute_shard(model, batcher, rows, start, stop, writer, (write_pool, batch_pool), device, cfg, pred,
                              lambda n: bar.update(task, advance=n, info=f"shard {i + 1}/{len(paths)}"), views)
    dist.barrier()  # every rank's shards are committed
    if dist.is_main:
        for i, path in enumerate(paths):
            if i not in mine:
                pred[slice(*ranges[i])] = stored_predictions(path, meta)
        write_master(out, paths, meta)
    dist.barrier()  # the master is written before any rank goes on to use it
    return pred


def _bytes(out: Path, paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in [out, *paths] if p.exists())


def summary_line(result: dict) -> str:
    """One line: rows per split (with the teacher's accuracy where rows have labels), time, bytes, path."""
    if result.get("up_to_date"):
        return (f"{result['path']} is up to date ({result['rows']} rows, run key {result['run_key'][:12]}); "
                f"nothing to do (--overwrite recomputes it)")
    acc = result.get("accuracy", {})
    parts = [f"{name} {n}" + (f" (teacher acc {100 * acc[name]:.2f}%)" if name in acc else "")
             for name, n in result["rows_per_split"].items()]
    return (f"targets: {', '.join(parts)}; {result['computed_shards']}/{result['shards']} shards computed in "
            f"{result['seconds']:.1f} s; {result['bytes']:,} bytes{_per_row(result)} -> {result['path']}")


def _per_row(result: dict) -> str:
    views = result.get("views", 1)
    return f" ({views} views, {result['target_bytes_per_row']:,} target bytes per row)" if views > 1 else ""
