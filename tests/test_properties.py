"""Property tests (hypothesis): the config parser and the targets reader, on generated input.

* Config: any ``--set`` overrides give a config whose fields have their declared types and that round-trips
  through ``to_dict``/``from_dict`` (and YAML, as config.yaml is written), or a one-line :class:`UserError` -
  never another exception. A misspelt key names the nearest valid key.
* Targets: for generated stores written through the real writer (``ShardWriter`` + ``write_master``),
  ``log_probs`` equals a numpy reference for any ids (repeated, unsorted), rows are normalised, and the in-memory
  and the block-read paths agree exactly. Unknown ids are a UserError.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from conftest import write_store as write_real_store
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reducedmpl.config import SECTIONS, DataConfig, from_dict, stage_config, to_dict
from reducedmpl.errors import ConfigError, UserError
from reducedmpl.targets import StoreMeta, TargetStore

CONFIG_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STORE_SETTINGS = settings(max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------- config: schema
def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable key path of a config dataclass and its annotation (nested dataclasses flattened)."""
    out: dict[str, Any] = {}
    for name, tp in typing.get_type_hints(cls).items():
        inner = _dataclass_in(tp)
        if inner is not None:
            out.update(leaves(inner, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = tp
    return out


def fields_at(cls: type, parts: list[str]) -> set[str]:
    """Names of the valid keys at the level of ``parts[-1]`` (``parts`` are the path's leading keys)."""
    for part in parts:
        cls = _dataclass_in(typing.get_type_hints(cls)[part])
        if cls is None:  # distill.data is a free mapping that is checked as a DataConfig
            cls = DataConfig
    return {f.name for f in dataclasses.fields(cls)}


LEAVES = {section: leaves(cls) for section, cls in SECTIONS.items()}


def has_type(value: Any, tp: Any) -> bool:
    """``value`` matches the annotation ``tp`` exactly (no int for a float, no bool for an int)."""
    if tp is Any:
        return True
    if _is_union(tp):
        return any(has_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return type(value) is list and all(has_type(v, item) for v in value)
    if origin is dict:
        return type(value) is dict
    if dataclasses.is_dataclass(tp):
        return type(value) is tp and all(has_type(getattr(value, f.name), hint)
                                         for f, hint in zip(dataclasses.fields(tp), typing.get_type_hints(tp).values()))
    return type(value) is tp


def assert_one_line(e: UserError) -> None:
    msg = str(e)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)


# ---------------------------------------------------------------------------------------------- config: strategies
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.integers(), st.floats(),
                    st.floats(min_value=0, max_value=1), st.text(max_size=12),
                    st.sampled_from(["digits", "cpu", "auto", "cuda:1", "kd", "reducedmpl", "float16", "cosine",
                                     "rand-m9-n2", "rand-mx", "test_resnet", "checkpoint:x.pt", "labeled"]))
VALUES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text("abcdelnrsu_", max_size=6), c, max_size=2)),
                      max_leaves=4)
KEY_TEXT = st.text("abcdefghijklmnopqrstuvwxyz_.", min_size=0, max_size=24)


def render(value: Any) -> str:
    """A value as a user would type it after ``=``: YAML flow style (or Python's str, which is often YAML too)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


@st.composite
def typo(draw, word: str) -> str:
    """``word`` with one character deleted, inserted or replaced (never ``word`` itself)."""
    letters = "abcdefghijklmnopqrstuvwxyz_"
    i = draw(st.integers(0, len(word)))
    kind = draw(st.sampled_from(["delete", "insert", "replace"] if len(word) > 1 else ["insert", "replace"]))
    c = draw(st.sampled_from(letters))
    if kind == "delete":
        i = min(i, len(word) - 1)
        out = word[:i] + word[i + 1:]
    elif kind == "insert":
        out = word[:i] + c + word[i:]
    else:
        i = min(i, len(word) - 1)
        out = word[:i] + c + word[i + 1:]
    assume(out != word and out)
    return out


@st.composite
def override(draw, section: str) -> str:
    paths = sorted(LEAVES[section])
    kind = draw(st.sampled_from(["valid", "valid", "typo", "text"]))
    raw = draw(st.one_of(VALUES.map(render), st.text(max_size=16), VALUES.map(str)))
    if kind == "text" or not paths:
        key = draw(KEY_TEXT)
    else:
        key = draw(st.sampled_from(paths))
        if draw(st.booleans()):  # often a value of the declared type (and mostly in range), to reach valid configs
            raw = render(draw(value_for(key, LEAVES[section][key])))
        if kind == "typo":
            *head, last = key.split(".")
            key = ".".join([*head, draw(typo(last))])
    if draw(st.booleans()):
        key = f"{section}.{key}"
    sep = draw(st.sampled_from(["=", "=", " = ", ""]))  # "" is a malformed override (no '=')
    return f"{key}{sep}{raw}"


# ---------------------------------------------------------------------------------------------- config: properties
@CONFIG_SETTINGS
@given(data=st.data(), section=st.sampled_from(sorted(SECTIONS)))
def test_overrides_give_a_typed_config_or_a_one_line_user_error(data, section):
    overrides = data.draw(st.lists(override(section), min_size=1, max_size=3), label="overrides")
    try:
        cfg = stage_config(section, None, overrides)
    except UserError as e:
        assert_one_line(e)
        return
    cls = SECTIONS[section]
    assert has_type(cfg, cls), cfg
    again = from_dict(cls, to_dict(cfg), section)
    assert again == cfg
    again.validate()
    # config.yaml is written with yaml.safe_dump, and --resume compares what it records
    assert from_dict(cls, yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)), section) == cfg


@CONFIG_SETTINGS
@given(data=st.data(), section=st.sampled_from(["train_large", "precompute", "distill"]))
def test_a_misspelt_key_names_the_nearest_valid_key(data, section):
    path = data.draw(st.sampled_from(sorted(LEAVES[section])), label="path")
    *head, last = path.split(".")
    valid = fields_at(SECTIONS[section], head)
    wrong = data.draw(typo(last), label="typo")
    assume(wrong not in valid and not (not head and wrong == section))
    with pytest.raises(ConfigError) as info:
        stage_config(section, None, [".".join([*head, wrong]) + "=1"])
    msg = str(info.value)
    assert_one_line(info.value)
    assert f"unknown config key '{'.'.join([section, *head, wrong])}'" in msg, msg
    suggested = msg.split("did you mean '")[1].split("'")[0]
    assert suggested in valid, msg
    ratio = lambda a: difflib.SequenceMatcher(None, wrong, a).ratio()  # noqa: E731
    assert ratio(suggested) >= ratio(last) - 1e-12, (wrong, suggested, last)


# the values a valid config may take, per annotation, mostly inside the validated ranges
NAMED = {
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
    "source": st.sampled_from(["digits", "mnist:/data/mnist", "folder:/x", "npz:/a.npz"]),
    "model": st.sampled_from(["resnet18", "test_resnet", "vit_tiny_patch16_224"]),
    "student": st.sampled_from(["resnet18", "test_resnet"]),
    "init": st.sampled_from(["scratch", "pretrained", "checkpoint:/w/teacher.pt"]),
    "student_init": st.sampled_from(["scratch", "pretrained", "checkpoint:/w/student.pt"]),
    "interpolation": st.sampled_from([None, "bilinear", "bicubic", "nearest"]),
    "mean": st.one_of(st.none(), st.lists(st.floats(0.05, 0.95), min_size=1, max_size=1),
                      st.lists(st.floats(0.05, 0.95), min_size=3, max_size=3)),
    "std": st.one_of(st.none(), st.lists(st.floats(0.05, 0.95), min_size=3, max_size=3)),
    "opt": st.sampled_from(["adamw", "sgd", "momentum", "lamb"]),
    "randaugment": st.sampled_from([None, "rand-m9-n2", "rand-m5-n1"]),
    "splits": st.lists(st.sampled_from(["labeled", "unlabeled", "val", "test"]), min_size=1, max_size=4, unique=True),
    "data": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"labeled_per_class": st.integers(1, 50),
                                                                     "split_seed": st.integers(0, 9),
                                                                     "hflip": st.booleans()})),
    "labeled_fraction": st.one_of(st.none(), st.floats(0.01, 1.0)),
    "seeds": st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
    "runs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["kd", "mpl", "sup_1"]),
                                            "mode": st.sampled_from(["kd", "reducedmpl", "supervised"])},
                                           optional={"steps": st.integers(0, 100)}), min_size=1, max_size=2),
    "baseline": st.sampled_from([None, "kd"]),
}


def value_for(path: str, tp: Any) -> st.SearchStrategy:
    name = path.split(".")[-1]
    if name in NAMED:
        return NAMED[name]
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.one_of(st.none(), *[value_for(path, a) for a in args])
    if typing.get_origin(tp) is Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(1, 10**6)
    if tp is float:
        return st.floats(1e-6, 0.99, allow_subnormal=False)
    if tp is str:
        return st.text("abcdefgh_0123456789", min_size=1, max_size=10)
    if typing.get_origin(tp) is list:
        return st.lists(value_for(f"{path}[]", typing.get_args(tp)[0]), min_size=1, max_size=3)
    raise AssertionError(f"no strategy for {path}: {tp}")


@st.composite
def valid_config(draw, section: str):
    paths = draw(st.lists(st.sampled_from(sorted(LEAVES[section])), max_size=8, unique=True))
    raw: dict = {}
    for path in paths:
        node = raw
        *head, last = path.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = draw(value_for(path, LEAVES[section][path]), label=path)
    try:
        return stage_config(section, base=raw)
    except ConfigError:
        assume(False)


@CONFIG_SETTINGS
@given(data=st.data(), section=st.sampled_from(["train_large", "precompute", "distill"]))
def test_valid_configs_round_trip(data, section):
    cfg = data.draw(valid_config(section), label="config")
    cls = SECTIONS[section]
    assert has_type(cfg, cls)
    assert from_dict(cls, to_dict(cfg), section) == cfg
    assert from_dict(cls, yaml.safe_load(yaml.safe_dump(to_dict(cfg))), section) == cfg
    # ... and through --set overrides of every leaf, as a user would pass them on the command line
    flat = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in LEAVES[section]:
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(to_dict(cfg))
    sets = [f"{k}={render(v)}" for k, v in flat.items()]
    assert stage_config(section, None, sets) == cfg


@st.composite
def pipeline_docs(draw) -> Any:
    """Pipeline/config YAML documents: mostly the right shape with typed (or any) values, sometimes not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)  # not a mapping at all
    doc: dict = {}
    for key in draw(st.lists(st.sampled_from(["name", "data", "train_large", "precompute", "distill", "compare",
                                              "distil"]), max_size=5, unique=True)):
        if key == "name":
            doc[key] = draw(st.one_of(st.sampled_from(["p", "x-1.b"]), SCALARS))
            continue
        if draw(st.integers(0, 5)) == 0:
            doc[key] = draw(VALUES)
            continue
        cls = DataConfig if key == "data" else SECTIONS.get(key, SECTIONS["distill"])
        section: dict = {}
        for path in draw(st.lists(st.sampled_from(sorted(leaves(cls))), max_size=4, unique=True)):
            node = section
            *head, last = path.split(".")
            for k in head:
                node = node.setdefault(k, {})
            node[last] = draw(st.one_of(value_for(path, leaves(cls)[path]), VALUES), label=path)
        doc[key] = section
    return doc


@CONFIG_SETTINGS
@given(doc=st.one_of(pipeline_docs(), st.text(max_size=40)))
def test_config_files_give_a_typed_config_or_a_one_line_user_error(doc):
    from reducedmpl.pipeline import Pipeline, load_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
        for section in ("train_large", "precompute", "distill"):
            try:
                cfg = stage_config(section, path)
            except UserError as e:
                assert_one_line(e)
            else:
                assert has_type(cfg, SECTIONS[section]) and from_dict(SECTIONS[section], to_dict(cfg)) == cfg
        try:
            pipe = load_pipeline(path)
        except UserError as e:
            assert_one_line(e)
        else:
            assert isinstance(pipe, Pipeline) and pipe.distills
            assert all(has_type(d.config, SECTIONS["distill"]) for d in pipe.distills)


# ---------------------------------------------------------------------------------------------- targets
SPLIT_CODES = np.arange(4, dtype=np.uint8)


@dataclasses.dataclass
class Generated:
    master: Path
    meta: StoreMeta
    logits: np.ndarray  # float32 (N, C), row order, as given to the writer
    ids: np.ndarray


def write_store(folder: Path, num_classes: int, num_rows: int, num_shards: int, topk: int, dtype: str,
                temperature: float, seed: int, scale: float, batch: int) -> Generated:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_rows, num_classes)) * scale + rng.normal(0, 3)).astype(np.float32)
    ids = (rng.permutation(num_rows) * int(rng.integers(1, 5)) + int(rng.integers(0, 100))).astype(np.int64)
    splits = rng.integers(0, 4, num_rows).astype(np.uint8)
    labels = np.where(splits == 1, -1, rng.integers(0, num_classes, num_rows)).astype(np.int64)
    meta = StoreMeta(teacher_arch="test_resnet", teacher_sha256="0" * 64,
                     class_names=[f"c{i}" for i in range(num_classes)], data_spec="digits", split_seed=0,
                     fingerprints={"labeled": "a", "unlabeled": "b"}, temperature=temperature, dtype=dtype,
                     topk=topk, tool_version="test", config={}, run_key=f"key-{seed}")
    master = write_real_store(folder / "targets.h5", meta, ids, labels, splits, logits, num_shards, batch)
    return Generated(master, meta, logits, ids)


def log_softmax64(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def reference(g: Generated, rows: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 log-probs as the module documents them, from what the store holds for ``rows`` (read raw with
    h5py); for top-k also the top-k class indices per row. First checks that the writer stored the right things:
    the dtype-rounded logits (dense), or the top-k classes, their rounded logits and the log-sum-exp over all
    raw logits (top-k)."""
    x = g.logits[rows].astype(np.float64)
    with h5py.File(g.master, "r") as f:
        table = {name: f[name][...][rows] if len(rows) else f[name][...][:0]
                 for name in ("logits", "topk_logits", "topk_index", "logsumexp") if name in f}
    if not g.meta.topk:
        stored = table["logits"].astype(np.float64)
        assert np.array_equal(stored, x.astype(g.meta.dtype).astype(np.float64))
        return log_softmax64(stored / temperature), None
    k, c = g.meta.topk, g.meta.num_classes
    idx = table["topk_index"].astype(np.int64)
    true_idx = np.argsort(-x, axis=1, kind="stable")[:, :k]  # the generated logits have no ties
    assert np.array_equal(idx, true_idx), "top-k classes stored out of order or wrong"
    top = table["topk_logits"].astype(np.float64)
    assert np.array_equal(top, np.take_along_axis(x, idx, axis=1).astype(g.meta.dtype).astype(np.float64))
    lse = table["logsumexp"].astype(np.float64)[:, None]
    true_lse = x.max(1, keepdims=True) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    np.testing.assert_allclose(lse, true_lse, rtol=1e-6, atol=1e-6)  # float32, over all C raw logits
    remainder = np.clip(1.0 - np.exp(top - lse).sum(1, keepdims=True), 1e-12, 1.0)
    full = np.repeat(lse + np.log(remainder / (c - k)), c, axis=1)  # the C-K others share the remainder mass
    np.put_along_axis(full, idx, top, axis=1)
    return log_softmax64(full / temperature), idx


@st.composite
def stores(draw):
    num_classes = draw(st.integers(2, 12), label="classes")
    return dict(
        num_classes=num_classes,
        num_rows=draw(st.integers(1, 50), label="rows"),
        num_shards=draw(st.integers(1, 3), label="shards"),
        topk=draw(st.one_of(st.just(0), st.integers(1, num_classes - 1)), label="topk"),
        dtype=draw(st.sampled_from(["float16", "float32"]), label="dtype"),
        temperature=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 3.7]), label="temperature"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]), label="scale"),
        batch=draw(st.integers(1, 64), label="batch"),
    )


@STORE_SETTINGS
@given(spec=stores(), data=st.data())
def test_log_probs_match_the_reference_on_both_read_paths(spec, data):
    with tempfile.TemporaryDirectory() as tmp:
        g = write_store(Path(tmp), **spec)
        n = len(g.ids)
        rows = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=3 * n + 5), label="rows"),
                        dtype=np.int64)  # repeated and unsorted
        ids = g.ids[rows]
        override = data.draw(st.sampled_from([None, 1.0, 0.7, 2.5]), label="temperature arg")
        t = g.meta.temperature if override is None else override
        with TargetStore.open(g.master, memory_budget_bytes=2**40) as mem, \
                TargetStore.open(g.master, memory_budget_bytes=0) as ooc:
            assert mem.in_memory and not ooc.in_memory
            got = mem.log_probs(ids, temperature=override)
            assert np.array_equal(got, ooc.log_probs(ids, temperature=override)), "the two read paths differ"
            assert got.dtype == np.float32 and got.shape == (len(ids), spec["num_classes"])
            assert mem.num_rows == n and sorted(mem.ids.tolist()) == sorted(g.ids.tolist())
            if not spec["topk"]:
                assert np.array_equal(mem.logits(ids), g.logits[rows].astype(spec["dtype"]).astype(np.float32))
        ref, idx = reference(g, rows, t)
        assert np.isfinite(got).all()
        lse = np.log(np.exp(got.astype(np.float64)).sum(axis=1)) if len(got) else np.zeros(0)
        np.testing.assert_allclose(lse, 0.0, atol=2e-5)  # every row is a distribution
        probs, ref_probs = np.exp(got.astype(np.float64)), np.exp(ref)
        np.testing.assert_allclose(probs, ref_probs, atol=2e-6, rtol=1e-4)
        big = ref_probs > 1e-6  # where the log is well conditioned, compare log-probs too
        np.testing.assert_allclose(got[big], ref[big], atol=1e-4, rtol=1e-5)
        if idx is not None and len(rows):
            # top-k classes keep their exact relative odds; the other C-K classes share one value
            top = np.take_along_axis(got.astype(np.float64), idx, axis=1)
            stored = np.take_along_axis(g.logits[rows].astype(spec["dtype"]).astype(np.float64), idx, axis=1)
            np.testing.assert_allclose(top - top[:, :1], (stored - stored[:, :1]) / t, atol=1e-4, rtol=1e-5)
            others = np.ones_like(got, dtype=bool)
            np.put_along_axis(others, idx, False, axis=1)
            rest = got[others].reshape(len(rows), -1)
            assert (rest == rest[:, :1]).all()


@STORE_SETTINGS
@given(spec=stores(), data=st.data())
def test_unknown_ids_are_a_user_error(spec, data):
    with tempfile.TemporaryDirectory() as tmp:
        g = write_store(Path(tmp), **spec)
        known = set(g.ids.tolist())
        unknown = data.draw(st.lists(st.integers(-2**40, 2**40).filter(lambda i: i not in known), min_size=1,
                                     max_size=4), label="unknown")
        mixed = data.draw(st.permutations(unknown + g.ids[: data.draw(st.integers(0, 3))].tolist()), label="ids")
        for budget in (2**40, 0):
            with TargetStore.open(g.master, memory_budget_bytes=budget) as store:
                with pytest.raises(UserError) as info:
                    store.log_probs(np.array(mixed, dtype=np.int64))
                assert_one_line(info.value)
                assert "not in targets store" in str(info.value)
                assert not math.isnan(store.log_probs(g.ids[:1]).sum())  # the store still works afterwards
