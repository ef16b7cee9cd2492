"""Image folders through a DataLoader: the worker count never changes a batch, and a resumed epoch skips ahead
exactly (batches, teacher weights, and a distill killed mid-epoch and continued with another worker count)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, cli_subprocess
from reducedmpl.config import DataConfig
from reducedmpl.data import loading
from reducedmpl.data.loading import Batcher, BatchStream, default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.distributed import Dist

RANDAUG = "rand-m9-n2"


def write_folder(root: Path, classes: int = 3, per_class: int = 16, size: tuple[int, int] = (20, 18)) -> Path:
    """Random RGB PNGs in ``root/CLASS/``, with a per-class tint so that a model can learn something."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 160, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c % 3] += 90
            path = root / f"class{c}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images") / "data")


def batcher(folder: Path, workers: int, *, seed: int = 1, rank: int = 0, world: int = 1) -> Batcher:
    src = load_source(f"folder:{folder}")
    cfg = DataConfig(source=f"folder:{folder}", randaugment=RANDAUG, num_workers=workers, input_size=16)
    rows = np.arange(len(src))
    return Batcher(src, rows, default_preprocess(src, rows, cfg), cfg, batch_size=8, train=True, seed=seed,
                   drop_last=True, dist=Dist(rank=rank, world_size=world) if world > 1 else None)


def epochs(b: Batcher, n: int = 2) -> list:
    return [batch for e in range(n) for batch in b.epoch(e)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
                                    for x, y in zip(a, b))


def test_batches_are_the_same_for_0_1_and_3_workers(folder):
    ref = epochs(batcher(folder, 0))
    assert ref[0][0].shape == (8, 3, 16, 16)
    for workers in (1, 3):
        b = batcher(folder, workers)
        assert b.prefetches and same(epochs(b), ref), workers
        assert same(epochs(b), ref), f"{workers} workers, second pass (persistent workers)"
    # the same batches one at a time, in the main process
    b0 = batcher(folder, 0)
    assert same([b0.batch(e, k) for e in range(2) for k in range(len(b0))], ref)
    # the augmentation really is random: epochs differ, and another seed differs
    assert not torch.equal(ref[0][0], ref[len(b0)][0])
    assert not same(epochs(batcher(folder, 0, seed=2)), ref)


def test_a_resumed_epoch_skips_ahead_exactly(folder):
    ref = list(batcher(folder, 0).epoch(1))
    for workers in (0, 3):
        assert same(list(batcher(folder, workers).epoch(1, start=3)), ref[3:])
    # a stream saved inside epoch 1 and restored in another process count gives the rest of the stream
    full = BatchStream(batcher(folder, 3))
    want = [full.next() for _ in range(2 * len(full.batcher) + 3)]
    first = BatchStream(batcher(folder, 1))
    got = [first.next() for _ in range(len(full.batcher) + 2)]
    second = BatchStream(batcher(folder, 0))
    second.load_state_dict(first.state_dict())
    got += [second.next() for _ in range(len(want) - len(got))]
    assert same(got, want)


def test_ranks_take_their_share_of_each_batch(folder):
    one = epochs(batcher(folder, 0), 1)
    ranks = [epochs(batcher(folder, 2, rank=r, world=2), 1) for r in range(2)]
    for k, batch in enumerate(one):
        ids = torch.cat([ranks[0][k][2], ranks[1][k][2]])
        assert sorted(ids.tolist()) == sorted(batch[2].tolist())
        for r in range(2):  # each row gets the augmentation it has in one process
            for j, row in enumerate(ranks[r][k][2].tolist()):
                i = batch[2].tolist().index(row)
                assert torch.equal(ranks[r][k][0][j], batch[0][i])


def test_item_augmentation_leaves_the_process_generators_alone(folder):
    b = batcher(folder, 0)
    torch.manual_seed(5)
    np.random.seed(5)
    before = torch.rand(3), np.random.rand(3)
    torch.manual_seed(5)
    np.random.seed(5)
    b.batch(0, 0)
    after = torch.rand(3), np.random.rand(3)
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert loading.item_seed(1, 0, 5) != loading.item_seed(1, 1, 5) != loading.item_seed(1, 0, 6)


def test_a_batchs_item_seeds_are_computed_at_once_with_the_same_values():
    rng = np.random.default_rng(0)
    for seed in (0, 7, 2**32 - 1, 2**40):  # the last: more than one 32-bit word, through SeedSequence itself
        epochs, rows = rng.integers(0, 100, 300), rng.integers(0, 2**31, 300)
        want = [loading.item_seed(seed, int(e), int(r)) for e, r in zip(epochs, rows)]
        assert loading.item_seeds(seed, epochs, rows).tolist() == want


def test_an_epoch_draws_its_order_once(folder, monkeypatch):
    calls = []
    original = loading.epoch_order
    monkeypatch.setattr(loading, "epoch_order", lambda *a: calls.append(a) or original(*a))
    b = batcher(folder, 0)
    assert len(list(b.epoch(0))) == len(b) > 1 and len(calls) == 1  # not once per batch (ms at a million rows)
    b.batch(1, 0), b.batch(1, 1)
    assert len(calls) == 2


def test_workers_fork_only_when_no_other_thread_could_hold_a_lock(folder):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    assert loading.start_method("spawn") == "spawn"
    with ThreadPoolExecutor(1) as pool:  # a loader made in a pool thread, or beside one, is never forked
        assert pool.submit(loading.start_method).result() == "spawn"
        assert loading.start_method() == "spawn"
    if threading.active_count() == 1 and not torch.cuda.is_initialized():
        assert loading.start_method() == "fork"
    ref = epochs(batcher(folder, 0), 1)
    b = batcher(folder, 2)
    b.cfg.start_method = "spawn"
    assert same(epochs(b, 1), ref)
    with pytest.raises(Exception, match="data.start_method must be one of auto, fork, spawn"):
        DataConfig(start_method="thread").validate()


TRAIN = ["train-large", "--model", "test_resnet", "--epochs", "2", "--batch-size", "8", "--quiet",
         "--set", f"data.randaugment={RANDAUG}", "--set", "data.input_size=16", "--set", "data.hflip=true",
         "--set", "data.labeled_per_class=8"]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_teacher_weights_are_the_same_for_0_1_and_3_workers(folder, tmp_path):
    for workers in (0, 1, 3):
        cli(*TRAIN, "--data", f"folder:{folder}", "--set", f"data.num_workers={workers}", "--out", tmp_path / str(workers))
    for workers in (1, 3):
        assert_same_weights(tmp_path / "0" / "teacher.pt", tmp_path / str(workers) / "teacher.pt")


@pytest.fixture(scope="module")
def folder_targets(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder-teacher")
    cli(*TRAIN, "--data", f"folder:{folder}", "--epochs", "1", "--out", out / "t")
    cli("precompute", "--teacher", out / "t" / "teacher.pt", "--out", out / "targets.h5", "--dtype", "float32",
        "--quiet")
    return out / "targets.h5"


@pytest.fixture
def one_thread(monkeypatch):
    """One thread here and in the child process: the same arithmetic in both, so the weights compare exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def test_distill_killed_mid_epoch_resumes_to_the_same_student(folder_targets, one_thread, tmp_path):
    """3 workers, SIGKILL after the first periodic checkpoint (step 5: inside the second epoch of the labeled
    stream), then --resume: the student equals an uninterrupted run's with no workers."""
    args = ["distill", "--targets", folder_targets, "--steps", "14", "--quiet", "--set", "distill.batch_size=8",
            "--set", "distill.unlabeled_batch_size=16", "--set", "distill.checkpoint_every=5",
            "--set", "distill.eval_every=7", "--set", f"data.randaugment={RANDAUG}", "--set", "data.hflip=true"]
    cli(*args, "--set", "data.num_workers=0", "--out", tmp_path / "ref")
    cut = tmp_path / "cut"
    proc = cli_subprocess(*args, "--set", "data.num_workers=3", "--out", cut)
    deadline = time.monotonic() + 300
    while not (cut / "last.pt").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (cut / "student.pt").exists(), "killed right after the first checkpoint, yet the run finished"
    cli(*args, "--set", "data.num_workers=3", "--out", cut, "--resume")
    assert_same_weights(tmp_path / "ref" / "student.pt", cut / "student.pt")
