"""Tests for the teacher-target store (reducedmpl.targets)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from conftest import write_store
import pytest

from reducedmpl.errors import ArtifactError
from reducedmpl.targets import (
    SCHEMA_VERSION,
    SPLIT_NAMES,
    ShardWriter,
    StoreMeta,
    TargetStore,
    file_sha256,
    plan_shards,
    shard_is_complete,
    shard_paths,
    verify_store,
    write_master,
)

BIG = 2**40  # memory budget that forces the in-memory path
NONE = 0  # memory budget that forces the out-of-core path


@dataclass
class Written:
    """A store written by make_store plus the data that went into it."""

    master: Path
    meta: StoreMeta
    logits: np.ndarray  # (N, C) float32, row order
    ids: np.ndarray
    labels: np.ndarray
    splits: np.ndarray


def make_meta(num_classes: int = 20, **overrides: Any) -> StoreMeta:
    fields: dict[str, Any] = dict(
        teacher_arch="resnet50", teacher_sha256="ab" * 32, class_names=[f"class{i}" for i in range(num_classes)],
        data_spec="folder:/data", split_seed=7, fingerprints={"labeled": "f1", "unlabeled": "f2", "val": "f3"},
        dtype="float32", tool_version="0.1.0", config={"batch": 64}, run_key="run-1")
    fields.update(overrides)
    return StoreMeta(**fields)


def make_store(folder: Path, num_rows: int = 300, num_classes: int = 20, num_shards: int = 3, seed: int = 0,
               batch: int = 64, **meta_overrides: Any) -> Written:
    """Write a store of random logits; ids are shuffled so that id order != row order."""
    rng = np.random.default_rng(seed)
    meta = make_meta(num_classes, **meta_overrides)
    logits = (rng.standard_normal((num_rows, num_classes)) * 3).astype(np.float32)
    ids = (rng.permutation(num_rows) * 7 + 5).astype(np.int64)
    splits = (np.arange(num_rows) % 4).astype(np.uint8)
    labels = np.where(splits == 1, -1, logits.argmax(1)).astype(np.int64)
    labels[::5] = (labels[::5] + 1) % num_classes  # make the teacher wrong on some rows
    labels[splits == 1] = -1
    master = write_store(folder / "targets.h5", meta, ids, labels, splits, logits, num_shards, batch)
    return Written(master, meta, logits, ids, labels, splits)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


class CountingDataset:
    """Wraps an h5py dataset and records every read."""

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.keys: list[Any] = []

    def __getitem__(self, key: Any) -> np.ndarray:
        self.keys.append(key)
        return self.ds[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds, name)


@pytest.fixture
def dense(tmp_path: Path) -> Written:
    return make_store(tmp_path / "store")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("budget", [BIG, NONE])
def test_float32_round_trip_is_exact_in_any_order(dense: Written, budget: int) -> None:
    rng = np.random.default_rng(1)
    order = rng.permutation(len(dense.ids))
    with TargetStore.open(dense.master, memory_budget_bytes=budget) as store:
        assert store.in_memory == (budget == BIG)
        assert np.array_equal(store.logits(dense.ids[order]), dense.logits[order])
        assert np.array_equal(store.ids, dense.ids)
        assert np.array_equal(store.labels, dense.labels)
        assert np.array_equal(store.splits, dense.splits)
        assert store.meta == dense.meta
        assert np.array_equal(store.rows_for_ids(dense.ids[order]), order)


def test_float16_round_trip_within_tolerance(tmp_path: Path) -> None:
    written = make_store(tmp_path, dtype="float16")
    with TargetStore.open(written.master) as store:
        got = store.logits(written.ids[::-1])
    want = written.logits[::-1]
    assert got.dtype == np.float32
    assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
    assert np.allclose(got, want, rtol=1e-3, atol=1e-3)


def test_dense_log_probs_match_log_softmax_with_temperature(tmp_path: Path) -> None:
    written = make_store(tmp_path, temperature=2.0)
    ids = written.ids[[5, 3, 200, 7]]
    with TargetStore.open(written.master) as store:
        assert np.allclose(store.log_probs(ids), log_softmax(written.logits[[5, 3, 200, 7]] / 2), atol=1e-5)
        assert np.allclose(store.log_probs(ids, temperature=1.0), log_softmax(written.logits[[5, 3, 200, 7]]),
                           atol=1e-5)


def test_topk_log_probs_are_exact_for_topk_classes_and_sum_to_one(tmp_path: Path) -> None:
    k, num_classes = 5, 20
    written = make_store(tmp_path, topk=k, num_classes=num_classes)
    rows = np.random.default_rng(2).permutation(len(written.ids))[:50]
    want = log_softmax(written.logits[rows])
    top = np.argsort(-written.logits[rows], axis=1)[:, :k]
    with TargetStore.open(written.master) as store:
        got = store.log_probs(written.ids[rows])
        hot = store.log_probs(written.ids[rows], temperature=3.0)
    assert got.shape == (50, num_classes) and got.dtype == np.float32
    assert np.allclose(np.take_along_axis(got, top, 1), np.take_along_axis(want, top, 1), atol=1e-5)
    assert np.allclose(np.exp(got.astype(np.float64)).sum(1), 1.0, atol=1e-5)
    assert np.allclose(np.exp(hot.astype(np.float64)).sum(1), 1.0, atol=1e-5)
    # the remainder is spread evenly over the other classes
    rest = np.ones_like(got, dtype=bool)
    np.put_along_axis(rest, top, False, 1)
    others = got[rest].reshape(50, num_classes - k)
    assert np.allclose(others, others[:, :1])
    remainder = 1 - np.exp(np.take_along_axis(want, top, 1)).sum(1)
    assert np.allclose(np.exp(others[:, 0].astype(np.float64)) * (num_classes - k), remainder, atol=1e-5)


def test_topk_float16_sums_to_one_and_is_close(tmp_path: Path) -> None:
    written = make_store(tmp_path, topk=3, dtype="float16")
    with TargetStore.open(written.master) as store:
        got = store.log_probs(written.ids)
        with pytest.raises(ArtifactError, match="top-3"):
            store.logits(written.ids[:2])
    assert np.allclose(np.exp(got.astype(np.float64)).sum(1), 1.0, atol=1e-5)
    want = log_softmax(written.logits)
    top = written.logits.argmax(1)[:, None]
    assert np.allclose(np.take_along_axis(got, top, 1), np.take_along_axis(want, top, 1), atol=1e-2)


# ----------------------------------------------------------------------------- reader paths


@pytest.mark.parametrize("topk", [0, 4])
def test_in_memory_and_out_of_core_agree(tmp_path: Path, topk: int) -> None:
    written = make_store(tmp_path, topk=topk)
    ids = np.random.default_rng(3).choice(written.ids, 120, replace=True)  # duplicates too
    with TargetStore.open(written.master, memory_budget_bytes=BIG) as mem, \
            TargetStore.open(written.master, memory_budget_bytes=NONE) as disk:
        assert mem.in_memory and not disk.in_memory
        assert disk.nbytes < mem.nbytes
        for t in (None, 0.5, 4.0):
            assert np.array_equal(mem.log_probs(ids, temperature=t), disk.log_probs(ids, temperature=t))


def test_out_of_core_reads_sorted_blocks_not_rows(dense: Written) -> None:
    rows = np.concatenate([np.arange(200, 250), [120], np.arange(0, 50)])  # 3 clusters, 101 rows
    np.random.default_rng(4).shuffle(rows)
    with TargetStore.open(dense.master, memory_budget_bytes=NONE) as store:
        counting = CountingDataset(store._datasets["logits"])
        store._datasets["logits"] = counting
        store._merge_gap = 2  # tiny rows would otherwise merge into one block
        got = store.logits(dense.ids[rows])
        assert np.array_equal(got, dense.logits[rows])
        assert counting.keys == [slice(0, 50), slice(120, 121), slice(200, 250)]
        assert store.read_calls == 3 and store.blocks_read == 3
        counting.keys.clear()
        store._merge_gap = 100  # with a larger gap the clusters merge into one block read
        assert np.array_equal(store.logits(dense.ids[rows]), dense.logits[rows])
        assert counting.keys == [slice(0, 250)]


def test_plain_h5py_sees_one_table(dense: Written) -> None:
    with h5py.File(dense.master, "r") as f:
        ds = f["logits"]
        assert ds.is_virtual and ds.shape == dense.logits.shape
        assert np.array_equal(ds[...], dense.logits)
        assert np.array_equal(f["id"][...], dense.ids)
        names = {m.file_name for m in ds.virtual_sources()}
        assert names == {p.name for p in shard_paths(dense.master, 3)}  # relative, no folder
        assert f.attrs["schema_version"] == SCHEMA_VERSION and bool(f.attrs["complete"])
        assert list(f["split"].attrs["split_names"]) == list(SPLIT_NAMES)


def test_moved_store_folder_still_opens(dense: Written, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(dense.master.parent), str(moved))
    monkeypatch.chdir(moved.parent)  # neither the old folder nor the store folder
    for budget in (BIG, NONE):
        with TargetStore.open(moved, memory_budget_bytes=budget) as store:
            assert np.array_equal(store.logits(dense.ids), dense.logits)


def test_ids_rows_and_splits(dense: Written) -> None:
    with TargetStore.open(dense.master) as store:
        assert np.array_equal(store.ids_in_split("unlabeled"), dense.ids[dense.splits == 1])
        assert sum(len(store.ids_in_split(name)) for name in SPLIT_NAMES) == len(dense.ids)
        with pytest.raises(ArtifactError, match="not in targets store"):
            store.rows_for_ids([dense.ids[0], 6])  # 6 is not an id (ids are 5 mod 7)
        with pytest.raises(ValueError):
            store.ids_in_split("train")


# ----------------------------------------------------------------------------- refusals


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        TargetStore.open(tmp_path / "targets.h5")


def test_refuses_temp_file_only(dense: Written) -> None:
    dense.master.rename(dense.master.with_name(".targets.h5.tmp"))
    with pytest.raises(ArtifactError, match="interrupted"):
        TargetStore.open(dense.master)


def test_refuses_incomplete_master(dense: Written) -> None:
    with h5py.File(dense.master, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(ArtifactError, match="incomplete"):
        TargetStore.open(dense.master)


@pytest.mark.parametrize("attr, value, message", [("complete", False, "is incomplete"),
                                                    ("run_key", "run-2", "belongs to another precompute run")])
def test_reader_refuses_a_shard_incomplete_or_of_another_run(dense: Written, attr: str, value: Any,
                                                             message: str) -> None:
    """The master is complete, but one shard behind it is not (or was written by another run): refused at open,
    naming the shard, in memory and out of core."""
    shard = shard_paths(dense.master, 3)[1]
    with h5py.File(shard, "r+") as f:
        f.attrs[attr] = value
    for budget in (BIG, NONE):
        with pytest.raises(ArtifactError, match=f"shard {shard}.*{message}|{message}.*{shard}"):
            TargetStore.open(dense.master, memory_budget_bytes=budget)


def test_refuses_unknown_schema_version(dense: Written) -> None:
    with h5py.File(dense.master, "r+") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(ArtifactError, match=r"schema version 3.*version\(s\) 1, 2"):
        TargetStore.open(dense.master)


def test_refuses_other_datas_fingerprint(dense: Written) -> None:
    with pytest.raises(ArtifactError, match="split 'val'.*rerun precompute for this data"):
        TargetStore.open(dense.master, expect_fingerprints={"labeled": "f1", "val": "changed"})
    with pytest.raises(ArtifactError, match="split 'test'"):
        TargetStore.open(dense.master, expect_fingerprints={"test": "f4"})  # not in the store
    TargetStore.open(dense.master, expect_fingerprints={"labeled": "f1", "val": "f3"}).close()


def test_refuses_class_count_mismatch(dense: Written) -> None:
    with pytest.raises(ArtifactError, match="20 classes, expected 21"):
        TargetStore.open(dense.master, expect_num_classes=21)


def test_refuses_missing_shard(dense: Written) -> None:
    shard_paths(dense.master, 3)[1].unlink()
    with pytest.raises(ArtifactError, match="targets-00001-of-00003.h5.*missing"):
        TargetStore.open(dense.master)


def test_refuses_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "targets.h5").write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(ArtifactError, match="not a readable HDF5 file"):
        TargetStore.open(tmp_path)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_refuses_virtual_source_outside_folder(tmp_path: Path, where: str) -> None:
    meta = make_meta()
    num_rows = 10
    outside = tmp_path / "outside.h5"
    folder = tmp_path / "store"
    folder.mkdir()
    with ShardWriter(outside, meta, num_rows, 0, 1, 0) as writer:
        writer.append(np.arange(num_rows), np.zeros(num_rows), np.zeros(num_rows, np.uint8),
                      np.zeros((num_rows, meta.num_classes), np.float32))
    source = "../outside.h5" if where == "parent" else str(outside.resolve())
    with h5py.File(folder / "targets.h5", "w") as f:
        for name in ("id", "label", "split", "logits"):
            with h5py.File(outside, "r") as src:
                shape, dtype = src[name].shape, src[name].dtype
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(source, name, shape=shape, dtype=dtype)
            f.create_virtual_dataset(name, layout)
        for key, value in meta.to_attrs().items():
            f.attrs[key] = np.array(value, dtype=h5py.string_dtype()) if isinstance(value, list) else value
        f.attrs["complete"] = True
    with h5py.File(folder / "targets.h5", "r") as f:  # the hostile file really works in plain h5py
        assert f["id"].shape == (num_rows,)
    with pytest.raises(ArtifactError, match="outside the store folder"):
        TargetStore.open(folder / "targets.h5")
    assert any("outside" in p for p in verify_store(folder)["problems"])


def test_writer_rejects_nan_and_leaves_no_file(tmp_path: Path) -> None:
    meta = make_meta()
    path = tmp_path / "targets-00000-of-00001.h5"
    logits = np.zeros((4, meta.num_classes), np.float32)
    logits[2, 3] = np.nan
    with pytest.raises(ArtifactError, match="NaN/Inf"):
        with ShardWriter(path, meta, 4, 0, 1, 0) as writer:
            writer.append(np.arange(4), np.zeros(4), np.zeros(4, np.uint8), logits)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_float16_overflow(tmp_path: Path) -> None:
    meta = make_meta(dtype="float16")
    with pytest.raises(ArtifactError, match="float32"):
        with ShardWriter(tmp_path / "s.h5", meta, 1, 0, 1, 0) as writer:
            writer.append([0], [0], np.zeros(1, np.uint8), np.full((1, meta.num_classes), 1e6, np.float32))


# ----------------------------------------------------------------------------- writer lifecycle


def test_interrupted_writer_leaves_nothing_and_run_key_is_checked(tmp_path: Path) -> None:
    meta = make_meta()
    path = tmp_path / "targets-00000-of-00001.h5"
    batch = (np.arange(5), np.zeros(5), np.zeros(5, np.uint8), np.ones((5, meta.num_classes), np.float32))
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(path, meta, 10, 0, 1, 0) as writer:
            writer.append(*batch)
            assert writer.tmp_path.exists() and not path.exists()
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="5 of 10 rows"):
        with ShardWriter(path, meta, 10, 0, 1, 0) as writer:
            writer.append(*batch)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="shard holds 5"):
        with ShardWriter(path, meta, 5, 0, 1, 0) as writer:
            writer.append(*batch)
            writer.append(*batch)
    assert not shard_is_complete(path, meta)
    with ShardWriter(path, meta, 5, 0, 1, 0) as writer:
        writer.append(*batch)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert shard_is_complete(path, meta)
    assert not shard_is_complete(path, dataclasses.replace(meta, run_key="run-2"))


def test_write_master_refuses_incomplete_shards(tmp_path: Path) -> None:
    written = make_store(tmp_path)
    paths = shard_paths(written.master, 3)
    with h5py.File(paths[2], "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(ArtifactError, match="targets-00002-of-00003"):
        write_master(written.master, paths, written.meta)
    with pytest.raises(ArtifactError, match="another precompute run|incomplete"):
        write_master(written.master, paths[:2], dataclasses.replace(written.meta, run_key="other"))


def test_meta_attrs_round_trip_with_many_classes(tmp_path: Path) -> None:
    meta = make_meta(21841, topk=10, temperature=1.5, config={"nested": {"a": [1, 2]}})
    with h5py.File(tmp_path / "a.h5", "w", libver=("v110", "latest")) as f:  # > 64 KiB of attributes
        for key, value in meta.to_attrs().items():
            f.attrs[key] = np.array(value, dtype=h5py.string_dtype()) if isinstance(value, list) else value
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert StoreMeta.from_attrs(f.attrs) == meta


def test_plan_shards_and_paths(tmp_path: Path) -> None:
    assert plan_shards(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert plan_shards(2, 3) == [(0, 0), (0, 1), (1, 2)]
    assert [p.name for p in shard_paths(tmp_path / "targets.h5", 2)] == [
        "targets-00000-of-00002.h5", "targets-00001-of-00002.h5"]


def test_empty_shard_is_allowed(tmp_path: Path) -> None:
    written = make_store(tmp_path, num_rows=2, num_shards=3)
    with TargetStore.open(written.master) as store:
        assert np.array_equal(store.logits(written.ids), written.logits)


def test_file_sha256(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- verify_store


def test_verify_sound_store(dense: Written) -> None:
    report = verify_store(dense.master)
    assert report["problems"] == []
    has = dense.labels >= 0
    accuracy = (dense.logits.argmax(1)[has] == dense.labels[has]).mean()
    assert report["teacher_accuracy"] == pytest.approx(accuracy)
    assert report["labeled_rows"] == has.sum()
    assert report["rows"] == len(dense.ids)
    assert report["rows_per_split"] == {name: int((dense.splits == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
    assert report["master_complete"] is True
    assert [s["complete"] for s in report["shards"]] == [True, True, True]
    assert report["nonfinite_values"] == 0
    assert 0 <= report["ece"] <= 1 and report["mean_entropy"] > 0
    assert report["provenance"]["teacher_arch"] == "resnet50"


def test_verify_reports_nan_written_behind_our_back(dense: Written) -> None:
    with h5py.File(shard_paths(dense.master, 3)[0], "r+") as f:
        f["logits"][5, 2] = np.nan
    report = verify_store(dense.master)
    assert report["nonfinite_values"] == 1
    assert any("NaN" in p for p in report["problems"])
    with TargetStore.open(dense.master) as store:
        with pytest.raises(ArtifactError, match="NaN"):
            store.log_probs(dense.ids[[4, 5]])


def test_verify_never_raises_on_broken_stores(tmp_path: Path) -> None:
    assert verify_store(tmp_path / "nothing.h5")["problems"]
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert verify_store(tmp_path / "junk.h5")["problems"]
    written = make_store(tmp_path / "s")
    shard_paths(written.master, 3)[0].unlink()
    report = verify_store(written.master)
    assert any("missing" in p for p in report["problems"])
    assert report["shards"][0]["exists"] is False


def _known_view_store(folder: Path, topk: int) -> tuple[Path, list[float], list[float], list[float]]:
    """400 rows, 10 classes, 3 views; every row's logits are ``a`` on one class and 0 elsewhere, so view v puts
    ``p[v]`` on that class and its entropy is known. The class is the label where view v is right: view 0 on the
    rows with ``i % 5 != 0`` (80 % of the 300 rows with labels), view 1 on even rows (2/3), view 2 nowhere."""
    n, c, p = 400, 10, [0.9, 0.55, 0.7]
    i = np.arange(n)
    splits = (i % 4).astype(np.uint8)  # code 1 = unlabeled: label -1
    labels = np.where(splits == 1, -1, (i * 7) % c).astype(np.int64)
    right = [i % 5 != 0, i % 2 == 0, np.zeros(n, bool)]
    logits = np.zeros((n, 3, c), np.float32)
    for v in range(3):
        target = np.where(right[v], labels, labels + 1) % c  # unlabeled rows: any class
        logits[i, v, target] = np.log(9 * p[v] / (1 - p[v]))  # softmax: p[v] on target, (1 - p[v]) / 9 elsewhere
    meta = make_meta(c, topk=topk, views=3, view_policy={"views": 3, "seed": 0, "rebuild": "test"})
    write_store(folder / "targets.h5", meta, i * 3 + 1, labels, splits, logits[:, 0], 2, 64, logits[:, 1:])
    entropy = [float(-q * np.log(q) - (1 - q) * np.log((1 - q) / (c - 1))) for q in p]
    return folder / "targets.h5", [0.8, 2 / 3, 0.0], entropy, p


@pytest.mark.parametrize("topk", [0, 4], ids=["dense", "top-4"])
def test_verify_reports_accuracy_entropy_and_ece_per_view(tmp_path: Path, topk: int) -> None:
    """Per view: the teacher's accuracy on the rows with labels (labeled, val, test; not the unlabeled rows) and
    its mean entropy; ECE of view 0 (one confidence, 0.9, at 80 % accuracy: 0.1). Top-k keeps the exact figures
    here (the classes outside the top 4 hold equal logits, as the reader assumes). Read in blocks of 7 rows."""
    master, accuracy, entropy, p = _known_view_store(tmp_path, topk)
    report = verify_store(master, block_rows=7)
    assert report["problems"] == []
    assert [v["view"] for v in report["views"]] == [0, 1, 2]
    assert [v["labeled_rows"] for v in report["views"]] == [300] * 3
    assert [v["teacher_accuracy"] for v in report["views"]] == pytest.approx(accuracy, abs=1e-12)
    assert [v["mean_entropy"] for v in report["views"]] == pytest.approx(entropy, rel=1e-5)
    assert (report["teacher_accuracy"], report["mean_entropy"]) == (accuracy[0], report["views"][0]["mean_entropy"])
    assert report["ece"] == pytest.approx(abs(accuracy[0] - p[0]), rel=1e-5)


def test_inspect_prints_the_teacher_on_each_view(tmp_path: Path) -> None:
    from conftest import cli

    master, accuracy, entropy, _ = _known_view_store(tmp_path, 0)
    out = cli("inspect", master).stdout
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    lines = {row[0]: " ".join(row) for row in cells if row and row[0][:1].isdigit() and "%" in row[1]}
    for view, (acc, ent) in enumerate(zip(accuracy, entropy)):
        assert f"{100 * acc:.2f}% on 300 rows" in lines[str(view)] and f"{ent:.4f} nats" in lines[str(view)], out
    mean_entropy = (entropy[1] + entropy[2]) / 2
    assert "33.33% (0.00%-66.67%)" in lines["1..2"] and f"{mean_entropy:.4f} nats" in lines["1..2"], out
    report = json.loads(cli("inspect", master, "--json").stdout)
    assert [v["teacher_accuracy"] for v in report["views"]] == pytest.approx(accuracy)
