"""``reducedmpl precompute`` and ``reducedmpl inspect``, end to end on the tiny digits teacher."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli, cli_subprocess
from reducedmpl.config import DataConfig
from reducedmpl.data.loading import Batcher, Preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.errors import ArtifactError
from reducedmpl.models import model_from_artifact
from reducedmpl.targets import SPLIT_NAMES, TargetStore, file_sha256


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core machine they lose a lot (OpenMP waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _art(teacher: Path) -> dict:
    return torch.load(teacher, weights_only=True)


def _teacher_logits(art: dict, ids: np.ndarray, batch_size: int) -> np.ndarray:
    """The teacher run directly (eval mode, no augmentation) on rows ``ids`` of its own data."""
    data = DataConfig(**art["data"])
    model = model_from_artifact(art).eval()
    batcher = Batcher(load_source(data.source), ids, Preprocess.from_dict(art["preprocess"]), data,
                      batch_size=batch_size, train=False, seed=0)
    with torch.no_grad():
        return torch.cat([model(x) for x, _, _ in batcher.epoch(0)]).numpy()


def _files(folder: Path) -> dict[str, dict]:
    """Every attribute and dataset of every HDF5 file in ``folder`` (master and shards)."""
    out: dict[str, dict] = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as f:
            items = {"/": dict(f.attrs)}
            for name, ds in f.items():
                items[name] = {"attrs": dict(ds.attrs), "value": ds[...], "dtype": str(ds.dtype)}
            out[path.name] = items
    return out


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where


# ----------------------------------------------------------------------------------------------------- stores
def test_example_command_writes_a_sound_store(tiny_teacher: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("runs/t").mkdir(parents=True)
    shutil.copy(tiny_teacher, "runs/t/teacher.pt")
    tiny_teacher, out = Path("runs/t/teacher.pt"), Path("runs/t/targets.h5")
    t0 = time.perf_counter()
    r = cli("precompute", "--teacher", "runs/t/teacher.pt", "--out", "runs/t/targets.h5")
    assert time.perf_counter() - t0 < 20
    assert "labeled 100" in r.stdout and "teacher acc" in r.stdout and str(out) in r.stdout
    art = _art(tiny_teacher)
    with TargetStore.open(out, expect_fingerprints=art["data_fingerprints"]) as store:
        meta = store.meta
        assert meta.teacher_arch == "test_resnet" and meta.teacher_sha256 == file_sha256(tiny_teacher)
        assert meta.dtype == "float16" and meta.topk == 0 and meta.class_names == art["class_names"]
        assert meta.config["data"] == art["data"] and meta.config["preprocess"] == art["preprocess"]
        assert meta.config["precompute"]["batch_size"] == 256 and meta.data_spec == "digits"
        assert meta.fingerprints == art["data_fingerprints"] and len(meta.run_key) == 64
        # rows by split (SPLIT_NAMES order), then id; label -1 exactly for unlabeled rows
        assert np.all(np.diff(store.splits.astype(int)) >= 0)
        for code, name in enumerate(SPLIT_NAMES):
            ids = store.ids[store.splits == code]
            assert len(ids) == art["split_sizes"][name] and np.all(np.diff(ids) > 0)
        source = load_source("digits")
        unl = store.splits == SPLIT_NAMES.index("unlabeled")
        assert np.all(store.labels[unl] == -1)
        assert np.array_equal(store.labels[~unl], source.labels[store.ids[~unl]])
    r = cli("inspect", out)
    assert "sound" in r.stdout and "test_resnet" in r.stdout and "labeled 100" in r.stdout
    # the same command again is a no-op
    mtimes = {p: p.stat().st_mtime_ns for p in out.parent.glob("targets*.h5")}
    r = cli("precompute", "--teacher", tiny_teacher, "--out", out)
    assert "up to date" in r.stdout
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.parent.glob("targets*.h5")}


def test_float32_logits_equal_the_teachers_own(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "f32.h5"
    cli("precompute", "--teacher", tiny_teacher, "--out", out, "--dtype", "float32", "--batch-size", "64",
        "--quiet")
    with TargetStore.open(out) as store:
        direct = _teacher_logits(_art(tiny_teacher), store.ids, batch_size=64)  # the same batches
        assert np.array_equal(store.logits(store.ids), direct)
        shuffled = np.random.default_rng(0).permutation(store.ids)
        assert np.array_equal(store.logits(shuffled), direct[store.rows_for_ids(shuffled)])
    # four shards, a different batch size: the same numbers, as one table for plain h5py
    cli("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "sharded", "--dtype", "float32",
        "--shards", "4", "--batch-size", "50", "--quiet")
    assert len(list((tmp_path / "sharded").glob("targets-*-of-00004.h5"))) == 4
    with h5py.File(tmp_path / "sharded" / "targets.h5", "r") as f:
        assert f["logits"].is_virtual and f["logits"].shape == direct.shape
        np.testing.assert_allclose(f["logits"][...], direct, rtol=0, atol=1e-5)


def test_topk_store_keeps_the_top_classes_exactly(tiny_teacher: Path, tmp_path: Path) -> None:
    cli("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "d.h5", "--dtype", "float32", "--quiet")
    cli("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "k.h5", "--dtype", "float32", "--topk", "3",
        "--splits", "unlabeled,labeled", "--quiet")
    with TargetStore.open(tmp_path / "d.h5") as dense, TargetStore.open(tmp_path / "k.h5") as topk:
        assert topk.meta.topk == 3 and set(topk.meta.fingerprints) == {"labeled", "unlabeled"}
        assert set(np.unique(topk.splits)) == {0, 1}
        ids = topk.ids
        logits = dense.logits(ids)
        full = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        got = topk.log_probs(ids)
        top3 = np.argsort(-logits, axis=1)[:, :3]
        np.testing.assert_allclose(np.take_along_axis(got, top3, 1), np.take_along_axis(full, top3, 1), atol=1e-5)
        np.testing.assert_allclose(np.exp(got).sum(1), 1.0, atol=1e-5)


def test_model_and_checkpoint_teacher(tiny_teacher: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    art = _art(tiny_teacher)
    save_file({k: v.contiguous() for k, v in art["state_dict"].items()}, str(tmp_path / "w.safetensors"))
    data = ["--data", "digits", "--set", "data.labeled_per_class=10"]
    cli("precompute", "--model", "test_resnet", "--checkpoint", tmp_path / "w.safetensors", *data,
        "--dtype", "float32", "--out", tmp_path / "plain.h5", "--quiet")
    cli("precompute", "--teacher", tiny_teacher, "--dtype", "float32", "--out", tmp_path / "art.h5", "--quiet")
    with TargetStore.open(tmp_path / "plain.h5") as a, TargetStore.open(tmp_path / "art.h5") as b:
        # the preprocessing measured on the data is the one train-large recorded: the same logits
        assert a.meta.fingerprints == b.meta.fingerprints and a.meta.config["preprocess"] == art["preprocess"]
        assert np.array_equal(a.logits(a.ids), b.logits(a.ids))
        assert a.meta.teacher_sha256 == file_sha256(tmp_path / "w.safetensors")
    r = cli("precompute", "--model", "test_resnet", "--checkpoint", tmp_path / "w.safetensors",
            "--out", tmp_path / "x.h5", check=False)
    assert_one_line_error(r, "needs --data")
    five = {k: v for k, v in art["state_dict"].items()}
    five["fc.weight"], five["fc.bias"] = five["fc.weight"][:5], five["fc.bias"][:5]
    torch.save(five, tmp_path / "five.pth")
    r = cli("precompute", "--model", "test_resnet", "--checkpoint", tmp_path / "five.pth", *data,
            "--out", tmp_path / "x.h5", check=False)
    assert_one_line_error(r, "5 classes", "has 10")
    torch.save({"state_dict": art["state_dict"], "evil": np.dtype("float32")}, tmp_path / "pickled.pt")
    r = cli("precompute", "--model", "test_resnet", "--checkpoint", tmp_path / "pickled.pt", *data,
            "--out", tmp_path / "x.h5", check=False)
    assert_one_line_error(r, "pickled")
    r = cli("precompute", "--teacher", tiny_teacher, "--model", "test_resnet", "--out", tmp_path / "x.h5",
            check=False)
    assert_one_line_error(r, "either --teacher or --model")
    assert not (tmp_path / "x.h5").exists()


def test_prefetched_batches_come_in_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from reducedmpl.stages.precompute import _prefetched

    source = load_source("digits")
    prep = Preprocess(1, 8, (0.3,), (0.4,))
    batcher = Batcher(source, np.arange(0, 1797, 3), prep, DataConfig(), batch_size=50, train=False, seed=0)
    with ThreadPoolExecutor(1) as pool:
        got = list(_prefetched(batcher, pool))
    want = list(batcher.epoch(0))
    assert len(got) == len(want) == 12
    for a, b in zip(got, want):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


# ----------------------------------------------------------------------------------------------- crash safety
def test_killed_run_resumes_to_the_same_store(tiny_teacher: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["precompute", "--teacher", tiny_teacher, "--batch-size", "2", "--shards", "8", "--quiet"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread there as here: the same arithmetic
    cli(*args, "--out", tmp_path / "full" / "targets.h5")
    cut = tmp_path / "cut" / "targets.h5"
    proc = cli_subprocess(*args, "--out", cut)
    first = tmp_path / "cut" / "targets-00000-of-00008.h5"
    deadline = time.time() + 120
    while time.time() < deadline and not first.exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read()
    assert not cut.exists(), "killed after the first shard, yet the master exists"
    with pytest.raises(ArtifactError):
        TargetStore.open(cut)
    r = cli("inspect", cut, check=False)
    assert r.exit_code == 1 and "interrupted" in r.stdout
    stale = tmp_path / "cut" / ".targets-00007-of-00008.h5.tmp"
    stale.write_bytes(b"half a shard")  # as a kill mid-shard leaves behind
    r = cli(*args, "--out", cut)
    assert "already complete" in r.stderr and not list((tmp_path / "cut").glob(".*.tmp"))
    _assert_same(_files(tmp_path / "full"), _files(tmp_path / "cut"))
    with TargetStore.open(cut) as store:
        assert store.num_rows == 1797


def test_existing_store_other_run_and_overwrite(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "s" / "targets.h5"
    cli("precompute", "--teacher", tiny_teacher, "--out", out, "--shards", "2", "--quiet")
    r = cli("precompute", "--teacher", tiny_teacher, "--out", out, "--shards", "3", "--dtype", "float32",
            check=False)
    assert_one_line_error(r, "another precompute run", "dtype", "--overwrite")
    r = cli("precompute", "--teacher", tiny_teacher, "--out", out, "--shards", "3", "--dtype", "float32",
            "--overwrite", "--quiet")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "targets-00000-of-00003.h5", "targets-00001-of-00003.h5", "targets-00002-of-00003.h5", "targets.h5"]
    with TargetStore.open(out) as store:
        assert store.meta.dtype == "float32"
    # a shard of the store deleted: the same command recomputes just that shard
    (out.parent / "targets-00001-of-00003.h5").unlink()
    r = cli("precompute", "--teacher", tiny_teacher, "--out", out, "--shards", "3", "--dtype", "float32", "--quiet")
    assert "1/3 shards computed" in r.stdout
    TargetStore.open(out).close()


# --------------------------------------------------------------------------------------------- data checks
def test_data_mismatch_and_bad_settings(tiny_teacher: Path, tmp_path: Path) -> None:
    art = _art(tiny_teacher)
    # a teacher whose recorded fingerprints do not match its own recorded data (the data changed): refused
    bad = dict(art, data_fingerprints={**art["data_fingerprints"], "labeled": "0" * 16})
    torch.save(bad, tmp_path / "teacher.pt")
    r = cli("precompute", "--teacher", tmp_path / "teacher.pt", "--out", tmp_path / "a.h5", check=False)
    assert_one_line_error(r, "other data", "labeled")
    assert not (tmp_path / "a.h5").exists()
    # a teacher whose weights do not fit its architecture
    sd = {k: v for k, v in art["state_dict"].items() if k != "fc.bias"}
    torch.save(dict(art, state_dict=sd), tmp_path / "broken.pt")
    r = cli("precompute", "--teacher", tmp_path / "broken.pt", "--out", tmp_path / "a.h5", check=False)
    assert_one_line_error(r, "do not fit 'test_resnet'")
    # other data asked for explicitly: allowed, and the store records that data and its fingerprints
    r = cli("precompute", "--teacher", tiny_teacher, "--data", "digits", "--set", "data.split_seed=5",
            "--out", tmp_path / "b.h5", "--quiet")
    assert "differ from the data the teacher was trained on" in r.stderr
    expected = make_splits(load_source("digits"), DataConfig(**{**art["data"], "split_seed": 5})).fingerprints
    with TargetStore.open(tmp_path / "b.h5", expect_fingerprints=expected) as store:
        assert store.meta.split_seed == 5 and store.meta.config["data"]["labeled_per_class"] == 10
        assert len(store.ids_in_split("labeled")) == 100
    # settings that cannot work
    for flags, fragments in [(["--splits", "labeled,unlabelled"], ["unknown split 'unlabelled'"]),
                             (["--topk", "10"], ["topk"]), (["--dtype", "float64"], ["dtype"]),
                             (["--shards", "0"], ["shards"]), (["--set", "precompute.batchsize=3"], ["batch_size"])]:
        r = cli("precompute", "--teacher", tiny_teacher, "--out", tmp_path / "c.h5", *flags, check=False)
        assert_one_line_error(r, *fragments)
    r = cli("precompute", "--out", tmp_path / "c.h5", check=False)
    assert_one_line_error(r, "no teacher")
    r = cli("precompute", "--teacher", tmp_path / "missing.pt", "--out", tmp_path / "c.h5", check=False)
    assert_one_line_error(r, "does not exist")
    assert not (tmp_path / "c.h5").exists()


# -------------------------------------------------------------------------------------------------- inspect
def test_inspect_finds_nan_in_a_store(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "n" / "targets.h5"
    cli("precompute", "--teacher", tiny_teacher, "--out", out, "--shards", "2", "--quiet")
    assert cli("inspect", out.parent).exit_code == 0
    with h5py.File(out.parent / "targets-00001-of-00002.h5", "r+") as f:
        f["logits"][3, 2] = np.nan
    r = cli("inspect", out, check=False)
    assert r.exit_code == 1 and "NaN" in r.stdout
    r = cli("inspect", out, "--json", check=False)
    assert r.exit_code == 1 and '"nonfinite_values": 1' in r.stdout


def test_inspect_teacher_artifacts(tiny_teacher: Path, tmp_path: Path) -> None:
    r = cli("inspect", tiny_teacher)
    assert "teacher artifact" in r.stdout and "test_resnet" in r.stdout and "sound" in r.stdout
    art = _art(tiny_teacher)
    sd = dict(art["state_dict"])
    sd["fc.weight"] = sd["fc.weight"].clone()
    sd["fc.weight"][0, 0] = float("nan")
    torch.save(dict(art, state_dict=sd), tmp_path / "nan.pt")
    r = cli("inspect", tmp_path / "nan.pt", check=False)
    assert r.exit_code == 1 and "NaN/Inf weight values in 1 tensor" in r.stdout and "fc.weight" in r.stdout
    sd = {k: v for k, v in art["state_dict"].items() if k != "fc.bias"}
    torch.save(dict(art, state_dict=sd), tmp_path / "missing.pt")
    r = cli("inspect", tmp_path / "missing.pt", check=False)
    assert r.exit_code == 1 and "does not load strictly" in r.stdout
    torch.save(dict(art, kind="student"), tmp_path / "student.pt")
    assert "student artifact" in cli("inspect", tmp_path / "student.pt").stdout
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path / "other.pt", tmp_path / "notes.txt", tmp_path / "absent.pt"):
        assert_one_line_error(cli("inspect", path, check=False))
    shutil.copy(tiny_teacher, tmp_path / "copy.pt")
    assert cli("inspect", tmp_path / "copy.pt").exit_code == 0
