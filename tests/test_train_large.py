import signal
import time

import numpy as np
import pytest
import timm
import torch

from conftest import assert_one_line_error, cli, cli_subprocess

FAST = ["--data", "digits", "--model", "test_resnet", "--quiet"]


def test_example_command_writes_a_teacher_that_timm_loads(tmp_path):
    out = tmp_path / "runs" / "t"
    r = cli("train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "3", "--out", out)
    assert "val acc" in r.stdout
    art = torch.load(out / "teacher.pt", weights_only=True)
    assert art["kind"] == "teacher" and art["arch"] == "test_resnet" and art["num_classes"] == 10
    assert art["data"]["source"] == "digits" and art["data"]["split_seed"] == 0
    assert set(art["data_fingerprints"]) == {"labeled", "unlabeled", "val", "test"}
    assert art["config"]["epochs"] == 3 and 0 <= art["metrics"]["val_acc"] <= 1
    assert (out / "config.yaml").exists() and not (out / "last.pt").exists()
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 4  # 3 epochs + the final row
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1, checkpoint_path=str(out / "teacher.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, art["state_dict"][k]), k


def test_epochs_zero_loads_and_evaluates(tiny_teacher, tmp_path):
    art = torch.load(tiny_teacher, weights_only=True)
    r = cli("train-large", *FAST, "--epochs", "0", "--init", f"checkpoint:{tiny_teacher}",
            "--set", "data.labeled_per_class=10", "--out", tmp_path / "e0")
    again = torch.load(tmp_path / "e0" / "teacher.pt", weights_only=True)
    assert again["metrics"]["val_acc"] == pytest.approx(art["metrics"]["val_acc"])
    assert f"{100 * art['metrics']['val_acc']:.2f}%" in r.stdout
    for k in art["state_dict"]:
        assert torch.equal(art["state_dict"][k], again["state_dict"][k])


def test_safetensors_init_and_reset_head(tiny_teacher, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(tiny_teacher, weights_only=True)["state_dict"]
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    cli("train-large", *FAST, "--epochs", "0", "--init", f"checkpoint:{st}", "--out", tmp_path / "a")
    # a 5-class checkpoint for 10-class data: refused without --reset-head, accepted with it
    m5 = timm.create_model("test_resnet", num_classes=5, in_chans=1)
    torch.save(m5.state_dict(), tmp_path / "five.pth")
    r = cli("train-large", *FAST, "--epochs", "0", "--init", f"checkpoint:{tmp_path / 'five.pth'}",
            "--out", tmp_path / "b", check=False)
    assert_one_line_error(r, "another number of classes", "--reset-head")
    assert not (tmp_path / "b" / "teacher.pt").exists()
    cli("train-large", *FAST, "--epochs", "0", "--init", f"checkpoint:{tmp_path / 'five.pth'}", "--reset-head",
        "--out", tmp_path / "c")
    got = torch.load(tmp_path / "c" / "teacher.pt", weights_only=True)["state_dict"]
    assert torch.equal(got["conv1.0.weight"], m5.state_dict()["conv1.0.weight"])
    assert got["fc.weight"].shape[0] == 10


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    args = ["train-large", *FAST, "--epochs", "8", "--batch-size", "16", "--set", "train_large.drop_rate=0.1",
            "--set", "data.randaugment=rand-m5-n1", "--set", "data.labeled_per_class=8"]
    cli(*args, "--out", tmp_path / "full")
    proc = cli_subprocess(*args, "--out", tmp_path / "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until at least 2 epochs are checkpointed, then kill
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "teacher.pt").exists(), "killed before the end, yet an artifact exists"
    assert (tmp_path / "cut" / "last.pt").exists()
    r = cli(*args, "--out", tmp_path / "cut", "--resume", check=False)
    assert r.exit_code == 0, r.stderr
    a, b = _weights(tmp_path / "full" / "teacher.pt"), _weights(tmp_path / "cut" / "teacher.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [line for line in metrics.read_text().splitlines() if line]
    assert len(rows) == 9  # each epoch exactly once, plus the final row


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_teacher):
    out = tmp_path / "o"
    r = cli("train-large", "--data", "mnist:" + str(tmp_path / "missing"), "--model", "test_resnet",
            "--out", out, check=False)
    assert_one_line_error(r, "missing")
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 8, 8), np.uint8))  # no labels
    r = cli("train-large", "--data", f"npz:{tmp_path / 'bad.npz'}", "--model", "test_resnet", "--out", out,
            check=False)
    assert_one_line_error(r, "y")
    r = cli("train-large", "--data", "digits", "--model", "resnet_18", "--out", out, check=False)
    assert_one_line_error(r, "unknown timm model", "resnet18")
    r = cli("train-large", "--data", "digits", "--model", "resnet18", "--epochs", "0",
            "--init", f"checkpoint:{tiny_teacher}", "--out", out, check=False)
    assert_one_line_error(r, "does not fit model")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": np.dtype("float32")}, tmp_path / "pickled.pt")
    r = cli("train-large", *FAST, "--epochs", "0", "--init", f"checkpoint:{tmp_path / 'pickled.pt'}",
            "--out", out, check=False)
    assert_one_line_error(r, "pickled")
    (tmp_path / "trunc.pt").write_bytes(tiny_teacher.read_bytes()[:1000])
    r = cli("train-large", *FAST, "--epochs", "0", "--init", f"checkpoint:{tmp_path / 'trunc.pt'}",
            "--out", out, check=False)
    assert_one_line_error(r, "corrupt or truncated")
    assert not out.exists() or not (out / "teacher.pt").exists()
    # an output folder holding a run
    r = cli("train-large", *FAST, "--epochs", "0", "--out", tiny_teacher.parent, check=False)
    assert_one_line_error(r, "already holds a run", "--overwrite")
    # an output folder that cannot be written
    (tmp_path / "file").write_text("")
    r = cli("train-large", *FAST, "--epochs", "0", "--out", tmp_path / "file" / "sub", check=False)
    assert_one_line_error(r, "cannot write")
    r = cli("train-large", *FAST, "--epochs", "-1", "--out", out, check=False)
    assert_one_line_error(r, "epochs")
    r = cli("train-large", *FAST, "--set", "train_large.epoch=3", "--out", out, check=False)
    assert_one_line_error(r, "did you mean 'epochs'")
    r = cli("train-large", *FAST, "--out", out, "--resume", check=False)
    assert r.exit_code == 2


def test_version_and_module_entry():
    import subprocess
    import sys

    from reducedmpl import __version__

    assert cli("--version").stdout.strip() == f"reducedmpl {__version__}"
    p = subprocess.run([sys.executable, "-m", "reducedmpl", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and __version__ in p.stdout
