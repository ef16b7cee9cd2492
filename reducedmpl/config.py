"""Typed configuration for every stage.

A pipeline file (YAML, loaded with ``yaml.safe_load``) has one section per stage plus a shared ``data``
section::

    name: digits
    data: {source: digits, labeled_per_class: 10}
    train_large: {model: resnet18, epochs: 30}
    precompute: {dtype: float16}
    distill: {student: test_resnet, steps: 1000}
    compare: {...}

Each stage command builds its dataclass from the file (if given), then ``--set key=value`` overrides, then
explicit command-line flags. Unknown keys and wrong types are errors that name the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .yamltext import YAML_MAX_BYTES, YamlTooLarge, bounded_safe_load, too_long


# Ranges checked before anything is allocated in proportion to them
MAX_INPUT_SIZE = 4096  # pixels on a side
MAX_SHARDS = 10_000


# --------------------------------------------------------------------------------------------------- sections
START_METHODS = ("auto", "fork", "spawn")  # data.start_method (auto: data.loading.start_method)


@dataclass
class DataConfig:
    """Which data, how it is split, and how it is augmented."""

    source: str = "digits"
    split_seed: int = 0
    val_size: float = 0.1  # a fraction of the pool (< 1) or a count of examples (>= 1)
    test_size: float = 0.2
    use_official_test: bool = False  # take the source's own test split (mnist t10k, cifar test batch, folder val/)
    labeled_per_class: int | None = None  # labeled examples per class within train; the rest is unlabeled
    labeled_fraction: float | None = None  # or a fraction of train; neither: all of train is labeled
    input_size: int | None = None  # square side the images are resized to; None keeps the source's size
    crop_padding: int = 2  # random-crop augmentation padding, in pixels at input_size (0 disables)
    hflip: bool = False
    randaugment: str | None = None  # e.g. "rand-m9-n2" (magnitude 9, 2 ops)
    num_workers: int = 0  # DataLoader workers for image folders (and hf: / wds: sources)
    start_method: str = "auto"  # how DataLoader workers start: auto, fork or spawn
    image_column: str | None = None  # hf: the image column (default: the one Image feature); wds: the image field
    label_column: str | None = None  # hf: the label column (default: the one ClassLabel); wds: the label field
    hf_config: str | None = None  # hf: the dataset's configuration (subset) name
    hf_splits: list[str] | None = None  # hf: the dataset's splits read, in order (default: all of them)
    hf_test_split: str | None = None  # hf: which of them is the official test split (default: test, else validation)

    def validate(self) -> None:
        _check(self.val_size >= 0, "data.val_size must be >= 0")
        _check(self.test_size >= 0, "data.test_size must be >= 0")
        _check(not (self.labeled_per_class is not None and self.labeled_fraction is not None),
               "set only one of data.labeled_per_class and data.labeled_fraction")
        _check(self.labeled_per_class is None or self.labeled_per_class >= 1, "data.labeled_per_class must be >= 1")
        _check(self.labeled_fraction is None or 0 < self.labeled_fraction <= 1,
               "data.labeled_fraction must be in (0, 1]")
        _check(self.input_size is None or 4 <= self.input_size <= MAX_INPUT_SIZE,
               f"data.input_size must be in 4..{MAX_INPUT_SIZE}")
        _check(self.crop_padding >= 0, "data.crop_padding must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.start_method in START_METHODS,
               f"data.start_method must be one of {', '.join(START_METHODS)}, got {self.start_method!r}")
        if self.randaugment is not None:
            parse_randaugment(self.randaugment)
        self._validate_source_settings()

    def _validate_source_settings(self) -> None:
        kind = self.source.partition(":")[0].strip().lower() if isinstance(self.source, str) else ""
        for name in ("image_column", "label_column", "hf_config", "hf_test_split"):
            value = getattr(self, name)
            _check(value is None or value.strip() != "", f"data.{name} must not be empty")
            _check(value is None or kind in (("hf", "wds") if name.endswith("column") else ("hf",)),
                   f"data.{name} applies to {'hf: and wds:' if name.endswith('column') else 'hf:'} sources, "
                   f"not to {kind or 'this'}:")
        if self.hf_splits is not None:
            _check(kind == "hf", f"data.hf_splits applies to hf: sources, not to {kind or 'this'}:")
            _check(len(self.hf_splits) > 0 and all(s.strip() for s in self.hf_splits),
                   "data.hf_splits must name at least one split")
            _check(len(set(self.hf_splits)) == len(self.hf_splits), "data.hf_splits names a split twice")


@dataclass
class OptimConfig:
    """Optimizer and schedule, passed to timm's factories."""

    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # in epochs for train-large, in steps' share (0..1) of training for distill
    min_lr: float = 0.0
    layer_decay: float | None = None  # timm's layer-wise lr decay (e.g. 0.75 when fine-tuning a pretrained ViT)

    def validate(self, prefix: str) -> None:
        _check(self.lr > 0, f"{prefix}.lr must be > 0 (got {self.lr})")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0")
        _check(0 <= self.momentum < 1, f"{prefix}.momentum must be in [0, 1)")
        _check(self.warmup_epochs >= 0, f"{prefix}.warmup_epochs must be >= 0")
        _check(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr must be in [0, lr]")
        _check(self.layer_decay is None or 0 < self.layer_decay <= 1, f"{prefix}.layer_decay must be in (0, 1]")


@dataclass
class TrainLargeConfig:
    """``reducedmpl train-large``: train (or load) the large teacher on the labeled split."""

    data: DataConfig = field(default_factory=DataConfig)
    model: str = "resnet18"  # a timm name: NAME, NAME.TAG or hf-hub:ORG/NAME
    init: str = "scratch"  # "scratch", "pretrained" (the name's hub weights) or "checkpoint:PATH"
    reset_head: bool = False  # allow a checkpoint whose classifier has another number of classes
    # the model's own preprocessing; None: data.input_size, else its pretrained configuration, else the data's
    input_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    epochs: int = 30
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    label_smoothing: float = 0.1
    drop_rate: float = 0.0
    ema: bool = False
    ema_decay: float = 0.998
    clip_grad: float | None = None
    select: Literal["last", "best"] = "last"  # which weights become teacher.pt (best: by validation accuracy)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the model

    def validate(self) -> None:
        self.data.validate()
        self.optim.validate("train_large.optim")
        _check(self.epochs >= 0, "train_large.epochs must be >= 0")
        _check(self.batch_size >= 1, "train_large.batch_size must be >= 1")
        _check(0 <= self.label_smoothing < 1, "train_large.label_smoothing must be in [0, 1)")
        _check(0 <= self.drop_rate < 1, "train_large.drop_rate must be in [0, 1)")
        _check(0 < self.ema_decay < 1, "train_large.ema_decay must be in (0, 1)")
        _check(self.clip_grad is None or self.clip_grad > 0, "train_large.clip_grad must be > 0")
        check_init(self.init, "train_large.init")
        check_model_input(self, "train_large")
        _check_device(self.device)


@dataclass
class PrecomputeConfig:
    """``reducedmpl precompute``: run the large teacher once and store its logits in HDF5 shards."""

    data: DataConfig | None = None  # None: the data recorded in the teacher artifact
    splits: list[str] = field(default_factory=lambda: ["labeled", "unlabeled", "val", "test"])
    batch_size: int = 256
    dtype: Literal["float16", "float32"] = "float16"
    topk: int = 0  # store only the top-k logits (plus log-sum-exp); 0 stores all logits
    shards: int = 1
    temperature: float = 1.0  # recorded in the store; the reader divides logits by it
    views: int = 1  # per row: view 0 clean, views 1..V-1 augmented by the data's training augmentation
    view_seed: int = 0  # the augmented views are seeded by (view_seed, row id, view)
    # mixup: each augmented view is mixed with a partner row's own augmented view (function matching)
    view_mix: Literal["none", "mixup"] = "none"
    mix_alpha: float = 1.0  # the mixing weight ~ Beta(mix_alpha, mix_alpha); 1: uniform
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True

    def validate(self) -> None:
        if self.data is not None:
            self.data.validate()
        valid = ("labeled", "unlabeled", "val", "test")
        for name in self.splits:
            _check(name in valid, f"precompute.splits: unknown split {name!r} (valid: {', '.join(valid)})")
        _check(len(self.splits) > 0 and len(set(self.splits)) == len(self.splits),
               "precompute.splits must list each split at most once and not be empty")
        _check(self.batch_size >= 1, "precompute.batch_size must be >= 1")
        _check(self.topk >= 0, "precompute.topk must be >= 0")
        _check(1 <= self.shards <= MAX_SHARDS, f"precompute.shards must be in 1..{MAX_SHARDS}")
        _check(self.temperature > 0, "precompute.temperature must be > 0")
        _check(1 <= self.views <= 256, "precompute.views must be in 1..256")
        _check(self.view_seed >= 0, "precompute.view_seed must be >= 0")
        _check(self.view_mix == "none" or self.views >= 2,
               "precompute.view_mix=mixup (--view-mix) mixes augmented views: it needs --views 2 or more")
        _check_mix_alpha(self.mix_alpha, "precompute.mix_alpha")
        _check_device(self.device)


@dataclass
class ReducedTeacherConfig:
    """Shape of the reduced teacher, an MLP on the large teacher's log-distribution."""

    hidden: int = 128
    depth: int = 2
    extra_features: bool = False  # add entropy and top-1/top-2 margin of q_L to the inputs
    learn_temperature: bool = False

    def validate(self) -> None:
        _check(self.hidden >= 1, "distill.reduced_teacher.hidden must be >= 1")
        _check(self.depth >= 1, "distill.reduced_teacher.depth must be >= 1")


def _student_optim() -> OptimConfig:
    return OptimConfig(opt="momentum", lr=0.05, weight_decay=5e-4, momentum=0.9, sched="cosine")


def _teacher_optim() -> OptimConfig:
    return OptimConfig(opt="adam", lr=1e-3, weight_decay=0.0, sched="constant")


@dataclass
class DistillConfig:
    """``reducedmpl distill``: co-train the reduced teacher with the student (or a baseline mode)."""

    # data settings over those recorded in the targets store (a partial DataConfig: names and types are checked
    # here; the stage merges them over the store's with merge_data into one DataConfig, used from then on)
    data: dict[str, Any] | None = None
    mode: Literal["reducedmpl", "kd", "online-kd", "supervised"] = "reducedmpl"
    # online-kd: the teacher.pt that runs on the student's own view each step (in `run`: the pipeline's teacher)
    large_teacher: str | None = None
    student: str = "test_resnet"  # a timm name: NAME, NAME.TAG or hf-hub:ORG/NAME
    student_init: str = "scratch"  # "scratch", "pretrained" (the name's hub weights) or "checkpoint:PATH"
    reset_head: bool = False  # allow a student checkpoint whose classifier has another number of classes
    # the student's own preprocessing; None: data.input_size, else its pretrained configuration, else the data's
    input_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    steps: int = 1000
    batch_size: int = 32  # labeled batch
    unlabeled_batch_size: int = 128
    student_optim: OptimConfig = field(default_factory=_student_optim)
    teacher_optim: OptimConfig = field(default_factory=_teacher_optim)
    reduced_teacher: ReducedTeacherConfig = field(default_factory=ReducedTeacherConfig)
    teacher_grad: Literal["exact", "reinforce"] = "exact"
    pseudo_label: Literal["sample", "argmax"] = "sample"  # hard labels of `reinforce`
    exact_method: Literal["fd", "jvp"] = "fd"  # fd: one extra forward, reusing the training forward
    mpl_weight: float = 1.0
    supervised_weight: float = 1.0
    kl_weight: float = 0.0  # KL(q_L || T): keeps the reduced teacher near the large teacher's dark knowledge
    baseline_decay: float | None = 0.9  # moving-average baseline of h (None: none)
    label_smoothing: float = 0.0  # on the labeled CE terms
    kd_temperature: float = 1.0
    kd_label_weight: float = 0.0  # kd mode: weight of label CE on the labeled batch, mixed with KD
    ema: bool = False
    ema_decay: float = 0.999
    finetune_steps: int = 0  # final finetune of the student on labeled data
    finetune_lr: float = 0.005
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 100
    select: Literal["last", "best"] = "last"  # best: by validation accuracy, never test
    clip_grad: float | None = 5.0  # the student's gradient norm limit
    teacher_clip_grad: float | None = 5.0  # the reduced teacher's: a step on a rare large h stays bounded
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    # with a store of several views, each drawn row trains on one of its stored views, with that view's target
    # (false: the student's own augmentation and the clean view's target)
    replay_views: bool = True
    # online-kd: mix each row of the pseudo-label batch with a partner from the batch (function matching)
    online_mix: Literal["none", "mixup"] = "none"
    mix_alpha: float = 1.0  # online_mix: the mixing weight ~ Beta(mix_alpha, mix_alpha)
    # the rows pseudo labels are drawn from: all training rows, or the unlabeled ones only (the labeled rows then
    # serve the reduced teacher and the MPL feedback alone: the student never trains on them before finetune)
    pseudo_pool: Literal["all", "unlabeled"] = "all"
    memory_budget_mb: int = 2048  # targets held in memory up to this size, else read in sorted blocks
    probe_size: int = 16  # examples whose reduced-teacher distributions are saved at 0/25/50/75/100 %
    labeled_eval_size: int | None = 2048  # labeled rows (evenly spaced) the periodic labeled accuracy reads; None: all

    def validate(self) -> None:
        if self.data is not None:
            from_dict(DataConfig, self.data, "distill.data")  # names and types; values once merged
        self.student_optim.validate("distill.student_optim")
        check_init(self.student_init, "distill.student_init")
        check_model_input(self, "distill")
        self.teacher_optim.validate("distill.teacher_optim")
        self.reduced_teacher.validate()
        _check(self.steps >= 0, "distill.steps must be >= 0")
        _check(self.batch_size >= 1 and self.unlabeled_batch_size >= 1, "distill batch sizes must be >= 1")
        for name in ("mpl_weight", "supervised_weight", "kl_weight", "kd_label_weight", "finetune_steps"):
            _check(getattr(self, name) >= 0, f"distill.{name} must be >= 0")
        _check(self.kd_label_weight <= 1, "distill.kd_label_weight must be in [0, 1]")
        _check(self.kd_temperature > 0, "distill.kd_temperature must be > 0")
        _check(self.large_teacher is None or self.mode == "online-kd",
               "distill.large_teacher (--teacher) is used only by --mode online-kd")
        _check(self.online_mix == "none" or self.mode == "online-kd",
               "distill.online_mix mixes the batches the large teacher sees: it needs --mode online-kd")
        _check_mix_alpha(self.mix_alpha, "distill.mix_alpha")
        _check(0 <= self.label_smoothing < 1, "distill.label_smoothing must be in [0, 1)")
        _check(self.baseline_decay is None or 0 <= self.baseline_decay < 1, "distill.baseline_decay must be in [0, 1)")
        _check(0 < self.ema_decay < 1, "distill.ema_decay must be in (0, 1)")
        _check(self.finetune_lr > 0, "distill.finetune_lr must be > 0")
        for name in ("eval_every", "log_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"distill.{name} must be >= 1")
        _check(self.clip_grad is None or self.clip_grad > 0, "distill.clip_grad must be > 0")
        _check(self.teacher_clip_grad is None or self.teacher_clip_grad > 0, "distill.teacher_clip_grad must be > 0")
        _check(self.memory_budget_mb >= 1, "distill.memory_budget_mb must be >= 1")
        _check(self.probe_size >= 0, "distill.probe_size must be >= 0")
        _check(self.labeled_eval_size is None or self.labeled_eval_size >= 1,
               "distill.labeled_eval_size must be >= 1 (or null: every labeled row)")
        _check_device(self.device)


@dataclass
class CompareConfig:
    """``compare`` section of a pipeline: distill runs (each a set of distill overrides) times seeds."""

    seeds: list[int] | None = None  # None: the distill section's seed
    runs: list[dict[str, Any]] = field(default_factory=list)  # [{name: kd, mode: kd, ...}, ...]
    baseline: str | None = None  # run for the paired differences; None: the run named kd, else the first kd run

    def validate(self) -> None:
        _check(self.seeds is None or (len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds)),
               "compare.seeds must list each seed at most once and not be empty")
        _check(len(self.runs) > 0, "compare.runs must list at least one run, e.g. [{name: kd, mode: kd}]")
        names = []
        for i, run in enumerate(self.runs):
            where = f"compare.runs[{i}]"
            _check(isinstance(run, dict), f"{where} must be a mapping like {{name: kd, mode: kd}}")
            name = run.get("name")
            _check(isinstance(name, str) and name.replace("_", "").replace(".", "").isalnum(),
                   f"{where}.name must be a name of letters, digits, '_' or '.' (got {name!r})")
            _check(name not in names, f"compare.runs: the name {name!r} is used twice")
            _check("seed" not in run, f"{where}.seed: seeds come from compare.seeds")
            names.append(name)
            overrides = {k: v for k, v in run.items() if k != "name"}
            from_dict(DistillConfig, overrides, f"{where}")  # unknown keys and wrong types
        _check(self.baseline is None or self.baseline in names,
               f"compare.baseline {self.baseline!r} is not a run name ({nearest(str(self.baseline), names)})")


SECTIONS: dict[str, type] = {"train_large": TrainLargeConfig, "precompute": PrecomputeConfig,
                             "distill": DistillConfig, "compare": CompareConfig}


# ------------------------------------------------------------------------------------------------ conversion
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message, "fix the value (where it was given: a flag, --set or the config file)")


def _check_mix_alpha(alpha: float, name: str) -> None:
    _check(math.isfinite(alpha) and alpha > 0, f"{name} must be a finite number > 0 (1: a uniform mixing weight)")


def _check_device(device: str) -> None:
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    _check(ok, f"device must be auto, cpu, cuda or cuda:N (got {device!r})")


def check_init(init: str, where: str) -> None:
    _check(init in ("scratch", "pretrained") or (init.startswith("checkpoint:") and len(init) > len("checkpoint:")),
           f"{where} must be 'scratch', 'pretrained' or 'checkpoint:PATH' (got {short_repr(init)})")


def check_model_input(cfg: Any, where: str) -> None:
    """A model's own preprocessing settings (input_size, crop_pct, interpolation, mean, std)."""
    _check(cfg.input_size is None or cfg.input_size >= 4, f"{where}.input_size must be >= 4")
    _check(cfg.crop_pct is None or 0 < cfg.crop_pct <= 1, f"{where}.crop_pct must be in (0, 1]")
    _check(cfg.interpolation in (None, "bilinear", "bicubic", "nearest"),
           f"{where}.interpolation must be bilinear, bicubic or nearest (got {short_repr(cfg.interpolation)})")
    for name in ("mean", "std"):
        value = getattr(cfg, name)
        _check(value is None or len(value) in (1, 3), f"{where}.{name} must list 1 or 3 values (one per channel)")
    _check(cfg.std is None or min(cfg.std) > 0, f"{where}.std must be > 0")


def model_input(cfg: Any) -> dict:
    """A model's own preprocessing settings as a dict (None where unset)."""
    return {k: getattr(cfg, k) for k in ("input_size", "crop_pct", "interpolation", "mean", "std")}


def parse_randaugment(spec: str) -> tuple[int, int]:
    """``rand-m9-n2`` -> (magnitude 9, 2 ops)."""
    parts = spec.split("-")
    values = {p[0]: p[1:] for p in parts[1:] if p}
    try:
        if parts[0] != "rand":
            raise ValueError
        return int(values.get("m", 9)), int(values.get("n", 2))
    except (ValueError, IndexError):
        raise ConfigError(f"data.randaugment {spec!r} is not understood", "write it like 'rand-m9-n2'") from None


def nearest(key: str, valid: typing.Iterable[str]) -> str:
    """The fix for an unknown ``key``: the nearest valid key, else the first valid keys (a short line)."""
    names = sorted(valid)
    close = difflib.get_close_matches(key[:100], names, n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(names)
    if len(shown) > 80:
        shown = shown[:shown.rfind(", ", 0, 80)] + f", ... ({len(names)} in all)"
    return f"valid keys: {shown}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))} (got {short_repr(value)})",
                              "use one of the listed values")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list (got {short_repr(value)})", "write it as [a, b, ...]")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (got {short_repr(value)})", "write it as {key: value}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (got {short_repr(value)})", "write it as a YAML section")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is tp):
        return value
    raise ConfigError(f"{where} must be of type {_type_name(tp)} (got {short_repr(value)})", "fix its value")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}", nearest(str(key), fields))
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[key]):
            value = merged(to_dict(factory()), value)  # a partial section keeps this field's own defaults
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML (so 3 is an int, true a bool, null None)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not of the form key=value", "write it like --set train_large.epochs=3")
    try:
        value = bounded_safe_load(raw) if raw.strip() else ""
    except YamlTooLarge as e:
        raise ConfigError(f"--set {key.strip()[:60]}=... is refused: {e}", e.fix) from None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: typing.Sequence[str], section: str | None = None) -> dict:
    """Apply ``--set`` overrides to a nested dict. For a stage, keys may omit the section's own name."""
    for item in overrides:
        keys, value = parse_override(item)
        if section is not None and keys[0] == section:
            keys = keys[1:]
        if not keys:
            raise ConfigError(f"--set {item!r} names a whole section", "set one key, e.g. --set train_large.epochs=3")
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section", "set a key inside a section")
            node = nxt
        node[keys[-1]] = value
    return data


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages (a value from a file may be huge)."""
    short = reprlib.Repr()  # keyword arguments to Repr() need Python 3.12
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 4, 4, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "check the path")
    try:
        if path.stat().st_size > YAML_MAX_BYTES:  # refused before it is read
            raise too_long(path.stat().st_size)
        data = bounded_safe_load(path.read_text())
    except YamlTooLarge as e:
        raise ConfigError(f"config file {path} is refused: {e}", e.fix) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        tag = re.search(r"constructor for the tag '([^']*)'", str(getattr(e, "problem", "") or ""))
        if isinstance(e, yaml.constructor.ConstructorError) and tag:  # e.g. !!python/object/apply: never loaded
            name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
            raise ConfigError(f"config file {path} is not valid YAML for reducedmpl{where}: the tag {name} is "
                              "refused (tags that build Python objects are never loaded)",
                              "write plain YAML values (numbers, strings, lists, mappings) instead") from None
        raise ConfigError(f"config file {path} is not valid YAML{where}", "fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({e.__class__.__name__})", "check the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections", "see pipelines/digits.yaml")
    return data


PIPELINE_KEYS = {"name", "data", "compare"}


def merged(base: dict, top: dict) -> dict:
    """``top`` over ``base``: nested mappings merged key by key, other values replaced."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def data_over(base: dict | None, own: Any) -> Any:
    """A stage's own data settings over the shared or recorded ones (the one place data settings are merged); a
    non-mapping ``own`` is returned as it is, for :func:`from_dict` to name."""
    own = own or {}
    return {**(base or {}), **own} if isinstance(own, dict) else own


def merge_data(base: dict | None, own: dict | None, where: str = "data") -> DataConfig:
    """:func:`data_over` as a validated :class:`DataConfig`."""
    cfg = from_dict(DataConfig, data_over(base, own), where)
    cfg.validate()
    return cfg


def stage_config(section: str, file: str | Path | None = None, overrides: typing.Sequence[str] = (),
                 flags: dict | None = None, base: dict | None = None) -> Any:
    """Resolve one stage's config: defaults < ``base`` < pipeline file < ``--set`` < explicit flags.

    ``base`` holds settings recorded in an input artifact (e.g. the teacher's data for precompute).
    """
    cls = SECTIONS[section]
    raw: dict = {}
    if file is not None:
        doc = read_yaml(file)
        valid = PIPELINE_KEYS | set(SECTIONS)
        for key in doc:
            if key not in valid:
                raise ConfigError(f"unknown section {key!r} in {file}", nearest(str(key), valid))
        raw = doc.get(section) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"section {section!r} in {file} must be a mapping", "write it as a YAML section")
        raw = dict(raw)
        if "data" in doc and "data" in {f.name for f in dataclasses.fields(cls)}:
            shared = doc["data"] or {}
            if not isinstance(shared, dict):
                raise ConfigError(f"section 'data' in {file} must be a mapping", "write it as a YAML section")
            raw["data"] = data_over(shared, raw.get("data"))
    if base:
        raw = merged(base, raw)
    apply_overrides(raw, overrides, section)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = from_dict(cls, raw, section)
    cfg.validate()
    return cfg
