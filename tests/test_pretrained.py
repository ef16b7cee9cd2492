"""Pretrained timm models by name, from a Hugging Face Hub cache the tests write (read offline), each model at its
own preprocessing; stored views as regions rendered at the teacher's and at the student's resolution."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import HUB_CACHE, HUB_REVISION, cli, write_hub_model
from reducedmpl.data import views as views_mod


def _file_sha(repo: str) -> str:
    org, name = repo.split("/")
    path = HUB_CACHE / f"models--{org}--{name}" / "snapshots" / HUB_REVISION / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    keys = [k for k in a if not k.startswith(skip)]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)


# ---------------------------------------------------------------------------------------------- the weights
def test_pretrained_weights_come_from_the_hub_cache(hub_cache) -> None:
    from reducedmpl.models import build_model, model_source

    for name in ("test_resnet.r160_in1k", "test_efficientnet.r160_in1k"):
        src = model_source(name, "pretrained")
        assert src.arch == name.split(".")[0]
        record = src.record()
        assert record["hub_id"] == f"timm/{name}" and record["revision"] == HUB_REVISION
        assert record["sha256"] == _file_sha(f"timm/{name}")
        assert src.pretrained_cfg["crop_pct"] == 0.95 and src.pretrained_cfg["input_size"][-1] == 160
        _same(build_model(src, 1000, 3).state_dict(), hub_cache[name])  # exactly the file's weights
        notes: list[str] = []
        model = build_model(src, 10, 3, note=notes.append)  # another class count: a new classifier
        classifier = src.pretrained_cfg["classifier"]
        _same(model.state_dict(), hub_cache[name], skip=(classifier,))
        assert model.state_dict()[f"{classifier}.weight"].shape[0] == 10
        assert notes == [f"note: {name}'s classifier for 1000 classes is replaced by a new one for 10"]
    src = model_source("hf-hub:acme/digits-resnet", "pretrained")  # architecture from the repo's config.json
    assert src.arch == "test_resnet" and src.record()["hub_id"] == "acme/digits-resnet"
    _same(build_model(src, 10, 3).state_dict(), hub_cache["hf-hub:acme/digits-resnet"])
    assert model_source("hf-hub:acme/digits-resnet", "scratch").record() == {"source": "scratch"}


def test_train_large_brings_in_a_hub_teacher_at_its_own_preprocessing(hub_cache, tmp_path: Path) -> None:
    """epochs 0 wraps the weights as they are (here fine-tuned on 10 classes, 24 px, bicubic): teacher.pt holds
    them (the stem adapted to grey images by timm's loader), its pretrained preprocessing and their source."""
    out = tmp_path / "t"
    cli("train-large", "--data", "digits", "--model", "hf-hub:acme/digits-resnet", "--init", "pretrained",
        "--epochs", "0", "--out", out, "--quiet")
    art = torch.load(out / "teacher.pt", weights_only=True)
    file = hub_cache["hf-hub:acme/digits-resnet"]
    _same(art["state_dict"], file, skip=("conv1.0.",))
    assert torch.equal(art["state_dict"]["conv1.0.weight"], file["conv1.0.weight"].sum(1, keepdim=True))
    assert art["preprocess"] == {"in_chans": 1, "input_size": 24, "mean": [0.5] * 3, "std": [0.25] * 3,
                                 "crop_pct": 1.0, "interpolation": "bicubic"}
    assert art["weights"]["hub_id"] == "acme/digits-resnet" and art["weights"]["sha256"] == _file_sha(
        "acme/digits-resnet")
    assert art["arch"] == "test_resnet" and art["model_name"] == "hf-hub:acme/digits-resnet"
    cli("train-large", "--data", "digits", "--model", "hf-hub:acme/digits-resnet", "--init", "pretrained",
        "--epochs", "0", "--set", "train_large.input_size=16", "--set", "train_large.interpolation=bilinear",
        "--out", tmp_path / "t16", "--quiet")  # the user's own settings win over the pretrained ones
    prep = torch.load(tmp_path / "t16" / "teacher.pt", weights_only=True)["preprocess"]
    assert prep["input_size"] == 16 and prep["interpolation"] == "bilinear" and prep["mean"] == [0.5] * 3


def test_a_student_starts_from_hub_weights_or_a_checkpoint(hub_cache, tiny_targets, tmp_path: Path) -> None:
    """student_init pretrained and checkpoint:PATH (here the pretrained student.pt itself); 0 steps keep the
    start weights, so the artifact shows exactly what the student started from."""
    name = "test_efficientnet.r160_in1k"
    out = tmp_path / "pre"
    cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "0", "--student", name, "--student-init",
        "pretrained", "--input-size", "16", "--out", out, "--quiet")
    art = torch.load(out / "student.pt", weights_only=True)
    _same(art["state_dict"], hub_cache[name], skip=("classifier.", "conv_stem."))
    assert art["weights"]["hub_id"] == f"timm/{name}" and art["preprocess"]["input_size"] == 16
    assert art["preprocess"]["interpolation"] == "bicubic" and art["preprocess"]["crop_pct"] == 0.95
    again = tmp_path / "ckpt"
    cli("distill", "--targets", tiny_targets, "--mode", "kd", "--steps", "0", "--student", name, "--student-init",
        f"checkpoint:{out / 'student.pt'}", "--input-size", "16", "--out", again, "--quiet")
    art2 = torch.load(again / "student.pt", weights_only=True)
    _same(art2["state_dict"], art["state_dict"])
    assert art2["weights"]["source"] == "checkpoint" and art2["weights"]["sha256"] == hashlib.sha256(
        (out / "student.pt").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- two resolutions
def _recorded_precompute(teacher: Path, out: Path) -> dict:
    """precompute --views 4 of ``teacher``, recording every input the teacher ran on for views 1..3."""
    seen: dict[tuple[int, int], torch.Tensor] = {}
    original = views_mod.ViewMaker.inputs

    def recording(self, ids, views):
        x = original(self, ids, views)
        for i, key in enumerate(zip(np.asarray(ids).tolist(), np.asarray(views).tolist())):
            seen[key] = x[i].clone()
        return x

    mp = pytest.MonkeyPatch()
    mp.setattr(views_mod.ViewMaker, "inputs", recording)
    try:
        cli("precompute", "--teacher", teacher, "--out", out, "--dtype", "float32", "--views", "4", "--quiet")
    finally:
        mp.undo()
    return seen


def smooth_folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """RGB PNGs of smooth random waves (of a few sizes) in ``root/CLASS/``: resampling at two sizes keeps them
    alike, so a region can be told from another one."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            w, h = (40, 36) if i % 2 else (30, 44)
            yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
            waves = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
                     for _ in range(3)]
            pixels = (127 + 100 * np.stack(waves, -1)).astype(np.uint8)
            pixels[..., c] //= 2
            path = root / f"class{c}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def _pixels(x: torch.Tensor, prep) -> torch.Tensor:
    mean, std = prep.norm_tensors()
    if mean.shape[1] != x.shape[1]:
        mean, std = mean.mean().view(1, 1, 1, 1), std.mean().view(1, 1, 1, 1)
    return x * std + mean


@pytest.mark.parametrize("kind", ["digits", "folder"])
def test_a_32px_teachers_views_train_a_16px_student_on_the_same_regions(kind, hub_cache, tmp_path: Path) -> None:
    from reducedmpl.config import stage_config
    from reducedmpl.data.loading import Preprocess, resize
    from reducedmpl.data.views import ViewMaker
    from reducedmpl.models import load_artifact, model_from_artifact, model_source
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data, student_data

    source = "digits" if kind == "digits" else f"folder:{smooth_folder(tmp_path / 'images')}"
    extra = ["--set", "data.labeled_per_class=10"] if kind == "digits" else ["--set", "data.labeled_fraction=0.5"]
    teacher = tmp_path / "t" / "teacher.pt"
    cli("train-large", "--data", source, "--model", "test_resnet.r160_in1k", "--init", "pretrained", "--epochs", "1",
        "--set", "train_large.input_size=32", "--set", "data.hflip=true", *extra, "--out", teacher.parent, "--quiet")
    seen = _recorded_precompute(teacher, tmp_path / "targets.h5")
    student = "test_efficientnet.r160_in1k"
    cli("distill", "--targets", tmp_path / "targets.h5", "--mode", "kd", "--steps", "2", "--student", student,
        "--student-init", "pretrained", "--input-size", "16", "--set", "distill.batch_size=8", "--set",
        "distill.unlabeled_batch_size=16", "--out", tmp_path / "d", "--quiet")
    assert torch.load(tmp_path / "d" / "student.pt", weights_only=True)["preprocess"]["input_size"] == 16

    cfg = stage_config("distill", flags={"mode": "kd", "steps": 3, "device": "cpu", "unlabeled_batch_size": 16,
                                          "student": student, "student_init": "pretrained", "input_size": 16})
    store = open_store(tmp_path / "targets.h5", 64)
    src = model_source(student, "pretrained")
    d = Distiller(cfg, student_data(cfg, resolve_data(cfg, store), src), store, torch.device("cpu"), student=src)
    art = load_artifact(teacher, "teacher")
    t_prep, net = Preprocess.from_dict(art["preprocess"]), model_from_artifact(art).eval()
    maker = d.unlabeled.batcher.replay
    assert maker is not None and maker.prep.input_size == 16 and t_prep.input_size == 32
    as_teacher = ViewMaker(maker.source, t_prep, maker.policy)  # the student's views, rendered at the teacher's
    checked, close, far = 0, [], []
    for _ in range(3):
        x, _, ids = d.unlabeled.next()
        views = d.unlabeled.views(ids)
        assert x.shape[-1] == 16
        big = as_teacher.inputs(ids.numpy(), views)
        for i, (r, v) in enumerate(zip(ids.tolist(), views.tolist())):
            if v:
                assert torch.equal(big[i], seen[(r, v)]), (r, v)  # bit for bit the teacher's input
                checked += 1
        with torch.no_grad():
            np.testing.assert_allclose(net(big).numpy(), store.logits(ids.numpy(), views=views), rtol=1e-4,
                                       atol=1e-4)
        # the same region: the teacher's rendering brought down to 16 px looks like the student's rendering, far
        # more than another view of the same row does
        small = resize(_pixels(big, t_prep).clamp(0, 1), 16, "bilinear").mean(1)
        mine = _pixels(x, maker.prep).mean(1)
        other = _pixels(maker.inputs(ids.numpy(), (views + 1) % 4), maker.prep).mean(1)
        close.append((small - mine).abs().mean().item())
        far.append((other - mine).abs().mean().item())
    assert checked > 10
    assert np.mean(close) < 0.35 * np.mean(far), (close, far)
    store.close()


# ---------------------------------------------------------------------------------------------- stage keys
def test_run_stage_keys_change_when_the_weights_do(hub_cache, tmp_path: Path) -> None:
    from reducedmpl.pipeline import load_pipeline, plan

    path = tmp_path / "p.yaml"
    path.write_text("name: p\ndata: {source: digits}\n"
                    "train_large: {model: test_resnet.r160_in1k, init: pretrained, epochs: 1}\n"
                    "distill: {student: test_efficientnet.r160_in1k, student_init: pretrained, steps: 2}\n"
                    "compare: {runs: [{name: kd, mode: kd}]}\n")
    keys = [s.key for s in plan(load_pipeline(path), tmp_path / "runs")]
    assert keys == [s.key for s in plan(load_pipeline(path), tmp_path / "runs")]
    write_hub_model("timm/test_efficientnet.r160_in1k", "test_efficientnet", seed=7)  # new student weights
    moved = [s.key for s in plan(load_pipeline(path), tmp_path / "runs")]
    assert moved[:2] == keys[:2] and moved[2] != keys[2]
    write_hub_model("timm/test_resnet.r160_in1k", "test_resnet", seed=7, revision="b" * 40)  # a new revision
    moved = [s.key for s in plan(load_pipeline(path), tmp_path / "runs")]
    assert all(a != b for a, b in zip(moved, keys))
    write_hub_model("timm/test_resnet.r160_in1k", "test_resnet")  # put the session's weights back
    write_hub_model("timm/test_efficientnet.r160_in1k", "test_efficientnet", seed=1)


# ---------------------------------------------------------------------------------------------- the pipelines
def test_every_reference_pipeline_names_models_timm_has() -> None:
    """Each pipeline in pipelines/ loads, and each model it names exists in timm; a pretrained one with weights on
    the Hub under that tag (looked up in timm's registry: nothing is fetched)."""
    from conftest import REPO
    from reducedmpl.hub import is_hub_name
    from reducedmpl.models import model_source
    from reducedmpl.pipeline import load_pipeline

    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        pipe = load_pipeline(path)
        models = [(pipe.train_large.model, pipe.train_large.init)]
        models += [(d.config.student, d.config.student_init) for d in pipe.distills]
        for name, init in models:
            if init == "pretrained" and not is_hub_name(name):
                from timm.models import get_pretrained_cfg

                assert get_pretrained_cfg(name).hf_hub_id, (path.name, name)
            else:
                model_source(name, "scratch")


@pytest.mark.slow
def test_the_pretrained_folder_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """pipelines/pretrained-folder.yaml on a small folder and a Hub cache holding (random) weights for its two
    models: the README's walkthrough, offline, with only the data, the schedule lengths, the batch sizes, the
    workers and the device set on the command line."""
    from conftest import REPO

    write_hub_model("timm/convnext_tiny.in12k_ft_in1k", "convnext_tiny", 1000, seed=3)
    write_hub_model("timm/resnet18.a1_in1k", "resnet18", 1000, seed=4)
    images = smooth_folder(tmp_path / "images", classes=3, per_class=10)
    cli("run", REPO / "pipelines" / "pretrained-folder.yaml", "--out-root", tmp_path / "runs", "--quiet",
        "--set", f"data.source=folder:{images}", "--set", "data.num_workers=0", "--set", "train_large.epochs=1",
        "--set", "train_large.batch_size=8", "--set", "precompute.batch_size=16", "--set", "distill.steps=2",
        "--set", "distill.batch_size=4", "--set", "distill.unlabeled_batch_size=8", "--set", "distill.eval_every=2",
        "--set", "train_large.device=cpu", "--set", "precompute.device=cpu", "--set", "distill.device=cpu")
    run = tmp_path / "runs" / "pretrained-folder"
    teacher = torch.load(next(run.glob("large-*/teacher.pt")), weights_only=True)
    assert teacher["preprocess"]["input_size"] == 224 and teacher["preprocess"]["interpolation"] == "bicubic"
    assert teacher["weights"]["hub_id"] == "timm/convnext_tiny.in12k_ft_in1k"
    students = sorted({p.resolve() for p in run.glob("distill-*/student.pt")})  # named links point at keyed folders
    assert len(students) == 3
    for path in students:
        art = torch.load(path, weights_only=True)
        assert art["preprocess"]["input_size"] == 160 and art["weights"]["hub_id"] == "timm/resnet18.a1_in1k"
    assert (run / "comparison.md").exists()


def test_inspect_shows_where_the_weights_came_from(hub_cache, tmp_path: Path) -> None:
    cli("train-large", "--data", "digits", "--model", "hf-hub:acme/digits-resnet", "--init", "pretrained",
        "--epochs", "0", "--out", tmp_path / "t", "--quiet")
    shown = cli("inspect", tmp_path / "t" / "teacher.pt", "--no-latency").stdout
    assert "test_resnet  (as hf-hub:acme/digits-resnet)" in shown
    assert f"pretrained: acme/digits-resnet @ {HUB_REVISION[:12]}  model.safetensors  sha256 " \
           f"{_file_sha('acme/digits-resnet')[:12]}" in shown
    assert "crop_pct 1.0  bicubic" in shown
    report = json.loads(cli("inspect", tmp_path / "t" / "teacher.pt", "--no-latency", "--json").stdout)
    assert report["weights"]["hub_id"] == "acme/digits-resnet" and not report["problems"]


def test_layer_decay_reaches_timms_optimizer() -> None:
    """optim.layer_decay gives the layers timm's decayed learning-rate scales (the head 1, the stem the least)."""
    import timm

    from reducedmpl.config import OptimConfig
    from reducedmpl.engine.optim import create_optimizer

    model = timm.create_model("test_resnet", num_classes=3)
    plain = create_optimizer(model, OptimConfig(lr=1e-3))
    assert {g.get("lr_scale", 1.0) for g in plain.param_groups} == {1.0}
    decayed = create_optimizer(model, OptimConfig(lr=1e-3, layer_decay=0.5))
    scales = sorted({round(g["lr_scale"], 6) for g in decayed.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] <= 0.5 ** (len(scales) - 1) + 1e-9


def test_online_kd_runs_the_teacher_at_its_own_size(tiny_teacher, tiny_targets, tmp_path: Path) -> None:
    """A 16-px student with the 8-px digits teacher: the teacher gets the student's view brought to its size and
    normalisation, exactly as LargeTeacher.inputs makes it."""
    from reducedmpl.config import stage_config
    from reducedmpl.data.loading import Preprocess, resize
    from reducedmpl.models import load_artifact, model_source
    from reducedmpl.stages.distill import Distiller, open_store, resolve_data, student_data

    cli("distill", "--targets", tiny_targets, "--mode", "online-kd", "--teacher", tiny_teacher, "--steps", "2",
        "--input-size", "16", "--set", "distill.batch_size=8", "--set", "distill.unlabeled_batch_size=16",
        "--out", tmp_path / "o", "--quiet")
    cfg = stage_config("distill", flags={"mode": "online-kd", "large_teacher": str(tiny_teacher), "steps": 2,
                                          "device": "cpu", "input_size": 16})
    store = open_store(tiny_targets, 64)
    src = model_source(cfg.student)
    d = Distiller(cfg, student_data(cfg, resolve_data(cfg, store), src), store, torch.device("cpu"), student=src)
    large = d.method.large
    x, _, _ = d.unlabeled.next()
    t_prep = Preprocess.from_dict(load_artifact(tiny_teacher, "teacher")["preprocess"])
    s_mean, s_std = d.data.prep.norm_tensors()
    t_mean, t_std = t_prep.norm_tensors()
    pixels = resize(x * s_std + s_mean, 8, t_prep.interpolation)
    assert x.shape[-1] == 16 and large.inputs(x).shape[-1] == 8
    torch.testing.assert_close(large.inputs(x), (pixels - t_mean) / t_std)
    store.close()
