"""``reducedmpl export``: ONNX, TorchScript and safetensors exports of real artifacts, checked, and bad input."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli
from reducedmpl.export import check_inputs, export_artifact
from reducedmpl.models import model_from_artifact, safe_load


def _reference(artifact, x):
    model = model_from_artifact(safe_load(artifact)).eval()
    with torch.no_grad():
        return model(x).numpy()


def _test_images(artifact):
    x, described = check_inputs(safe_load(artifact), rows=32)
    assert "test images of digits" in described  # real inputs, rebuilt from the artifact's recorded data
    return x


@pytest.mark.parametrize("which", ["tiny_teacher", "tiny_student"])
def test_onnx_matches_pytorch_on_real_images_with_a_dynamic_batch(which, request, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    artifact = request.getfixturevalue(which)
    out = tmp_path / "model.onnx"
    r = cli("export", artifact, "--format", "onnx", "--out", out)
    assert "checked against PyTorch on 64 test images of digits" in r.stdout
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    art = safe_load(artifact)
    assert sidecar["class_names"] == art["class_names"] and sidecar["arch"] == art["arch"]
    assert sidecar["mean"] == art["preprocess"]["mean"] and sidecar["std"] == art["preprocess"]["std"]
    assert sidecar["input_size"] == [1, 8, 8] and sidecar["input"]["shape"] == ["batch", 1, 8, 8]
    assert sidecar["check"]["checked"] and sidecar["check"]["max_abs_diff"] <= 1e-4
    x = _test_images(artifact)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for rows in (1, 7, 32):  # any batch size
        got = session.run(None, {"input": x[:rows].numpy()})[0]
        np.testing.assert_allclose(got, _reference(artifact, x[:rows]), atol=1e-4, rtol=1e-4)


def test_onnx_fixed_batch_and_normalisation_inside(tiny_student, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "fixed.onnx"
    result = export_artifact(tiny_student, "onnx", out, batch=4, normalize=True)
    assert result.check["checked"] and "in batches of 4" in result.check["inputs"]
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["input"]["shape"] == [4, 1, 8, 8] and sidecar["input"]["normalized_inside"] is True
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [4, 1, 8, 8]
    x = _test_images(tiny_student)[:4]
    mean, std = (torch.tensor(sidecar[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    pixels = x * std + mean  # what a user feeds: pixels in [0, 1]
    got = session.run(None, {"input": pixels.numpy()})[0]
    np.testing.assert_allclose(got, _reference(tiny_student, x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="[Ii]nvalid dimensions"):
        session.run(None, {"input": pixels[:3].numpy()})  # the batch is fixed: 3 rows are refused by the runtime


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_torchscript_export_runs_without_the_tool(tiny_student, tmp_path):
    out = tmp_path / "student.torchscript.pt"
    r = cli("export", tiny_student, "--format", "torchscript", "--out", out)
    assert "checked against PyTorch" in r.stdout
    loaded = torch.jit.load(str(out))
    x = _test_images(tiny_student)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), _reference(tiny_student, x), atol=1e-5)
    assert json.loads((tmp_path / "student.torchscript.pt.json").read_text())["format"] == "torchscript"


def test_safetensors_export_loads_into_timm(tiny_teacher, tmp_path):
    import timm
    from safetensors import safe_open

    out = tmp_path / "teacher.safetensors"
    cli("export", tiny_teacher, "--format", "safetensors", "--out", out)
    sidecar = json.loads((tmp_path / "teacher.safetensors.json").read_text())
    model = timm.create_model(sidecar["arch"], num_classes=sidecar["num_classes"], in_chans=sidecar["in_chans"],
                              checkpoint_path=str(out)).eval()
    x = _test_images(tiny_teacher)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), _reference(tiny_teacher, x), atol=1e-6)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["arch"]) == "test_resnet"


def test_default_out_is_beside_the_artifact(tiny_student, tmp_path):
    import shutil

    artifact = tmp_path / "student.pt"
    shutil.copy(tiny_student, artifact)
    cli("export", artifact, "--format", "safetensors")
    assert (tmp_path / "student.safetensors").exists() and (tmp_path / "student.safetensors.json").exists()


def test_export_refuses_a_targets_store(tiny_targets, tmp_path):
    r = cli("export", tiny_targets, "--format", "onnx", "--out", tmp_path / "x.onnx", check=False)
    assert_one_line_error(r, "targets store", "teacher.pt or student.pt")
    assert not list(tmp_path.iterdir())


def test_export_refuses_a_truncated_artifact(tiny_student, tmp_path):
    broken = tmp_path / "student.pt"
    broken.write_bytes(tiny_student.read_bytes()[:5000])
    r = cli("export", broken, "--format", "onnx", "--out", tmp_path / "x.onnx", check=False)
    assert_one_line_error(r, "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]  # nothing half-written


def test_export_refuses_an_unknown_format_and_misplaced_options(tiny_student, tmp_path):
    r = cli("export", tiny_student, "--format", "tflite", "--out", tmp_path / "x", check=False)
    assert_one_line_error(r, "unknown export format 'tflite'", "onnx, torchscript, safetensors")
    r = cli("export", tiny_student, "--format", "torchscript", "--batch", "4", check=False)
    assert_one_line_error(r, "--batch applies to onnx only")
    r = cli("export", tiny_student, "--format", "onnx", "--out", tmp_path / "no" / "x.onnx", check=False)
    assert_one_line_error(r, "does not exist")
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_mismatching_export_is_not_written(tiny_student, tmp_path, monkeypatch, fmt):
    """The check has teeth: an exported graph whose logits differ from PyTorch's is refused and removed."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    import reducedmpl.export as ex

    real = ex._reference
    monkeypatch.setattr(ex, "_reference", lambda model, x: real(model, x) + 1e-3)
    r = cli("export", tiny_student, "--format", fmt, "--out", tmp_path / "x", check=False)
    assert_one_line_error(r, f"the {'ONNX' if fmt == 'onnx' else 'TorchScript'} export's logits differ from "
                          "PyTorch's", "nothing was written")
    assert not list(tmp_path.iterdir())


def test_a_safetensors_file_without_the_artifacts_weights_is_not_written(tiny_teacher, tmp_path, monkeypatch):
    import reducedmpl.export as ex

    real = ex._export_safetensors

    def one_weight_off(model, art, tmp):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        real(model, art, tmp)

    monkeypatch.setattr(ex, "_export_safetensors", one_weight_off)
    r = cli("export", tiny_teacher, "--format", "safetensors", "--out", tmp_path / "x.safetensors", check=False)
    assert_one_line_error(r, "does not hold the artifact's weights", "nothing was written")
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")
def test_random_inputs_check_an_artifact_whose_data_is_not_here(tiny_student, tmp_path):
    """The recorded data cannot be loaded on this machine: the check runs on random inputs of the model's input
    shape, and says so."""
    art = safe_load(tiny_student)
    art["data"] = {**art["data"], "source": f"mnist:{tmp_path / 'gone'}"}
    moved = tmp_path / "student.pt"
    torch.save(art, moved)
    r = cli("export", moved, "--format", "torchscript", "--out", tmp_path / "s.pt")
    assert "checked against PyTorch on 64 random inputs (the recorded data could not be loaded" in r.stdout
    check = json.loads((tmp_path / "s.pt.json").read_text())["check"]
    assert check["checked"] and check["inputs"].startswith("64 random inputs") and check["max_abs_diff"] <= 1e-4
    x, described = check_inputs(art, rows=5)
    assert x.shape == (5, 1, 8, 8) and described.startswith("5 random inputs")
