"""The Python API: the README's example runs as written, and the functions raise the tool's errors."""
import re

import pytest
import torch

from conftest import REPO


def readme_api_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_readme_api_example_runs_as_written(tmp_path, monkeypatch, capsys, one_thread):
    blocks = readme_api_blocks()
    assert len(blocks) == 2 and "from reducedmpl import train_large, precompute, distill, run" in blocks[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md (API example)", "exec"), scope)
    out = capsys.readouterr().out
    assert "teacher test accuracy" in out and "refused:" in out and "is a teacher artifact" in out
    for mode in ("kd", "reducedmpl"):
        assert (tmp_path / "runs" / "nb" / mode / "student.pt").exists()
    assert scope["targets"].artifact.resolve() == (tmp_path / "runs" / "nb" / "large" / "targets.h5").resolve()
    assert scope["targets"].metrics["rows_per_split"]["labeled"] == 100
    assert not (tmp_path / "runs" / "nb" / "oops" / "student.pt").exists()

    exec(compile(blocks[1], "README.md (API run example)", "exec"), scope)
    result = scope["result"]
    assert [r["run"] for r in result.comparison] == ["kd", "mpl"] and result.report.exists()
    assert result.teacher["cost"]["params"] == result.comparison[0]["cost"]["params"]
    assert result.artifact("distill-kd-0").exists() and result.artifact("large").name == "teacher.pt"


def test_api_takes_config_objects_and_raises_instead_of_exiting(tiny_targets, tmp_path):
    from reducedmpl import distill, train_large
    from reducedmpl.config import DistillConfig
    from reducedmpl.errors import ConfigError, UserError

    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        train_large({"epoch": 3})
    with pytest.raises(ConfigError, match="must be a TrainLargeConfig, a dict or a YAML path"):
        train_large(42)
    cfg = DistillConfig(student="test_resnet", mode="supervised", steps=3, batch_size=16, eval_every=3, probe_size=0)
    result = distill(cfg, targets=tiny_targets, out=tmp_path / "d", quiet=True)
    assert result.artifact == tmp_path / "d" / "student.pt" and result.artifact.exists()
    assert 0 <= result.metrics["test_acc"] <= 1 and result.metrics["steps"] == 3
    with pytest.raises(UserError, match="already"):  # a finished run is not silently replaced
        distill(cfg, targets=tiny_targets, out=tmp_path / "d", quiet=True)


def test_import_stays_light():
    import subprocess
    import sys

    code = "import sys, reducedmpl; assert 'torch' not in sys.modules and 'reducedmpl.api' not in sys.modules; " \
           "from reducedmpl import run; assert 'reducedmpl.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
