"""Function matching: stored mixup views (``precompute --view-mix mixup``) and the online anchor
(``distill.online_mix``)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli
from test_views import POLICY, precompute_recording

from reducedmpl.data.loading import Batcher
from reducedmpl.data.views import (ViewMaker, ViewPolicy, batch_mixup, beta_draws, mix_partners, mixup,
                                   partner_seed, pool_digest)
from reducedmpl.errors import ArtifactError
from reducedmpl.targets import TargetStore

CPU = torch.device("cpu")


def digits_maker(policy: dict, pool: np.ndarray | None = None):
    from reducedmpl.config import DataConfig
    from reducedmpl.data.setup import setup_data

    data = setup_data(DataConfig(source="digits"))
    return ViewMaker(data.source, data.prep, ViewPolicy.from_dict(policy), pool), data


def mixed_policy(pool: np.ndarray, **over) -> dict:
    pool = np.unique(pool)
    return {**POLICY, "view_mix": "mixup", "mix_alpha": 1.0, "pool_rows": len(pool), "pool_digest": pool_digest(pool),
            **over}


# ---------------------------------------------------------------------------------------------- the pure functions
def test_partners_and_weights_depend_on_seed_row_and_view_only() -> None:
    pool = np.arange(0, 3000, 3)
    rows, views = np.arange(4000), 1 + np.arange(4000) % 7
    partners, lam = mix_partners(5, rows, views, pool, 1.0)
    assert np.isin(partners, pool).all() and len(np.unique(partners)) > 0.5 * len(pool)
    assert lam.dtype == np.float32 and lam.min() >= 0 and lam.max() <= 1
    assert abs(lam.mean() - 0.5) < 0.02 and abs(lam.var() - 1 / 12) < 0.01  # Beta(1, 1): uniform
    order = np.random.default_rng(0).permutation(4000)
    p2, l2 = mix_partners(5, rows[order], views[order], pool, 1.0)  # any batch, any order
    assert np.array_equal(p2, partners[order]) and np.array_equal(l2, lam[order])
    p3, l3 = mix_partners(5, rows[:10], views[:10], pool, 1.0)  # a batch of ten
    assert np.array_equal(p3, partners[:10]) and np.array_equal(l3, lam[:10])
    p4, l4 = mix_partners(6, rows, views, pool, 1.0)
    assert (p4 != partners).mean() > 0.9 and (l4 != lam).mean() > 0.9  # the policy seed matters
    assert (mix_partners(5, rows, views + 1, pool, 1.0)[1] != lam).mean() > 0.9  # and the view
    _, u_shaped = mix_partners(5, rows, views, pool, 0.2)
    assert abs(u_shaped.mean() - 0.5) < 0.03 and u_shaped.var() > 0.15  # small alpha: mostly near 0 or 1
    keys = np.arange(3, dtype=np.uint64)
    assert np.array_equal(beta_draws(keys, 2.0), beta_draws(keys, 2.0))
    assert partner_seed(0) != partner_seed(1) and partner_seed(0) != 0


def test_batch_mixup_is_a_function_of_seed_step_and_rank() -> None:
    perm, lam = batch_mixup(3, 10, 64, 1.0)
    assert sorted(perm.tolist()) == list(range(64)) and lam.dtype == np.float32 and 0 <= lam.min() <= lam.max() <= 1
    again = batch_mixup(3, 10, 64, 1.0)
    assert np.array_equal(again[0], perm) and np.array_equal(again[1], lam)
    for other in (batch_mixup(3, 11, 64, 1.0), batch_mixup(4, 10, 64, 1.0), batch_mixup(3, 10, 64, 1.0, rank=1)):
        assert not np.array_equal(other[1], lam)
    x, y = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    w = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0])
    torch.testing.assert_close(mixup(x, y, w), w.view(-1, 1, 1, 1) * x + (1 - w.view(-1, 1, 1, 1)) * y)


def test_policy_round_trip_and_old_policies_read_unmixed() -> None:
    policy = ViewPolicy.from_dict(mixed_policy(np.arange(10), mix_alpha=0.4))
    assert ViewPolicy.from_dict(policy.to_dict()) == policy and policy.view_mix == "mixup"
    old = ViewPolicy.from_dict(POLICY)  # a scheme-2 store made before mixed views
    assert old.view_mix == "none" and old.mix_alpha == 1.0 and old.pool_rows == 0
    with pytest.raises(ArtifactError, match="mixed by 'cutmix'.*precompute --views"):
        ViewPolicy.from_dict({**POLICY, "view_mix": "cutmix"})


# ---------------------------------------------------------------------------------------------- the maker
def test_a_mixed_view_is_lam_a_plus_one_minus_lam_b() -> None:
    """View v >= 1 of row i is lam * (row i's view v) + (1 - lam) * (partner j's view v from the partner stream);
    view 0 is clean; any batch, any order; the pool must be the one the policy records."""
    plain, data = digits_maker({**POLICY, "hflip": True, "randaugment": "rand-m9-n2"})
    pool = np.arange(len(data.source))
    maker = ViewMaker(data.source, data.prep, ViewPolicy.from_dict(mixed_policy(pool, **{
        "hflip": True, "randaugment": "rand-m9-n2"})), pool)
    ids, views = np.arange(40), np.arange(40) % 4
    x = maker.inputs(ids, views)
    order = np.random.default_rng(1).permutation(40)
    assert torch.equal(maker.inputs(ids[order], views[order]), x[order])
    assert torch.equal(torch.cat([maker.inputs(ids[i:i + 3], views[i:i + 3]) for i in range(0, 40, 3)]), x)
    own = plain.inputs(ids, views)
    assert torch.equal(x[views == 0], own[views == 0])  # view 0: clean, unmixed
    m = views > 0
    partners, lam = mix_partners(0, ids[m], views[m], pool, 1.0)
    other = maker.render(partners, views[m], partner_seed(0))
    assert torch.equal(x[m], mixup(own[m], other, torch.from_numpy(lam)))
    assert not torch.equal(other, plain.inputs(partners, views[m]))  # the partner's own augmentation stream
    assert (x[m] - own[m]).abs().amax() > 0.1
    with pytest.raises(ArtifactError, match="partner rows of the store's mixed views"):
        ViewMaker(data.source, data.prep, maker.policy, pool[:-1])


def test_mixed_replay_is_the_same_with_workers() -> None:
    """Mixed views of an array source replayed in 2 spawned DataLoader workers give the batches made here."""
    from reducedmpl.config import DataConfig

    _, data = digits_maker(POLICY)
    rows = np.arange(256)
    maker = ViewMaker(data.source, data.prep, ViewPolicy.from_dict(mixed_policy(rows, views=8)), rows)

    def batches(workers: int) -> list:
        cfg = DataConfig(**{**data.config.__dict__, "num_workers": workers})
        return list(Batcher(data.source, rows, data.prep, cfg, batch_size=64, train=True, seed=4, drop_last=True,
                            replay=maker).epoch(0))

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) == 4
    for (xa, _, ia), (xb, _, ib) in zip(main, workers):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mixed_store(tiny_teacher, tmp_path_factory):
    """A 3-view mixup store (float32) of the tiny teacher, and every input the teacher ran on for views 1..2."""
    out = tmp_path_factory.mktemp("mixed") / "targets.h5"
    seen = precompute_recording("--teacher", tiny_teacher, "--out", out, "--dtype", "float32", "--views", "3",
                                "--view-mix", "mixup", "--mix-alpha", "0.5", "--batch-size", "50", "--quiet")
    return out, seen


def test_distill_rebuilds_the_mixed_inputs_bit_for_bit(tiny_teacher, mixed_store) -> None:
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.models import load_artifact, model_from_artifact
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    out, seen = mixed_store
    cfg = stage_config("distill", flags={"mode": "kd", "steps": 3, "device": "cpu", "unlabeled_batch_size": 64})
    store = open_store(out, 64)
    policy = ViewPolicy.from_dict(store.meta.view_policy)
    assert policy.view_mix == "mixup" and policy.mix_alpha == 0.5 and policy.pool_rows == len(store.ids)
    d = Distiller(cfg, setup_data(resolve_data(cfg, store)), store, CPU)
    teacher = model_from_artifact(load_artifact(tiny_teacher, "teacher")).eval()
    checked = 0
    for _ in range(3):
        x, _, ids = d.unlabeled.next()
        views = d.unlabeled.views(ids)
        for i, (r, v) in enumerate(zip(ids.tolist(), views.tolist())):
            if v:
                assert torch.equal(x[i], seen[(r, v)]), (r, v)  # the very mixed input the teacher saw
                checked += 1
        with torch.no_grad():
            logits = teacher(x).numpy()
        np.testing.assert_allclose(logits, store.logits(ids.numpy(), views=views), rtol=1e-4, atol=1e-4)
    assert checked > 80
    store.close()
    assert "3 views (crop 2, mixup alpha 0.5; seed 0)" in cli("inspect", out, "--no-latency").stdout


def test_labeled_rows_never_train_on_a_mixed_view(tiny_teacher, mixed_store, tmp_path: Path) -> None:
    """A mixed view of a labeled row is partly its partner, so the labeled stream (whose losses use the row's label)
    does not replay a mixed store's views: its images are the rows' own, under the student's augmentation, with the
    clean view's targets. The pseudo-label stream replays them; a plain store's views stay on both streams."""
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    cfg = stage_config("distill", flags={"mode": "reducedmpl", "steps": 3, "device": "cpu", "batch_size": 16,
                                         "unlabeled_batch_size": 64})
    store = open_store(mixed_store[0], 64)
    d = Distiller(cfg, setup_data(resolve_data(cfg, store)), store, CPU)
    _, y, ids = d.labeled.next()
    assert d.labeled.views(ids) is None and d.unlabeled.views(d.unlabeled.next()[2]) is not None
    assert torch.equal(y, torch.from_numpy(d.data.source.labels[ids.numpy()]).to(y.dtype))
    d.step(True)  # a ReducedMPL step reads the labeled rows' clean targets
    store.close()
    plain_out = tmp_path / "plain" / "targets.h5"
    cli("precompute", "--teacher", tiny_teacher, "--out", plain_out, "--dtype", "float32", "--views", "3",
        "--batch-size", "50", "--quiet")
    plain = open_store(plain_out, 64)
    d = Distiller(cfg, setup_data(resolve_data(cfg, plain)), plain, CPU)
    assert d.labeled.views(d.labeled.next()[2]) is not None and d.unlabeled.views(d.unlabeled.next()[2]) is not None
    plain.close()


def test_folder_mixed_views_are_rebuilt_exactly(tmp_path: Path) -> None:
    """An image folder's mixed views: the distill batcher (in this process and in a worker) rebuilds the very
    inputs the teacher ran on, and the stored logits are the teacher's on them."""
    import timm

    from test_folder_loading import RANDAUG, write_folder
    from reducedmpl.config import DataConfig
    from reducedmpl.data.loading import default_preprocess
    from reducedmpl.data.sources import load_source

    root = write_folder(tmp_path / "data", per_class=4)
    src = load_source(f"folder:{root}")
    cfg = DataConfig(source=f"folder:{root}", randaugment=RANDAUG, input_size=16, val_size=0, test_size=0)
    rows = np.arange(len(src))
    prep = default_preprocess(src, rows, cfg)
    weights = tmp_path / "w.pt"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    out = tmp_path / "store" / "targets.h5"
    seen = precompute_recording(
        "--model", "test_resnet", "--checkpoint", weights, "--data", f"folder:{root}", "--set", "data.val_size=0",
        "--set", "data.test_size=0", "--set", "data.input_size=16", "--set", f"data.randaugment={RANDAUG}",
        "--splits", "labeled", "--views", "3", "--view-mix", "mixup", "--dtype", "float32", "--out", out, "--quiet")
    with TargetStore.open(out) as store:
        policy = ViewPolicy.from_dict(store.meta.view_policy)
        assert policy.kind == "folder" and policy.view_mix == "mixup"
        maker = ViewMaker(src, prep, policy, store.ids)

        def replayed(workers: int) -> list:
            b = Batcher(src, rows, prep, DataConfig(**{**cfg.__dict__, "num_workers": workers}), batch_size=6,
                        train=True, seed=2, drop_last=True, replay=maker)
            return [(xb, ib, b.views_of(0, ib.numpy())) for xb, _, ib in b.epoch(0)]

        main = replayed(0)
        model = timm.create_model("test_resnet", num_classes=3)
        model.load_state_dict(torch.load(weights, weights_only=True))
        for (xa, ia, va), (xb, ib, _) in zip(main, replayed(1)):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
            for x, r, v in zip(xa, ia.tolist(), va.tolist()):
                assert not v or torch.equal(x, seen[(r, v)]), (r, v)
            with torch.no_grad():
                logits = model.eval()(xa).numpy()
            np.testing.assert_allclose(store.logits(ia.numpy(), views=va), logits, rtol=1e-4, atol=1e-4)
        assert any(v.any() for _, _, v in main)
        plain = ViewMaker(src, prep, ViewPolicy.from_dict({**policy.to_dict(), "view_mix": "none"}))
        ids, views = np.array([0, 1, 2]), np.array([1, 2, 0])
        mixed, own = maker.inputs(ids, views), plain.inputs(ids, views)
        assert torch.equal(mixed[2], own[2]) and not torch.equal(mixed[:2], own[:2])


# ---------------------------------------------------------------------------------------------- online anchor
def test_online_mix_teacher_target_is_on_the_mixed_image(tiny_teacher, tiny_targets, monkeypatch) -> None:
    """online_mix=mixup: the student trains on the batch mixed by batch_mixup(seed, step), and the target is the
    teacher's output on that very mixed image (checked against the teacher network run directly); the next step
    uses the next key, which a resume restores."""
    from reducedmpl import methods, mpl
    from reducedmpl.config import stage_config
    from reducedmpl.data.setup import setup_data
    from reducedmpl.models import load_artifact, model_from_artifact
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    cfg = stage_config("distill", flags={"mode": "online-kd", "large_teacher": str(tiny_teacher), "steps": 3,
                                         "online_mix": "mixup", "mix_alpha": 1.0, "seed": 3,
                                         "unlabeled_batch_size": 32, "data": {"crop_padding": 0}, "device": "cpu"})
    store = open_store(tiny_targets, 64)
    d = Distiller(cfg, setup_data(resolve_data(cfg, store)), store, CPU)
    seen = {}
    forward, kd_loss = d.method.student.forward, mpl.kd_student_loss

    def student_forward(x):
        seen.setdefault("student", x.detach().clone())  # the first step's
        return forward(x)

    def spy_kd_loss(logits_u, log_q_u, *args):
        seen.setdefault("target", log_q_u.detach().clone())
        return kd_loss(logits_u, log_q_u, *args)

    monkeypatch.setattr(d.method.student, "forward", student_forward)
    monkeypatch.setattr(mpl, "kd_student_loss", spy_kd_loss)
    x_u, _, _ = d.unlabeled.batcher.batch(0, 0)
    d.step(measure=False)
    perm, lam = batch_mixup(3, 0, len(x_u), 1.0)
    mixed = mixup(x_u, x_u[torch.from_numpy(perm)], torch.from_numpy(lam))
    assert torch.equal(seen["student"], mixed) and not torch.equal(mixed, x_u)
    net = model_from_artifact(load_artifact(tiny_teacher, "teacher")).eval()
    with torch.no_grad():
        direct = F.log_softmax(net(mixed), -1)  # the teacher's preprocessing is the student's here
    torch.testing.assert_close(seen["target"], direct, rtol=1e-4, atol=1e-4)
    assert (seen["target"] - d.method.large.log_probs(x_u)).abs().amax() > 1e-2  # not the unmixed target
    assert d.method.state_dict() == {"mixes": 1}
    fresh = methods.build_step(cfg, d.student, None, large=d.method.large)
    fresh.load_state_dict(d.method.state_dict())
    x2 = torch.randn(8, *x_u.shape[1:])
    p2, l2 = batch_mixup(3, 1, 8, 1.0)
    assert torch.equal(fresh.mixed(x2), mixup(x2, x2[torch.from_numpy(p2)], torch.from_numpy(l2)))
    assert math.isfinite(d.step(measure=True).student_loss)
    store.close()
