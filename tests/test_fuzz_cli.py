"""Fuzzing the settings and the command line (hypothesis), as a hostile but ordinary user would type them.

Random ``--set`` keys and values for every section (valid keys with values of any type, misspelt and nested
keys, numbers out of range, NaN, long strings, nested mappings, anchors and aliases, YAML tags) and random
pipeline files (the same values inside a document, aliases across sections). Every outcome is exit 0, or exit 2
with one ``error:`` line of at most :data:`~reducedmpl.errors.MESSAGE_MAX_BYTES` bytes on stderr and no
traceback, within a few seconds. The commands checked are ones that only resolve settings (``run --dry-run``, and
stage commands whose input is missing, which resolve their settings first), so no example trains anything.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli
from reducedmpl.errors import MESSAGE_MAX_BYTES
from test_properties import LEAVES

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
SECONDS = 5.0
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # long generated values
PIPELINE = """name: fuzz
data: {source: digits, labeled_per_class: 10}
train_large: {model: test_resnet, epochs: 1}
distill: {student: test_resnet, steps: 2}
compare: {runs: [{name: kd, mode: kd}]}
"""
TAGS = ["!!python/object/apply:os.system", "!!python/name:os.system", "!!python/tuple", "!!binary", "!!set",
        "!!timestamp", "!!float", "!!int", "!!str", "!!bool", "!!null", "!!map", "!!seq", "!!omap", "!!pairs",
        "!custom", "!<tag:example.com,2000:x>"]
ALIASED = ["&a [*a]", "&a {b: *a}", "[&a x, *a, *a]", "{x: &a [1, 2], y: *a}", "[&a " + "z" * 2000 + ", *a, *a]",
           "[" + ", ".join([f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" if i else "&a0 [x, x, x, x, x, x, x, x, x]"
                            for i in range(7)]) + "]"]

nested = st.recursive(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=20)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)
long_text = st.builds(lambda piece, n: piece * n, st.sampled_from(["x", "é", "a b ", "{", "&a ", "[", "'", "\\"]),
                      st.integers(1, 150_000))
values = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.floats().map(repr),
    st.sampled_from(["true", "false", "null", "~", "[]", "{}", "''", "-1", "0", "1e400", "-.inf", ".nan", "0x10"]),
    st.text(max_size=60),
    long_text,
    nested.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
    st.builds(lambda tag, v: f"{tag} {v}", st.sampled_from(TAGS),
              st.sampled_from(["x", "[x]", "{a: 1}", "2001-12-14", "aGVsbG8=", "1", "[[a, 1]]", ""])),
    st.sampled_from(ALIASED),
)
valid_keys = st.sampled_from(sorted(f"{section}.{key}" for section, leaves in LEAVES.items() for key in leaves)
                             + [f"data.{k}" for k in LEAVES["train_large"] if k.startswith("data.")] + ["name"])
keys = st.one_of(valid_keys, valid_keys.map(lambda k: k + "x"), valid_keys.map(lambda k: k + ".deeper"),
                 st.text(min_size=1, max_size=30).filter(lambda k: "=" not in k), long_text.map(lambda t: "k" + t))
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, values), min_size=1, max_size=3)


def assert_clean(result, seconds: float) -> None:
    """Exit 0, or exit 2 with one short error line and no traceback; quickly."""
    err = result.stderr.strip()
    why = (result.exit_code, err[:2000], repr(result.exception)[:2000])
    assert result.exit_code in (0, 2), why
    assert "Traceback" not in result.stdout + result.stderr and "Exception ignored" not in result.stderr, why
    if result.exit_code == 2:
        assert err.startswith("error: ") and len(err.splitlines()) == 1, why
        assert len(err.encode()) <= MESSAGE_MAX_BYTES, why
    assert seconds < SECONDS, (seconds, why)


def timed_cli(*args):
    t0 = time.perf_counter()
    result = cli(*args, check=False)
    return result, time.perf_counter() - t0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_text(PIPELINE)
    cli("run", path, "--dry-run", "--out-root", path.parent / "runs")  # imports and first-use costs, once
    return path


@FUZZ
@given(sets=overrides)
def test_random_overrides_of_a_pipeline(pipeline, sets):
    args = [a for item in sets for a in ("--set", item)]
    assert_clean(*timed_cli("run", pipeline, "--dry-run", "--out-root", pipeline.parent / "runs", *args))


@FUZZ
@given(sets=overrides, command=st.sampled_from(["train-large", "distill"]))
def test_random_overrides_of_a_stage_command(pipeline, sets, command):
    missing = pipeline.parent / "missing"
    args = [a for item in sets for a in ("--set", item)]
    first = ["train-large", "--data", f"npz:{missing}.npz"] if command == "train-large" else \
        ["distill", "--targets", f"{missing}.h5"]
    result, seconds = timed_cli(*first, *args, "--out", pipeline.parent / "out")
    assert_clean(result, seconds)
    assert result.exit_code == 2  # the input is missing: refused, after the settings, never run


# Each command with an input that does not exist, given last (so it wins over a random one): a random command line
# is refused, or prints help, and never starts a run
GUARDED = {"train-large": ["--data", "npz:{m}.npz"], "distill": ["--targets", "{m}.h5"], "precompute": ["--teacher", "{m}.pt"],
           "export": ["--format", "onnx"], "inspect": [], "run": [], "report": []}
POSITIONAL = {"export": "{m}.pt", "inspect": "{m}.pt", "run": "{m}.yaml", "report": "{m}"}


def options_of(command: str) -> list[str]:
    import typer

    from reducedmpl.cli import app

    group = typer.main.get_command(app)
    return sorted(o for p in group.commands[command].params for o in getattr(p, "opts", []) if o.startswith("-"))


@st.composite
def command_lines(draw) -> tuple[str, list[str]]:
    command = draw(st.sampled_from(sorted(GUARDED)))
    token = st.one_of(st.sampled_from(options_of(command)), st.sampled_from(["--", "-", "-x", "--no-such", "=", ""]),
                      st.integers(-10**20, 10**20).map(str), st.floats().map(repr), st.text(max_size=20), long_text)
    return command, draw(st.lists(token, max_size=6))


@settings(FUZZ, max_examples=80)
@given(line=command_lines())
def test_random_command_lines(pipeline, line):
    command, tokens = line
    m = str(pipeline.parent / "missing")
    args = [command, *([POSITIONAL[command].format(m=m)] if command in POSITIONAL else []), *tokens,
            *(a.format(m=m) for a in GUARDED[command])]
    result, seconds = timed_cli(*args)
    assert_clean(result, seconds)


sections = st.sampled_from(["name", "data", "train_large", "precompute", "distill", "compare", "unknown_section"])


@st.composite
def documents(draw) -> str:
    """A pipeline text: a few sections, each a raw YAML value or a mapping of keys to raw values (so tags and
    aliases appear anywhere), sometimes an anchor in one section used by another."""
    lines = []
    for section in draw(st.lists(sections, min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            lines.append(f"{section}: {draw(values)}")
        else:
            items = draw(st.lists(st.tuples(st.sampled_from(sorted({k.split('.')[-1] for k in LEAVES['distill']})
                                                              + ["source", "runs", "x"]), values), max_size=3))
            lines.append(f"{section}:" + ("".join(f"\n  {k}: {v}" for k, v in items) if items else " {}"))
    if draw(st.booleans()):
        lines.insert(0, f"shared: &s {draw(values)}")
        lines.append(f"{draw(sections)}: *s")
    return "\n".join(lines) + "\n"  # a value with a line break may break the document: also a user's input


@FUZZ
@given(doc=documents())
def test_random_pipeline_files(pipeline, doc):
    path = pipeline.parent / "doc.yaml"
    path.write_text(doc)
    assert_clean(*timed_cli("run", path, "--dry-run", "--out-root", pipeline.parent / "runs"))
