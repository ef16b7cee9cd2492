import dataclasses

import numpy as np
import pytest
import torch

from reducedmpl.config import DataConfig
from reducedmpl.data.loading import Batcher, BatchStream, default_preprocess
from reducedmpl.data.sources import load_source
from reducedmpl.data.splits import make_splits
from reducedmpl.errors import DataError


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def test_splits_are_deterministic_disjoint_and_complete(digits):
    cfg = DataConfig(labeled_per_class=10, split_seed=1)
    a, b = make_splits(digits, cfg), make_splits(digits, cfg)
    for k in a.indices:
        assert np.array_equal(a.indices[k], b.indices[k])
    assert a.fingerprints == b.fingerprints
    allrows = np.concatenate(list(a.indices.values()))
    assert len(allrows) == len(np.unique(allrows)) == len(digits)
    assert np.bincount(digits.labels[a.indices["labeled"]]).tolist() == [10] * 10
    assert a.sizes()["test"] == round(0.2 * len(digits)) and a.sizes()["val"] == round(0.1 * len(digits))


def test_split_seed_and_content_change_fingerprints(digits):
    a = make_splits(digits, DataConfig(split_seed=0))
    b = make_splits(digits, DataConfig(split_seed=1))
    assert a.fingerprints["test"] != b.fingerprints["test"]
    digits2 = load_source("digits")
    digits2.images = digits2.images.copy()
    digits2.images[a.indices["val"][0], 0, 0, 0] ^= 1
    c = make_splits(digits2, DataConfig(split_seed=0))
    assert c.fingerprints["val"] != a.fingerprints["val"] and c.fingerprints["test"] == a.fingerprints["test"]


def test_labeled_fraction_and_counts(digits):
    s = make_splits(digits, DataConfig(labeled_fraction=0.5, val_size=100, test_size=200))
    assert s.sizes()["val"] == 100 and s.sizes()["test"] == 200
    train = s.sizes()["labeled"] + s.sizes()["unlabeled"]
    assert abs(s.sizes()["labeled"] - train / 2) < 12


def test_too_many_labels_per_class_is_a_data_error(digits):
    with pytest.raises(DataError, match="labeled examples per class"):
        make_splits(digits, DataConfig(labeled_per_class=1000))
    with pytest.raises(DataError, match="no training examples"):
        make_splits(digits, DataConfig(val_size=0.6, test_size=0.5))


def test_batches_are_reproducible_and_augmented(digits):
    cfg = DataConfig(crop_padding=2, input_size=12)
    rows = make_splits(digits, cfg).indices["labeled"]
    prep = default_preprocess(digits, rows, cfg)
    bt = Batcher(digits, rows, prep, cfg, batch_size=32, train=True, seed=0, drop_last=True)
    x1, y1, i1 = bt.batch(3, 5)
    x2, y2, i2 = bt.batch(3, 5)
    assert x1.shape == (32, 1, 12, 12) and torch.equal(x1, x2) and torch.equal(i1, i2)
    assert torch.equal(y1, torch.from_numpy(digits.labels[i1.numpy()]))
    x3, _, i3 = bt.batch(4, 5)
    assert not torch.equal(i1, i3)  # another epoch, another order
    ev = Batcher(digits, rows, prep, cfg, batch_size=32, train=False, seed=0)
    xe = torch.cat([b[0] for b in ev.epoch(0)])
    assert abs(xe.mean().item()) < 0.05 and 0.7 < xe.std().item() < 1.3  # normalised with train stats
    assert len(ev) == -(-len(rows) // 32) and len(bt) == len(rows) // 32


def test_stream_resumes_at_the_same_batch(digits):
    cfg = DataConfig()
    rows = make_splits(digits, cfg).indices["labeled"]
    prep = default_preprocess(digits, rows, cfg)
    bt = Batcher(digits, rows, prep, cfg, batch_size=100, train=True, seed=2, drop_last=True)
    s = BatchStream(bt)
    seen = [s.next()[2] for _ in range(len(bt) + 3)]  # crosses an epoch boundary
    s2 = BatchStream(bt)
    for _ in range(len(bt) - 1):
        s2.next()
    s3 = BatchStream(bt)
    s3.load_state_dict(s2.state_dict())
    rest = [s3.next()[2] for _ in range(4)]
    for a, b in zip(seen[len(bt) - 1:], rest):
        assert torch.equal(a, b)


def test_randaugment_batches_are_deterministic_and_augmented(digits):
    """RandAugment (the only augmentation here) changes most images of a batch, the same way each time the batch is
    made; rand-m0-n2 (magnitude 0) changes fewer pixels than rand-m9-n2."""
    plain = DataConfig(crop_padding=0, hflip=False)
    rows = make_splits(digits, plain).indices["labeled"][:64]
    prep = default_preprocess(digits, rows, plain)

    def batch(cfg):
        x, _, ids = Batcher(digits, rows, prep, cfg, batch_size=32, train=True, seed=0).batch(0, 1)
        return x, ids

    x0, ids0 = batch(plain)
    x9, ids9 = batch(dataclasses.replace(plain, randaugment="rand-m9-n2"))
    assert torch.equal(ids0, ids9) and torch.equal(x9, batch(dataclasses.replace(plain, randaugment="rand-m9-n2"))[0])
    changed = (x9 - x0).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.5, changed  # some images draw two geometric ops of magnitude 0, or Identity
    x_m0 = batch(dataclasses.replace(plain, randaugment="rand-m0-n2"))[0]
    assert (x_m0 - x0).abs().mean() < (x9 - x0).abs().mean()
