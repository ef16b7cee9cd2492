"""What distill promises about a store of several views, checked through its runs and their outputs:
``replay_views: false`` trains exactly as from a one-view store, and evaluation and the probes read view 0."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import cli
from reducedmpl.models import safe_load
from reducedmpl.targets import TargetStore

DISTILL = ["--steps", "6", "--quiet", "--set", "distill.batch_size=16", "--set", "distill.unlabeled_batch_size=32",
           "--set", "distill.eval_every=3", "--set", "distill.log_every=3", "--set", "distill.probe_size=8"]


@pytest.fixture(scope="module")
def view_store(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher's store of 3 views, float32 like ``tiny_targets`` (whose logits are its view 0's)."""
    out = tmp_path_factory.mktemp("views") / "targets.h5"
    cli("precompute", "--teacher", tiny_teacher, "--out", out, "--dtype", "float32", "--views", "3", "--quiet")
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(x).double(), -1).numpy()


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_replay_views_false_trains_as_from_the_one_view_store(tiny_targets, view_store, tmp_path):
    """kd from the 3-view store with ``replay_views: false`` is bit for bit kd from the store of view 0 alone
    (the same teacher and data), and with replay on it is not."""
    with TargetStore.open(tiny_targets) as one, TargetStore.open(view_store) as three:
        ids = np.sort(one.ids)
        assert three.views == 3 and np.array_equal(one.logits(ids), three.logits(ids))  # view 0 is the same
    runs = {"one": (tiny_targets,), "off": (view_store, "--set", "distill.replay_views=false"), "on": (view_store,)}
    for name, (store, *extra) in runs.items():
        cli("distill", "--targets", store, "--mode", "kd", *DISTILL, *extra, "--out", tmp_path / name)
    student = {name: safe_load(tmp_path / name / "student.pt")["state_dict"] for name in runs}
    assert all(torch.equal(student["off"][k], v) for k, v in student["one"].items())
    assert not all(torch.equal(student["on"][k], v) for k, v in student["one"].items())
    drop = {"images_per_s", "train_seconds", "seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_rows(tmp_path / "off")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_rows(tmp_path / "one")]


def test_evaluation_and_probes_read_view_0(view_store, tmp_path):
    """A store whose augmented views are wrong on purpose (each row's logits rolled by one class): a ReducedMPL run
    replays them in training, but the large teacher's accuracy it reports and the probes' q_L are view 0's."""
    folder = tmp_path / "rolled"
    shutil.copytree(view_store.parent, folder)
    for shard in folder.glob("targets-*.h5"):
        with h5py.File(shard, "r+") as f:
            f["view_logits"][...] = np.roll(f["view_logits"][...], 1, axis=-1)
    run = tmp_path / "d"
    cli("distill", "--targets", folder / "targets.h5", "--mode", "reducedmpl", "--teacher-grad", "reinforce", *DISTILL,
        "--out", run)

    with TargetStore.open(folder / "targets.h5") as store:
        want, rolled = {}, {}
        for split in ("labeled", "val"):
            ids = store.ids_in_split(split)
            labels = store.labels[store.rows_for_ids(ids)]
            want[split] = float((store.logits(ids).argmax(1) == labels).mean())
            rolled[split] = float((store.logits(ids, views=np.ones(len(ids), int)).argmax(1) == labels).mean())
        probes = json.loads((run / "probes.json").read_text())
        probe_ids = np.array(probes["ids"])
        clean = log_softmax(store.logits(probe_ids))
        view_1 = log_softmax(store.logits(probe_ids, views=np.ones(len(probe_ids), int)))
    assert want != rolled  # the check can tell the views apart
    evaluated = [r for r in read_rows(run) if "val_acc_large" in r]
    assert len(evaluated) >= 3  # steps 0, 3, 6 and the final row
    for r in evaluated:
        for split in ("labeled", "val"):
            assert r[f"{split}_acc_large"] == pytest.approx(want[split], abs=1e-6), (r, want)
    assert len(probe_ids) == 8
    np.testing.assert_allclose(np.array(probes["large"]), clean, atol=1e-5)
    assert np.abs(np.array(probes["large"]) - view_1).max() > 1e-3
