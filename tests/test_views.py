"""Stored views: ``precompute --views K`` and their exact replay in ``distill``."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import cli, write_store
from test_targets import BIG, NONE, log_softmax, make_meta

from reducedmpl.data import views as views_mod
from reducedmpl.data.loading import Batcher
from reducedmpl.data.views import ViewMaker, ViewPolicy, pick_views, view_seed
from reducedmpl.targets import TargetStore, target_bytes_per_row
from reducedmpl.targets.reader import topk_log_probs

POLICY = {"views": 4, "seed": 0, "input_size": 8, "crop_padding": 2, "hflip": False, "randaugment": None,
          "kind": "array", "rebuild": views_mod.REBUILD}


# ---------------------------------------------------------------------------------------------- the store
def write_view_store(folder: Path, views: int = 4, num_rows: int = 120, num_classes: int = 12, **meta):
    rng = np.random.default_rng(3)
    m = make_meta(num_classes, views=views, view_policy={**POLICY, "views": views}, **meta)
    logits = (rng.standard_normal((num_rows, num_classes)) * 3).astype(np.float32)
    view_logits = (rng.standard_normal((num_rows, views - 1, num_classes)) * 3).astype(np.float32)
    ids = (rng.permutation(num_rows) * 3 + 1).astype(np.int64)
    splits = (np.arange(num_rows) % 4).astype(np.uint8)
    labels = np.where(splits == 1, -1, logits.argmax(1)).astype(np.int64)
    write_store(folder / "targets.h5", m, ids, labels, splits, logits, 2, 32, view_logits if views > 1 else None)
    return folder / "targets.h5", ids, np.concatenate([logits[:, None], view_logits], axis=1)


@pytest.mark.parametrize("budget", [BIG, NONE])
def test_each_row_reads_the_target_of_its_own_view(tmp_path: Path, budget: int) -> None:
    master, ids, all_views = write_view_store(tmp_path)
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ids), 50, replace=True)  # repeats: the same row with two views in one batch
    views = rng.integers(0, 4, 50)
    with TargetStore.open(master, memory_budget_bytes=budget) as store:
        assert store.views == 4 and store.in_memory == (budget == BIG)
        got = store.logits(ids[rows], views=views)
        assert np.array_equal(got, all_views[rows, views])
        np.testing.assert_allclose(store.log_probs(ids[rows], views=views), log_softmax(all_views[rows, views]),
                                   atol=1e-5)
        assert np.array_equal(store.logits(ids[rows]), all_views[rows, 0])  # no views: the clean view 0
        with pytest.raises(ValueError, match="views must be in 0..3"):
            store.log_probs(ids[:2], views=[0, 4])
        with pytest.raises(ValueError, match="3 views for 2 ids"):
            store.log_probs(ids[:2], views=[0, 1, 2])


@pytest.mark.parametrize("topk", [None, 4])
def test_out_of_core_reads_only_the_chosen_view_of_each_row(tmp_path: Path, monkeypatch, topk) -> None:
    from reducedmpl.targets import reader

    monkeypatch.setattr(reader, "MERGE_GAP_BYTES", 1)  # no gap absorbed: each row its own block
    extra = {} if topk is None else {"dtype": "float32", "topk": topk}
    master, ids, all_views = write_view_store(tmp_path, num_rows=60, **extra)
    rows = np.arange(0, 60, 3)
    views = 1 + np.arange(len(rows)) % 3  # every row an augmented view
    with h5py.File(master) as f:
        names = [n for n in f if n.startswith("view_")]
        per_view = sum(int(np.prod(f[n].shape[2:])) * f[n].dtype.itemsize for n in names)
    for shard in (p for p in tmp_path.rglob("*.h5") if p != master):
        with h5py.File(shard) as f:
            assert all(f[n].chunks[1] == 1 for n in names)  # chunked one view at a time
    with TargetStore.open(master, memory_budget_bytes=NONE) as store, \
            TargetStore.open(master, memory_budget_bytes=BIG) as mem:
        assert not store.in_memory
        got = store.log_probs(ids[rows], views=views)
        assert store.bytes_read == len(rows) * per_view  # one view per row; all of them would be 3x as many
        np.testing.assert_array_equal(got, mem.log_probs(ids[rows], views=views))
        if topk is None:
            assert np.array_equal(store.logits(ids[rows], views=views), all_views[rows, views])


def test_topk_views_keep_each_views_top_k(tmp_path: Path) -> None:
    master, ids, all_views = write_view_store(tmp_path, views=3, dtype="float32", topk=4)
    with h5py.File(master) as f:
        assert f["view_topk_logits"].shape == (120, 2, 4) and f["view_logsumexp"].shape == (120, 2)
    views = np.arange(len(ids)) % 3
    with TargetStore.open(master, memory_budget_bytes=NONE) as store:
        got = store.log_probs(ids, views=views)
    chosen = all_views[np.arange(len(ids)), views]
    top = np.argsort(-chosen, axis=1)[:, :4]
    values = np.take_along_axis(chosen, top, axis=1)
    lse = np.log(np.exp(chosen.astype(np.float64)).sum(1))
    np.testing.assert_allclose(got, topk_log_probs(values, top, lse, 12, 1.0), atol=1e-2)  # float32 logsumexp
    np.testing.assert_allclose(np.take_along_axis(got, top, 1), values - lse[:, None], atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), chosen.argmax(1))


def test_writer_needs_exactly_the_views_the_store_has(tmp_path: Path) -> None:
    from reducedmpl.targets import ShardWriter

    meta = make_meta(5, views=3, view_policy={**POLICY, "views": 3})
    with pytest.raises(ValueError, match="pass view_logits exactly when"):
        with ShardWriter(tmp_path / "s.h5", meta, 2, 0, 1, 0) as w:
            w.append(np.arange(2), np.zeros(2), np.zeros(2), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"view_logits must have shape \(2, 2, 5\)"):
        with ShardWriter(tmp_path / "s.h5", meta, 2, 0, 1, 0) as w:
            w.append(np.arange(2), np.zeros(2), np.zeros(2), np.zeros((2, 5)), np.zeros((2, 3, 5)))
    assert not list(tmp_path.iterdir())  # nothing half-written is left
    with pytest.raises(ValueError, match="must record the view policy"):
        make_meta(5, views=3).validate()


def test_a_version_1_store_reads_as_one_view(tmp_path: Path) -> None:
    """Stores written before views keep working: no views attributes, schema 1, one view."""
    master, ids, all_views = write_view_store(tmp_path, views=1)
    with h5py.File(master, "r+") as f:
        assert "view_logits" not in f
        f.attrs["schema_version"] = 1
        del f.attrs["views"], f.attrs["view_policy"]
    with TargetStore.open(master) as store:
        assert store.views == 1 and store.meta.view_policy == {}
        assert np.array_equal(store.logits(ids, views=np.zeros(len(ids), int)), all_views[:, 0])


def test_target_bytes_per_row_is_what_the_file_holds(tmp_path: Path) -> None:
    for classes, views, topk in ((10, 1, 0), (10, 8, 0), (1000, 32, 0), (1000, 8, 5)):
        meta = make_meta(classes, views=views, view_policy={**POLICY, "views": views}, dtype="float16", topk=topk)
        expected = views * (classes * 2 if not topk else topk * (2 + 2) + 4)
        assert target_bytes_per_row(meta) == expected
    sizes = {}
    for views in (1, 8):
        master, *_ = write_view_store(tmp_path / str(views), views=views, num_rows=2000, num_classes=10,
                                      dtype="float16")
        sizes[views] = sum(p.stat().st_size for p in master.parent.iterdir())
    per_row = (sizes[8] - sizes[1]) / 2000
    assert per_row == pytest.approx(7 * 10 * 2, rel=0.15)  # the 7 extra views' float16 logits, chunk overhead aside


# ---------------------------------------------------------------------------------------------- the views
def test_pick_views_depends_on_seed_epoch_and_row_only() -> None:
    ids = np.arange(5000)
    a = pick_views(3, 1, ids, 8)
    assert a.min() == 0 and a.max() == 7
    assert np.abs(np.bincount(a, minlength=8) / 5000 - 1 / 8).max() < 0.02  # uniform
    assert np.array_equal(a[::-1], pick_views(3, 1, ids[::-1], 8))  # the batch around a row does not matter
    assert (a != pick_views(3, 2, ids, 8)).mean() > 0.8 and (a != pick_views(4, 1, ids, 8)).mean() > 0.8
    assert not pick_views(3, 1, ids, 1).any()
    assert view_seed(0, 5, 1) != view_seed(0, 5, 2) != view_seed(1, 5, 1)


def _maker(policy: dict, seed: int = 0):
    from reducedmpl.config import DataConfig
    from reducedmpl.data.setup import setup_data

    data = setup_data(DataConfig(source="digits"))
    return ViewMaker(data.source, data.prep, ViewPolicy.from_dict({**policy, "seed": seed})), data


@pytest.mark.parametrize("randaugment,hflip", [(None, False), (None, True), ("rand-m9-n2", True)])
def test_a_view_is_the_same_in_any_batch(randaugment, hflip) -> None:
    maker, data = _maker({**POLICY, "randaugment": randaugment, "hflip": hflip})
    ids, views = np.arange(40), np.arange(40) % 4
    whole = maker.inputs(ids, views)
    order = np.random.default_rng(0).permutation(40)
    assert torch.equal(maker.inputs(ids[order], views[order]), whole[order])
    assert torch.equal(torch.cat([maker.inputs(ids[i:i + 3], views[i:i + 3]) for i in range(0, 40, 3)]), whole)
    clean = Batcher(data.source, ids, data.prep, data.config, batch_size=64, train=False, seed=0).batch(0, 0)[0]
    assert torch.equal(whole[views == 0], clean[views == 0])  # view 0 is the evaluation input
    augmented = whole[views > 0]
    assert not torch.equal(augmented, clean[views > 0])
    other, _ = _maker({**POLICY, "randaugment": randaugment, "hflip": hflip}, seed=1)
    assert not torch.equal(other.inputs(ids, views)[views > 0], augmented)  # the policy seed matters


def test_views_refuse_another_rebuild_scheme() -> None:
    """Stores of scheme 1 (tensors of the teacher's size) or unknown schemes are refused, naming the fix."""
    from reducedmpl.errors import ArtifactError

    for scheme in (0, 1):
        with pytest.raises(ArtifactError, match=f"rebuild scheme {scheme}, this reducedmpl rebuilds scheme 2"
                                                ".*precompute --views.*replay_views=false"):
            _maker({**POLICY, "rebuild": scheme})
    with pytest.raises(ArtifactError, match="rebuild scheme 0"):
        _maker({k: v for k, v in POLICY.items() if k != "rebuild"})


def test_crops_and_flips_cover_their_range() -> None:
    """Every offset in 0..2p and both flips occur, evenly; view 0 is the image itself."""
    maker, data = _maker({**POLICY, "hflip": True, "views": 64})
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).expand(2000, 1, 8, 8)
    ids, views = np.arange(2000), np.arange(2000) % 64
    out = maker._crop_flip(x, ids, views, maker.policy.seed)
    assert torch.equal(out[views == 0], x[views == 0])
    flipped = out[:, 0, 3, 2] > out[:, 0, 3, 5]  # the ramp runs the other way (columns inside any crop)
    assert 0.4 < flipped[views > 0].float().mean() < 0.6 and not flipped[views == 0].any()
    # unflipped: pixel (2, 2) of the crop at offset (oy, ox) of the 2-padded image is the image's (oy, ox)
    corner = out[(views > 0) & ~flipped.numpy(), 0, 2, 2].long()
    assert set(corner.tolist()) == {8 * oy + ox for oy in range(5) for ox in range(5)}


def _per_image_randaugment(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """What a store of rebuild scheme 2 records: torchvision's RandAugment image by image, each after
    ``torch.manual_seed`` of its view's seed."""
    from torchvision.transforms import v2

    aug = v2.RandAugment(num_ops=2, magnitude=9)
    with torch.random.fork_rng(devices=[]):
        out = []
        for img, seed in zip(images, seeds):
            torch.manual_seed(seed)
            out.append(aug(img))
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 13, 11)])
def test_batched_randaugment_is_the_per_image_transform_bit_for_bit(shape) -> None:
    """Every op (each drawn ~40 times here, with both signs) on a batch gives each image what the per-image
    transform gives it, and the views' RandAugment is that transform seeded by the view."""
    from torchvision.transforms import v2

    from reducedmpl.data.loading import BatchedRandAugment

    v2_randaugment = v2.RandAugment(num_ops=2, magnitude=9)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (300, *shape), dtype=np.uint8))
    images[:60] //= 4  # low contrast: autocontrast and equalize have work to do
    seeds = [view_seed(7, r, 1 + r % 3) for r in range(len(images))]
    aug, g = BatchedRandAugment(9, 2), torch.Generator()
    plans = [aug.plan(g.manual_seed(s), *shape[1:]) for s in seeds]
    assert {op for plan in plans for op, _ in plan} == set(aug.ops)  # every op drawn
    assert torch.equal(aug.apply(images, plans), _per_image_randaugment(images, seeds))

    # the ordinary training batches: one generator for the batch, its draws made image after image
    batch_seed = 12345
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_seed)
        expected = torch.stack([v2_randaugment(img) for img in images[:50]])
    draws = torch.Generator().manual_seed(batch_seed)
    assert torch.equal(aug.apply(images[:50], [aug.plan(draws, *shape[1:]) for _ in range(50)]), expected)

    maker, _ = _maker({**POLICY, "randaugment": "rand-m9-n2"}, seed=7)
    ids, views = np.arange(200), np.arange(200) % 4
    source = torch.from_numpy(maker.source.images[ids]).permute(0, 3, 1, 2)
    expected = source.clone()
    aug_rows = views > 0
    expected[aug_rows] = _per_image_randaugment(source[aug_rows], [view_seed(7, int(r), int(v)) for r, v in
                                                                   zip(ids[aug_rows], views[aug_rows])])
    assert torch.equal(maker._randaugment(source, ids, views, 7), expected)


def test_array_replay_is_the_same_with_workers(tmp_path: Path) -> None:
    """Stored views of an array source replayed in 2 spawned DataLoader workers, ahead of use, give the batches
    of the main process (RandAugment, crops, flips), also when a stream resumes mid-epoch."""
    from reducedmpl.config import DataConfig
    from reducedmpl.data.loading import BatchStream

    maker, data = _maker({**POLICY, "randaugment": "rand-m9-n2", "hflip": True, "views": 8})
    rows = np.arange(384)

    def batches(workers: int, start: int = 0) -> tuple[Batcher, list]:
        cfg = DataConfig(**{**data.config.__dict__, "num_workers": workers})
        b = Batcher(data.source, rows, data.prep, cfg, batch_size=64, train=True, seed=4, drop_last=True,
                    replay=maker)
        return b, [out for e in (0, 1) for out in b.epoch(e, start if e == 0 else 0)]

    b0, main = batches(0)
    b2, workers = batches(2)
    assert not b0.prefetches and b2.prefetches and len(main) == len(workers) == 2 * len(b0)
    for (xa, ya, ia), (xb, yb, ib) in zip(main, workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    stream = BatchStream(b2)
    stream.load_state_dict({"epoch": 1, "position": 3})
    x, _, ids = stream.next()
    assert torch.equal(ids, main[len(b0) + 3][2]) and torch.equal(x, main[len(b0) + 3][0])
    assert len(set(stream.views(ids).tolist())) > 1


# ---------------------------------------------------------------------------------------------- end to end
def precompute_recording(*args) -> dict[tuple[int, int], torch.Tensor]:
    """Run ``precompute ARGS`` in this process; returns every view input the teacher ran on, by (row, view)."""
    seen: dict[tuple[int, int], torch.Tensor] = {}
    original = views_mod.ViewMaker.inputs

    def recording(self, ids, views):
        x = original(self, ids, views)
        for i, (r, v) in enumerate(zip(np.asarray(ids).tolist(), np.asarray(views).tolist())):
            seen[(r, v)] = x[i].clone()
        return x

    mp = pytest.MonkeyPatch()
    mp.setattr(views_mod.ViewMaker, "inputs", recording)
    try:
        cli("precompute", *args)
    finally:
        mp.undo()
    return seen


@pytest.fixture(scope="module")
def recorded_views(tiny_teacher, tmp_path_factory):
    """A 4-view float32 store of the tiny teacher, and every input the teacher ran on for views 1..3."""
    out = tmp_path_factory.mktemp("views") / "targets.h5"
    seen = precompute_recording("--teacher", tiny_teacher, "--out", out, "--dtype", "float32", "--views", "4",
                                "--batch-size", "50", "--quiet")
    return out, seen


def test_replay_rebuilds_the_teachers_inputs_bit_for_bit(tiny_teacher, recorded_views) -> None:
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.models import load_artifact, model_from_artifact
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    out, seen = recorded_views
    cfg = stage_config("distill", flags={"mode": "kd", "steps": 3, "device": "cpu", "unlabeled_batch_size": 64})
    store = open_store(out, 64)
    assert store.views == 4
    d = Distiller(cfg, setup_data(resolve_data(cfg, store)), store, torch.device("cpu"))
    teacher = model_from_artifact(load_artifact(tiny_teacher, "teacher")).eval()
    checked = 0
    for _ in range(3):
        x, _, ids = d.unlabeled.next()
        views = d.unlabeled.views(ids)
        assert views is not None and len(set(views.tolist())) > 1
        for i, (r, v) in enumerate(zip(ids.tolist(), views.tolist())):
            if v:
                assert torch.equal(x[i], seen[(r, v)]), (r, v)  # the very input the teacher saw
                checked += 1
        with torch.no_grad():
            logits = teacher(x).numpy()
        np.testing.assert_allclose(logits, store.logits(ids.numpy(), views=views), rtol=1e-4, atol=1e-4)
    state = d.unlabeled.state_dict()
    x, _, ids = d.unlabeled.next()
    views = d.unlabeled.views(ids)
    d.unlabeled.load_state_dict(state)
    b = d.batch(d.method.needs)  # what a step gets: the same inputs, each row with its own view's q_L
    assert torch.equal(b.x_u, x)
    torch.testing.assert_close(b.log_q_u, torch.from_numpy(store.log_probs(ids.numpy(), views=views)))
    assert checked > 100
    store.close()


def test_precompute_with_workers_writes_the_same_store(tiny_teacher, tmp_path: Path) -> None:
    """Views rendered in 2 DataLoader workers (data.num_workers) give the store views rendered in this process give,
    bit for bit, with RandAugment, over several shards."""
    stores = {}
    for workers in (0, 2):
        out = tmp_path / str(workers) / "targets.h5"
        cli("precompute", "--teacher", tiny_teacher, "--out", out, "--dtype", "float32", "--views", "3",
            "--batch-size", "32", "--shards", "2", "--splits", "labeled", "--set",
            "data.randaugment=rand-m9-n2", "--set", f"data.num_workers={workers}", "--quiet")
        with TargetStore.open(out) as store:
            ids = np.sort(store.ids)
            stores[workers] = [store.logits(ids, views=np.full(len(ids), v)) for v in range(3)]
    for a, b in zip(stores[0], stores[2]):
        assert np.array_equal(a, b)
    assert not np.array_equal(stores[0][1], stores[0][2])


def test_distill_on_views_runs_and_can_turn_replay_off(recorded_views, tmp_path: Path) -> None:
    import json

    out, _ = recorded_views
    for replay in ("true", "false"):
        cli("distill", "--targets", out, "--mode", "reducedmpl", "--steps", "4", "--set", "distill.batch_size=8",
            "--set", "distill.unlabeled_batch_size=16", "--set", f"distill.replay_views={replay}",
            "--out", tmp_path / replay, "--quiet")
        assert json.loads((tmp_path / replay / "result.json").read_text())["steps"] == 4
    reported = cli("inspect", out, "--no-latency").stdout
    assert "4 views (crop 2; seed 0)" in reported


# ---------------------------------------------------------------------------------------------- the pseudo-label pool
def test_pseudo_pool_unlabeled_keeps_the_labeled_rows_out(tiny_targets) -> None:
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    store = open_store(tiny_targets, 64)
    pools = {}
    for pool in ("all", "unlabeled"):
        cfg = stage_config("distill", flags={"mode": "kd", "steps": 2, "device": "cpu", "pseudo_pool": pool})
        data = setup_data(resolve_data(cfg, store))
        pools[pool] = set(Distiller(cfg, data, store, torch.device("cpu")).unlabeled.batcher.indices.tolist())
    rows = data.splits.indices
    assert pools["all"] == set(rows["labeled"].tolist()) | set(rows["unlabeled"].tolist())
    assert pools["unlabeled"] == set(rows["unlabeled"].tolist())
    store.close()


def test_pseudo_pool_unlabeled_needs_unlabeled_rows(tiny_targets, runner, tmp_path: Path) -> None:
    from conftest import assert_one_line_error
    from reducedmpl.cli import app

    result = runner.invoke(app, ["distill", "--targets", str(tiny_targets), "--mode", "kd", "--steps", "2",
                                 "--set", "distill.pseudo_pool=unlabeled", "--set", "distill.data.labeled_per_class=null",
                                 "--set", "distill.data.labeled_fraction=1", "--out", str(tmp_path / "d")])
    assert_one_line_error(result, "no unlabeled rows", "pseudo_pool=all")


# ---------------------------------------------------------------------------------------------- image folders
def test_folder_views_are_rebuilt_exactly_in_any_batch_and_worker(tmp_path: Path) -> None:
    """Folder views come from timm's training transform seeded per (row, view); the training batcher replays
    them the same in the main process and in DataLoader workers, and precompute stored the teacher's logits on
    exactly those inputs."""
    import timm

    from test_folder_loading import RANDAUG, write_folder
    from reducedmpl.config import DataConfig
    from reducedmpl.data.loading import default_preprocess
    from reducedmpl.data.sources import load_source

    root = write_folder(tmp_path / "data", per_class=6)
    src = load_source(f"folder:{root}")
    cfg = DataConfig(source=f"folder:{root}", randaugment=RANDAUG, input_size=16, val_size=0, test_size=0)
    rows = np.arange(len(src))
    prep = default_preprocess(src, rows, cfg)
    maker = ViewMaker(src, prep, views_mod.make_policy(3, 5, cfg, prep, src))
    ids, views = np.repeat(rows[:6], 3), np.tile(np.arange(3), 6)
    x = maker.inputs(ids, views)
    assert torch.equal(maker.inputs(ids[::-1], views[::-1]), x.flip(0))
    clean = Batcher(src, rows[:6], prep, cfg, batch_size=6, train=False, seed=0).batch(0, 0)[0]
    assert torch.equal(x[views == 0], clean) and not torch.equal(x[views == 1], clean)

    def replayed(workers: int):
        b = Batcher(src, rows, prep, DataConfig(**{**cfg.__dict__, "num_workers": workers}), batch_size=6,
                    train=True, seed=2, drop_last=True, replay=maker)
        return [(xb, ib) for xb, _, ib in b.epoch(0)], b

    main, b = replayed(0)
    for (xa, ia), (xb, ib) in zip(main, replayed(1)[0]):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    xa, ia = main[0]
    assert torch.equal(xa, maker.inputs(ia.numpy(), b.views_of(0, ia.numpy())))

    weights = tmp_path / "w.pt"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    out = tmp_path / "store" / "targets.h5"
    cli("precompute", "--model", "test_resnet", "--checkpoint", weights, "--data", f"folder:{root}", "--set",
        "data.val_size=0", "--set", "data.test_size=0", "--set", "data.input_size=16", "--set",
        f"data.randaugment={RANDAUG}", "--splits", "labeled", "--views", "3", "--set", "view_seed=5",
        "--dtype", "float32", "--out", out, "--quiet")
    with TargetStore.open(out) as store:
        policy = ViewPolicy.from_dict(store.meta.view_policy)
        assert policy.kind == "folder" and policy.views == 3 and policy.seed == 5
        model = timm.create_model("test_resnet", num_classes=3)
        model.load_state_dict(torch.load(weights, weights_only=True))
        with torch.no_grad():
            logits = model.eval()(ViewMaker(src, prep, policy).inputs(ids, views)).numpy()
        np.testing.assert_allclose(store.logits(ids, views=views), logits, rtol=1e-4, atol=1e-4)
