"""``hf:`` (Hugging Face datasets) and ``wds:`` (WebDataset tar shards) sources: tiny real files in each format,
loaded row by row, split and fingerprinted deterministically, the same batches for 0 and 1 workers, views
rebuilt bit for bit, and all three stages run on them through the CLI."""
from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("datasets")
pytest.importorskip("webdataset")

from conftest import cli  # noqa: E402
from hf_wds_data import (CLASSES, encoded, pixels, wds_spec, write_hf_disk, write_hf_parquet,  # noqa: E402
                         write_wds)
from reducedmpl.config import DataConfig  # noqa: E402
from reducedmpl.data.loading import Batcher, default_preprocess  # noqa: E402
from reducedmpl.data.sources import load_source, spec_problem  # noqa: E402
from reducedmpl.data.splits import make_splits  # noqa: E402
from reducedmpl.data.views import ViewMaker, make_policy  # noqa: E402
from reducedmpl.errors import ConfigError, DataError  # noqa: E402


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    return write_hf_parquet(tmp_path_factory.mktemp("hf") / "parquet")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_wds(tmp_path_factory.mktemp("wds") / "shards")


def rows_of(source) -> np.ndarray:
    return np.stack([np.asarray(source.pil_image(i)) for i in range(len(source))])


# ---------------------------------------------------------------------------------------------- hf:
def test_hf_parquet_folder(parquet):
    src = load_source(f"hf:{parquet}")
    images, labels = pixels(60)
    assert src.kind == "hf" and len(src) == 60 and src.class_names == ["class0", "class1", "class2"]
    assert src.images is None and src.files is None and src.in_chans == 3
    np.testing.assert_array_equal(src.labels, labels)  # train rows, then test rows
    np.testing.assert_array_equal(src.official_test, np.arange(60) >= 48)
    np.testing.assert_array_equal(rows_of(src), np.stack(images))  # PNG round-trips exactly
    assert src.load_image(5).shape == (16, 16, 3)
    # the official test split is the dataset's own; another load gives the same splits and fingerprints
    cfg = DataConfig(source=f"hf:{parquet}", use_official_test=True, val_size=6)
    a, b = make_splits(src, cfg), make_splits(load_source(cfg.source, cfg), cfg)
    np.testing.assert_array_equal(a.indices["test"], np.arange(48, 60))
    assert a.fingerprints == b.fingerprints


def test_hf_save_to_disk_named_columns_and_splits(tmp_path):
    root = write_hf_disk(tmp_path / "disk", image="picture", label="target", extra_image=True)
    spec = f"hf:{root}"
    with pytest.raises(DataError, match="has 2 .*Image.* column.*set data.image_column"):
        load_source(spec)
    cfg = DataConfig(source=spec, image_column="picture")
    src = load_source(spec, cfg)
    assert len(src) == 60 and src.class_names == ["class0", "class1", "class2"]
    np.testing.assert_array_equal(src.official_test, np.arange(60) >= 48)  # validation: the official test
    np.testing.assert_array_equal(rows_of(src), np.stack(pixels(60)[0]))
    only = load_source(spec, DataConfig(source=spec, image_column="picture", hf_splits=["validation"]))
    assert len(only) == 12 and only.official_test is None
    np.testing.assert_array_equal(only.labels, src.labels[48:])
    thumbs = load_source(spec, DataConfig(source=spec, image_column="thumb", label_column="target",
                                          hf_splits=["train"]))
    assert thumbs.pil_image(0).size == (4, 4)
    with pytest.raises(DataError, match="no split 'test'.*set data.hf_splits"):
        load_source(spec, DataConfig(source=spec, image_column="picture", hf_splits=["test"]))
    with pytest.raises(DataError, match="hf_test_split 'train' is not among"):
        load_source(spec, DataConfig(source=spec, image_column="picture", hf_splits=["validation"],
                                     hf_test_split="train"))


def test_hf_integer_and_string_label_columns(tmp_path):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    images = [{"bytes": encoded(x), "path": None} for x in pixels(6)[0]]
    names = ["dog", "cat", "eel", "cat", "dog", "dog"]
    ds = Dataset.from_dict({"img": images, "name": names, "k": [3, 0, 1, 0, 3, 3]},
                           features=Features({"img": ImageFeature(), "name": Value("string"), "k": Value("int64")}))
    ds.save_to_disk(str(tmp_path / "d"))
    spec = f"hf:{tmp_path / 'd'}"
    by_name = load_source(spec, DataConfig(source=spec, label_column="name"))
    assert by_name.class_names == ["cat", "dog", "eel"] and by_name.labels.tolist() == [1, 0, 2, 0, 1, 1]
    by_index = load_source(spec, DataConfig(source=spec, label_column="k"))
    assert by_index.class_names == ["0", "1", "2", "3"] and by_index.labels.tolist() == [3, 0, 1, 0, 3, 3]
    with pytest.raises(DataError, match="no ClassLabel column for the labels .*set data.label_column"):
        load_source(spec)
    with pytest.raises(DataError, match="column 'name' of .* is .*not an Image feature"):
        load_source(spec, DataConfig(source=spec, image_column="name", label_column="k"))


def test_hf_fingerprint_changes_with_the_data(tmp_path):
    root = write_hf_parquet(tmp_path / "pq")
    src = load_source(f"hf:{root}")
    before = src.content_digest(np.arange(len(src)))
    again = load_source(f"hf:{root}")
    assert again.content_digest(np.arange(len(again))) == before
    write_hf_parquet(root, images=[encoded(x, "JPEG") for x in pixels(60)[0]])  # the same rows, re-encoded
    changed = load_source(f"hf:{root}")
    assert changed.content_digest(np.arange(len(changed))) != before


def test_hf_reader_pickles_small_and_reads_in_another_process_s_copy(parquet):
    src = load_source(f"hf:{parquet}")
    blob = pickle.dumps(src)
    assert len(blob) < 20_000  # the arrow files travel by path, not by content
    np.testing.assert_array_equal(np.asarray(pickle.loads(blob).pil_image(7)), np.asarray(src.pil_image(7)))


# ---------------------------------------------------------------------------------------------- wds:
def test_wds_shards(shards):
    spec = wds_spec(shards)
    src = load_source(spec)
    images, labels = pixels(60)
    assert src.kind == "wds" and len(src) == 60 and src.class_names == ["0", "1", "2"]
    assert src.official_test is None and src.images is None and src.files is None
    np.testing.assert_array_equal(src.labels, labels)  # shard order, then order within the shard
    decoded = rows_of(src)
    png = [i for i in range(60) if i % 4 != 3]
    np.testing.assert_array_equal(decoded[png], np.stack(images)[png])  # PNG exactly
    jpeg = np.asarray(Image.open(io.BytesIO(encoded(images[3], "JPEG"))).convert("RGB"))
    np.testing.assert_array_equal(decoded[3], jpeg)  # the JPEG member's own bytes, decoded
    assert src.reader.row_key(0).endswith(b"sample00000")
    digest = src.content_digest(np.arange(60))
    # a folder of shards and a glob name the same shards, in the same order
    for other in (f"wds:{shards}", f"wds:{shards}/shard-*.tar"):
        assert load_source(other).content_digest(np.arange(60)) == digest
    # a copy elsewhere is the same data; a shard rewritten with other samples is not
    copy = shutil.copytree(shards, shards.parent / "copy")
    assert load_source(wds_spec(copy)).content_digest(np.arange(60)) == digest
    write_wds(copy, seed=1)
    assert load_source(wds_spec(copy)).content_digest(np.arange(60)) != digest


def test_wds_refusals(tmp_path, shards):
    with pytest.raises(DataError, match="matches no shard file"):
        load_source(f"wds:{tmp_path}/nothing-{{0..3}}.tar")
    assert "matches no shard file" in spec_problem(f"wds:{tmp_path}/nothing-{{0..3}}.tar")
    assert spec_problem(wds_spec(shards)) is None
    with pytest.raises(DataError, match="shard-000003.tar does not exist .1 of the 4"):
        load_source(wds_spec(shards, 4))
    bad = write_wds(tmp_path / "nocls", shards=1, drop_cls="sample00004")
    with pytest.raises(DataError, match="sample 'sample00004' in .* has no 'cls' field"):
        load_source(wds_spec(bad, 1))
    twice = tmp_path / "twice"
    twice.mkdir()
    shutil.copy(shards / "shard-000000.tar", twice / "shard-000000.tar")
    shutil.copy(shards / "shard-000000.tar", twice / "shard-000001.tar")
    with pytest.raises(DataError, match="sample key 'sample00000' is in .* and in .*unique key"):
        load_source(wds_spec(twice, 2))
    cut = tmp_path / "cut"
    cut.mkdir()
    data = (shards / "shard-000000.tar").read_bytes()
    (cut / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="shard .* (is truncated|cannot read)|cannot read shard"):
        load_source(wds_spec(cut, 1))


def test_settings_of_one_kind_are_refused_for_another():
    with pytest.raises(ConfigError, match="data.hf_splits applies to hf: sources"):
        DataConfig(source="digits", hf_splits=["train"]).validate()
    with pytest.raises(ConfigError, match="data.image_column applies to hf: and wds: sources"):
        DataConfig(source="folder:/x", image_column="img").validate()
    DataConfig(source="wds:/x/{0..1}.tar", image_column="webp", label_column="label").validate()


# ---------------------------------------------------------------------------------------------- loading, views
def batches(source, workers: int) -> list:
    cfg = DataConfig(source=source.spec, randaugment="rand-m9-n2", num_workers=workers, input_size=16, hflip=True)
    rows = np.arange(len(source))
    b = Batcher(source, rows, default_preprocess(source, rows, cfg), cfg, batch_size=16, train=True, seed=3)
    return [batch for epoch in range(2) for batch in b.epoch(epoch)]


@pytest.mark.parametrize("kind", ["hf", "wds"])
def test_batches_are_the_same_for_0_and_1_workers(kind, parquet, shards):
    source = load_source(f"hf:{parquet}" if kind == "hf" else wds_spec(shards))
    ref, other = batches(source, 0), batches(source, 1)
    assert len(ref) == len(other) == 8
    for x, y in zip(ref, other):
        assert all(torch.equal(a, b) for a, b in zip(x, y))
    assert not torch.equal(ref[0][0], ref[4][0])  # the epochs differ: the augmentation is live


@pytest.mark.parametrize("kind", ["hf", "wds"])
def test_views_are_rebuilt_bit_for_bit_from_a_fresh_load(kind, parquet, shards):
    spec = f"hf:{parquet}" if kind == "hf" else wds_spec(shards)
    cfg = DataConfig(source=spec, randaugment="rand-m9-n2", input_size=16, hflip=True)
    first, second = load_source(spec, cfg), pickle.loads(pickle.dumps(load_source(spec, cfg)))
    rows = np.arange(len(first))
    prep = default_preprocess(first, rows, cfg)
    policy = make_policy(3, 7, cfg, prep, first)
    ids, views = np.array([5, 9, 5, 40, 59]), np.array([1, 2, 2, 0, 1])
    a = ViewMaker(first, prep, policy).inputs(ids, views)
    b = ViewMaker(second, prep, policy).inputs(ids[::-1].copy(), views[::-1].copy())
    assert torch.equal(a, b.flip(0))
    assert not torch.equal(a[1], a[2])  # two views of one row differ


# ---------------------------------------------------------------------------------------------- the three stages
STAGE_SETTINGS = ["--set", "data.input_size=16", "--set", "data.labeled_per_class=6", "--set", "data.val_size=6"]


def three_stages(spec: str, out: Path, *extra: str) -> Path:
    cli("train-large", "--data", spec, "--model", "test_resnet", "--epochs", "1", "--batch-size", "8", "--quiet",
        "--device", "cpu", *STAGE_SETTINGS, *extra, "--out", out / "t")
    cli("precompute", "--teacher", out / "t" / "teacher.pt", "--out", out / "targets.h5", "--views", "2",
        "--batch-size", "16", "--quiet", "--device", "cpu")
    cli("distill", "--targets", out / "targets.h5", "--student", "test_resnet", "--steps", "3", "--quiet",
        "--device", "cpu", "--set", "distill.batch_size=8", "--set", "distill.unlabeled_batch_size=8",
        "--set", "eval_every=3", "--out", out / "s")
    assert (out / "s" / "student.pt").is_file()
    return out


def test_three_stages_on_an_hf_parquet_folder(tmp_path):
    from reducedmpl.inspect import inspect_store

    root = write_hf_parquet(tmp_path / "pq", extra_image=True)  # two Image columns: data.image_column names one
    out = three_stages(f"hf:{root}", tmp_path, "--set", "data.use_official_test=true",
                       "--set", "data.image_column=image")
    art = torch.load(out / "t" / "teacher.pt", weights_only=True)
    assert art["class_names"] == [f"class{c}" for c in range(CLASSES)] and art["data"]["image_column"] == "image"
    report = inspect_store(out / "targets.h5")  # lists the data with the settings the store records
    assert report["data_checked"] and not report["problems"]
    write_hf_parquet(root, extra_image=True, images=[encoded(x, "JPEG") for x in pixels(60)[0]])  # rewritten
    r = cli("distill", "--targets", out / "targets.h5", "--student", "test_resnet", "--steps", "1", "--quiet",
            "--device", "cpu", "--out", out / "s2", check=False)
    assert r.exit_code == 2 and "was computed for other data" in r.stderr, r.stderr


def test_three_stages_on_wds_shards_and_a_changed_shard_is_refused(shards, tmp_path):
    copy = shutil.copytree(shards, tmp_path / "shards")
    out = three_stages(wds_spec(copy), tmp_path)
    # the shards rewritten after precompute: distill refuses the store, in one line
    write_wds(copy, seed=1)  # the same keys and labels, other images
    r = cli("distill", "--targets", out / "targets.h5", "--student", "test_resnet", "--steps", "1", "--quiet",
            "--device", "cpu", "--out", out / "s2", check=False)
    assert r.exit_code == 2 and "was computed for other data" in r.stderr, r.stderr
    assert not (out / "s2" / "student.pt").exists()


@pytest.mark.parametrize("kind", ["hf", "wds"])
def test_replay_is_the_teachers_own_input_bit_for_bit(kind, parquet, shards, tmp_path, monkeypatch):
    """distill replays each stored view as the very tensor the teacher ran on in precompute, decoded again from the
    row's own bytes."""
    from reducedmpl.config import stage_config
    from reducedmpl.data import views as views_mod
    from reducedmpl.data.setup import setup_data
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data

    spec = f"hf:{parquet}" if kind == "hf" else wds_spec(shards)
    cli("train-large", "--data", spec, "--model", "test_resnet", "--epochs", "1", "--batch-size", "16", "--quiet",
        "--device", "cpu", *STAGE_SETTINGS, "--set", "data.hflip=true", "--out", tmp_path / "t")
    seen, original = {}, views_mod.ViewMaker.inputs

    def recording(self, ids, views):
        x = original(self, ids, views)
        seen.update({(r, v): x[i].clone() for i, (r, v) in enumerate(zip(ids.tolist(), views.tolist()))})
        return x

    with monkeypatch.context() as m:
        m.setattr(views_mod.ViewMaker, "inputs", recording)
        cli("precompute", "--teacher", tmp_path / "t" / "teacher.pt", "--out", tmp_path / "targets.h5", "--views",
            "3", "--dtype", "float32", "--quiet", "--device", "cpu")
    cfg = stage_config("distill", flags={"mode": "kd", "steps": 2, "device": "cpu", "unlabeled_batch_size": 16})
    store = open_store(tmp_path / "targets.h5", 64)
    d = Distiller(cfg, setup_data(resolve_data(cfg, store)), store, torch.device("cpu"))
    checked = 0
    for _ in range(3):
        x, _, ids = d.unlabeled.next()
        for i, (r, v) in enumerate(zip(ids.tolist(), d.unlabeled.views(ids).tolist())):
            if v:
                assert torch.equal(x[i], seen[(r, v)]), (r, v)
                checked += 1
    assert checked >= 8


@pytest.mark.parametrize("fmt", ["USTAR", "GNU", "PAX"])
def test_tar_members_match_tarfile(fmt, tmp_path, shards):
    """The header-only listing of a shard finds the regular files tarfile finds, with their data offsets and sizes:
    long and non-ASCII names, ustar prefixes, GNU long names, pax records, folders and links among them."""
    import tarfile

    from reducedmpl.data.wds import tar_members

    path = tmp_path / "t.tar"
    names = ["a.cls", "x" * 95 + ".png", "deep/" * 30 + "s.jpg", "ünï/cödé.webp", "big.bin"]
    with tarfile.open(path, "w", format=getattr(tarfile, f"{fmt}_FORMAT")) as tar:
        for i, name in enumerate(names):
            data = bytes([i]) * (1 + 700 * i) if name != "big.bin" else bytes(70_000)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            folder = tarfile.TarInfo(f"dir{i}")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, names[1]
        tar.addfile(link)
    for archive in (path, shards / "shard-000000.tar"):
        with tarfile.open(archive) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        with open(archive, "rb") as f:
            assert [tuple(m) for m in tar_members(f, str(archive))] == expected
    assert [e[0] for e in expected][:1] == ["sample00000.cls"] and len(expected) == 40
    with pytest.raises(DataError, match="is not a tar file .no valid tar header at byte 0"):
        with open(tmp_path / "x.tar", "wb+") as f:
            f.write(b"no tar header here" * 64)
            f.flush()
            f.seek(0)
            list(tar_members(f, "x.tar"))
