"""``hf:ORG/NAME`` and ``hf:NAME``: a Hugging Face Hub dataset read offline from the local caches, each written here
in the library's own layout: the hub's file cache (``hf download ORG/NAME --repo-type dataset``) and the
``datasets`` arrow cache (a former ``datasets.load_dataset``)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")

from hf_wds_data import encoded, pixels, write_hub_dataset, write_prepared_dataset  # noqa: E402
from reducedmpl.config import DataConfig  # noqa: E402
from reducedmpl.data.sources import load_source  # noqa: E402
from reducedmpl.errors import DataError  # noqa: E402

CLASS_NAMES = ["class0", "class1", "class2"]


@pytest.fixture
def caches(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Empty hub and datasets caches, named by the environment as a user's shell would."""
    hub, prepared = tmp_path / "hub", tmp_path / "datasets"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(prepared))
    return hub, prepared


def digest(spec: str, options: DataConfig | None = None) -> str:
    src = load_source(spec, options)
    return src.content_digest(np.arange(len(src)))


def check_rows(src, n: int = 60, test: int = 12) -> None:
    assert src.kind == "hf" and len(src) == n and src.class_names == CLASS_NAMES
    images, labels = pixels(n)
    np.testing.assert_array_equal(src.labels, labels)  # train rows, then test rows
    np.testing.assert_array_equal(src.official_test, np.arange(n) >= n - test)
    np.testing.assert_array_equal(np.stack([np.asarray(src.pil_image(i)) for i in range(n)]), np.stack(images))


def test_a_downloaded_repository_in_the_hub_cache(caches, tmp_path, monkeypatch):
    hub, prepared = caches
    write_hub_dataset(hub, "acme/tiny")
    spec = "hf:acme/tiny"
    check_rows(load_source(spec))
    before = digest(spec)
    assert digest(spec, DataConfig(source=spec, hf_config="plain")) == before  # its one configuration, named
    assert digest(spec) == before  # read again (now from the arrow files converted the first time)
    # the same files in another cache, written at another time, converted afresh: the same fingerprints (the hub
    # names its blobs by their content)
    monkeypatch.setenv("HF_HUB_CACHE", str(shutil.copytree(hub, tmp_path / "hub2", symlinks=True)))
    for blob in (tmp_path / "hub2").glob("datasets--acme--tiny/blobs/*"):
        os.utime(blob, (1_000_000_000, 1_000_000_000))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets2"))
    assert digest(spec) == before
    # a new revision whose images are re-encoded: other fingerprints
    write_hub_dataset(tmp_path / "hub2", "acme/tiny", revision="1" * 40,
                      images=[encoded(x, "JPEG") for x in pixels(60)[0]])
    assert digest(spec) != before


def test_a_dataset_prepared_by_load_dataset_in_the_datasets_cache(caches):
    hub, prepared = caches
    write_prepared_dataset(prepared, "acme/tiny")
    assert not hub.exists()  # only the arrow files: what datasets itself reads offline
    spec = "hf:acme/tiny"
    check_rows(load_source(spec))
    assert digest(spec) == digest(spec, DataConfig(source=spec, hf_config="plain"))


def test_a_bare_name(caches):
    hub, prepared = caches
    write_hub_dataset(hub, "tiny", n=30, test=6, config="default")
    check_rows(load_source("hf:tiny"), 30, 6)


def test_not_in_the_cache_and_a_configuration_it_lacks(caches):
    hub, prepared = caches
    with pytest.raises(DataError, match=r"acme/tiny is not in the local Hugging Face caches .*offline.*"
                                        r"hf download acme/tiny --repo-type dataset"):
        load_source("hf:acme/tiny")
    write_prepared_dataset(prepared, "acme/tiny")
    spec = "hf:acme/tiny"
    with pytest.raises(DataError, match=r"no configuration 'other' in the local cache \(configurations: plain\)"):
        load_source(spec, DataConfig(source=spec, hf_config="other"))
    write_prepared_dataset(prepared, "acme/tiny", config="second")
    with pytest.raises(DataError, match=r"several configurations in the local cache \(plain, second\).*hf_config"):
        load_source(spec)
    write_hub_dataset(hub, "acme/tiny", config="third")
    with pytest.raises(DataError, match=r"no configuration 'other' .*\(configurations: plain, second, third\)"):
        load_source(spec, DataConfig(source=spec, hf_config="other"))
    # the configuration the arrow cache lacks comes from the hub cache
    assert len(load_source(spec, DataConfig(source=spec, hf_config="third"))) == 60


def test_both_caches_give_the_fingerprints_of_the_hub_files(caches, tmp_path, monkeypatch):
    """An online load_dataset leaves the repository's files in the hub cache and their arrow conversion in the
    datasets cache: the arrow files are read (nothing is converted again), fingerprinted as the hub files are."""
    hub, prepared = caches
    write_hub_dataset(hub, "acme/tiny")
    only_hub = digest("hf:acme/tiny")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets2"))
    arrow = write_prepared_dataset(tmp_path / "datasets2", "acme/tiny")
    src = load_source("hf:acme/tiny")
    check_rows(src)
    assert {Path(f["filename"]).parent for ds in src.reader.parts for f in ds.cache_files} == {arrow}
    assert src.content_digest(np.arange(len(src))) == only_hub
    # arrow files prepared from another revision than the hub cache's: their own fingerprints
    shutil.rmtree(hub)
    write_hub_dataset(hub, "acme/tiny", revision="0" * 40)
    assert digest("hf:acme/tiny") != only_hub


def test_three_stages_on_a_downloaded_repository(caches, tmp_path):
    from test_hf_wds import three_stages

    hub, prepared = caches
    write_hub_dataset(hub, "acme/tiny", n=36, test=6)
    out = three_stages("hf:acme/tiny", tmp_path, "--set", "data.use_official_test=true")
    art = torch.load(out / "t" / "teacher.pt", weights_only=True)
    assert art["class_names"] == CLASS_NAMES and art["data"]["source"] == "hf:acme/tiny"


def test_a_downloaded_repository_of_several_configurations(caches):
    hub, prepared = caches
    write_hub_dataset(hub, "acme/two", config="a")
    snapshot = write_hub_dataset(hub, "acme/two", n=30, test=6, config="b")
    (snapshot / "README.md").unlink()  # a README that declares both
    (snapshot / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n  - split: test\n"
        f"    path: {c}/test-*\n" for c in "ab") + "---\n")
    spec = "hf:acme/two"
    with pytest.raises(DataError, match=r"several configurations in the local cache \(a, b\).*set data.hf_config"):
        load_source(spec)
    check_rows(load_source(spec, DataConfig(source=spec, hf_config="b")), 30, 6)
