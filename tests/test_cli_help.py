"""--help of every command: pure flags show no value type."""
import pytest

from conftest import cli

COMMANDS = ["train-large", "precompute", "distill", "inspect", "export", "run", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_type_after_pure_flags(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    out = cli(command, "--help").stdout
    assert "<bool>" not in out and "--help" in out
    assert "<int>" in out or "<path>" in out or "<str>" in out  # options that take a value keep their type


def test_flags_still_parse_as_flags(tmp_path):
    r = cli("distill", "--targets", tmp_path / "none.h5", "--resume", "--quiet", check=False)
    assert r.exit_code == 2 and "does not exist" in r.stderr  # --resume took no value; the store is missing
