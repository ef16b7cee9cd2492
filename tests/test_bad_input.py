"""Bad input, everywhere: one parametrized matrix over every command, plus hostile files.

Every case runs the real CLI in-process and must end with exit code 2, exactly one ``error: ...`` line on stderr
that names the problem and the fix, no traceback, and no artifact that a later stage would accept (no
teacher.pt / student.pt / last.pt, no targets store that opens; a good artifact that was there stays unchanged).

Most cases fail before any training; the few that need a teacher or a store use copies of the session fixtures.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, assert_one_line_error, cli
from hf_wds_data import encoded, pixels, wds_spec, write_hf_parquet, write_hub_dataset, write_wds
from reducedmpl.errors import MESSAGE_MAX_BYTES, UserError
from reducedmpl.targets import TargetStore

FAST = ["--model", "test_resnet", "--epochs", "1", "--quiet"]
TL_ARTIFACTS = ("teacher.pt", "last.pt", "best.pt")
DI_ARTIFACTS = ("student.pt", "reduced_teacher.pt", "last.pt", "best.pt", "result.json")


# ---------------------------------------------------------------------------------------------- helpers
class Hostile:
    """Unpickling this runs code: it opens ``marker`` for writing, which creates the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_payload(marker: Path) -> Hostile:
    """A Hostile object, after proving on a throw-away marker that plain pickle really runs its code."""
    probe = marker.with_name(marker.name + ".probe")
    pickle.loads(pickle.dumps(Hostile(probe))).close()
    assert probe.exists(), "the hostile payload is not live; the test would prove nothing"
    probe.unlink()
    return Hostile(marker)


@dataclass
class Case:
    argv: list
    fragments: tuple[str, ...]  # a fragment of the problem and one of the fix (case-insensitive)
    forbidden: list[Path] = field(default_factory=list)  # must not exist afterwards
    stores: list[Path] = field(default_factory=list)  # must not exist, or must not open as a targets store
    unchanged: list[Path] = field(default_factory=list)  # good artifacts that must be byte-identical afterwards
    markers: list[Path] = field(default_factory=list)  # files that hostile code would have created
    max_seconds: float | None = None  # refused within this time (input that could make work grow with its size)


class Fx:
    """Lazy access to the session fixtures (a case that needs none does not train the tiny teacher)."""

    def __init__(self, request: pytest.FixtureRequest):
        self.request = request

    @property
    def teacher(self) -> Path:
        return self.request.getfixturevalue("tiny_teacher")

    @property
    def targets(self) -> Path:
        return self.request.getfixturevalue("tiny_targets")

    @property
    def hub(self) -> dict:
        return self.request.getfixturevalue("hub_cache")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_store(src_master: Path, dst: Path) -> Path:
    """Copy a store (master and shards) into the folder ``dst``; returns the new master."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src_master.parent.glob(src_master.stem + "*" + src_master.suffix):
        shutil.copy2(p, dst / p.name)
    return dst / src_master.name


def shards_of(master: Path) -> list[Path]:
    return sorted(master.parent.glob(f"{master.stem}-*-of-*{master.suffix}"))


def tl_out(tmp: Path, name: str = "out") -> tuple[Path, list[Path]]:
    out = tmp / name
    return out, [out / a for a in TL_ARTIFACTS]


def di_out(tmp: Path, name: str = "out") -> tuple[Path, list[Path]]:
    out = tmp / name
    return out, [out / a for a in DI_ARTIFACTS]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def teacher_artifact(fx: Fx) -> dict:
    return torch.load(fx.teacher, weights_only=True)


# ---------------------------------------------------------------------------------------------- train-large
def tl_yaml_unknown_key(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "train_large:\n  epochz: 3\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--data", "digits", "--out", out],
                ("unknown config key 'train_large.epochz'", "did you mean 'epochs'"), bad)


def tl_yaml_wrong_type(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "train_large:\n  epochs: three\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--data", "digits", "--out", out],
                ("train_large.epochs must be of type int", "fix its value"), bad)


def tl_yaml_unknown_section(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "train_larg:\n  epochs: 3\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--out", out],
                ("unknown section 'train_larg'", "did you mean 'train_large'"), bad)


def tl_yaml_section_not_mapping(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "data: {source: digits}\ntrain_large: [1, 2]\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--out", out],
                ("section 'train_large' in", "must be a mapping", "write it as a YAML section"), bad)


def tl_yaml_data_not_mapping(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "data: [digits]\ntrain_large: {epochs: 1}\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--out", out],
                ("section 'data' in", "must be a mapping", "write it as a YAML section"), bad)


def tl_negative_lr(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--lr", "-0.1", "--out", out],
                ("train_large.optim.lr must be > 0", "fix the value"), bad)


def tl_negative_epochs(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--model", "test_resnet", "--epochs", "-2", "--out", out],
                ("epochs must be >= 0", "fix the value"), bad)


def tl_empty_folder(tmp: Path, fx: Fx) -> Case:
    (tmp / "empty").mkdir()
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"folder:{tmp / 'empty'}", *FAST, "--out", out],
                ("holds no class sub-folders", "DIR/CLASS/IMAGE"), bad)


def tl_empty_npz(tmp: Path, fx: Fx) -> Case:
    np.savez(tmp / "empty.npz", x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, np.int64))
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"npz:{tmp / 'empty.npz'}", *FAST, "--out", out],
                ("holds no images", "non-empty data set"), bad)


def tl_too_many_labels(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--set", "data.labeled_per_class=10000", "--out", out],
                ("10000 labeled examples per class asked", "lower data.labeled_per_class"), bad)


def tl_unreadable_image(tmp: Path, fx: Fx) -> Case:
    root = tmp / "imgs"
    for i in range(4):
        tiny_png(root / "class_a" / f"{i}.png", 40 * i)
        tiny_png(root / "class_b" / f"{i}.png", 200 - 40 * i)
    (root / "class_a" / "bad.png").write_bytes(b"\x00garbage, not an image\xff" * 8)
    out, bad = tl_out(tmp)
    # no val/test split and one batch of all 9 images: the corrupt file is read in the first training batch
    return Case(["train-large", "--data", f"folder:{root}", *FAST, "--batch-size", "16", "--device", "cpu",
                 "--set", "data.input_size=8", "--set", "data.val_size=0", "--set", "data.test_size=0",
                 "--out", out], ("cannot read image file", "bad.png", "replace or delete the corrupt file"), bad)


def tl_truncated_idx(tmp: Path, fx: Fx) -> Case:
    folder = tmp / "mnist"
    folder.mkdir()
    n = 10
    images = struct.pack(">IIII", 0x803, n, 28, 28) + bytes(28 * 28 * n)
    (folder / "train-images-idx3-ubyte").write_bytes(images[: len(images) // 2])  # cut in the middle
    (folder / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + bytes(range(n)))
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"mnist:{folder}", *FAST, "--out", out],
                ("train-images-idx3-ubyte is truncated", "download the file again"), bad)


def tl_truncated_gzip_idx(tmp: Path, fx: Fx) -> Case:
    folder = tmp / "mnist"
    folder.mkdir()
    n = 10
    images = gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + bytes(28 * 28 * n))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(images[: len(images) - 12])
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 0x801, n) + bytes(n)))
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"mnist:{folder}", *FAST, "--out", out],
                ("truncated or corrupt gzip file", "download the file again"), bad)


def tl_truncated_cifar(tmp: Path, fx: Fx) -> Case:
    folder = tmp / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=4))
    batch = pickle.dumps({"data": np.zeros((20, 3072), np.uint8), "labels": [i % 10 for i in range(20)]},
                         protocol=4)
    for name in ["data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(batch)
    (folder / "data_batch_1").write_bytes(batch[: len(batch) // 2])
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"cifar10:{tmp / 'cifar'}", *FAST, "--out", out],
                ("data_batch_1 is truncated", "extract the CIFAR archive again"), bad)


def tl_unknown_model(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--model", "resnet_18", "--out", out],
                ("unknown timm model 'resnet_18'", "did you mean resnet18"), bad)


def tl_init_other_arch(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--model", "resnet10t", "--epochs", "0", "--quiet",
                 "--init", f"checkpoint:{fx.teacher}", "--out", out],
                ("does not fit model 'resnet10t'", "pass the architecture the checkpoint was trained with"), bad)


def tl_init_truncated(tmp: Path, fx: Fx) -> Case:
    ckpt = tmp / "trunc.pt"
    ckpt.write_bytes(fx.teacher.read_bytes()[:3000])
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--init", f"checkpoint:{ckpt}", "--out", out],
                ("is corrupt or truncated", "write it again"), bad)


def tl_init_missing(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--init", f"checkpoint:{tmp / 'nope.pt'}", "--out", out],
                ("nope.pt does not exist", "check the path"), bad)


def tl_init_other_class_count(tmp: Path, fx: Fx) -> Case:
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=5, in_chans=1).state_dict(), tmp / "five.pth")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--init", f"checkpoint:{tmp / 'five.pth'}", "--out", out],
                ("classifier for another number of classes", "--reset-head"), bad)


def tl_init_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    sd = teacher_artifact(fx)["state_dict"]
    torch.save({"state_dict": sd, "x": hostile_payload(marker)}, tmp / "hostile.pt")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--init", f"checkpoint:{tmp / 'hostile.pt'}",
                 "--out", out], ("holds pickled Python objects", "save a plain state dict"), bad,
                markers=[marker])


def tl_out_holds_run(tmp: Path, fx: Fx) -> Case:
    run = tmp / "run"
    run.mkdir()
    shutil.copy2(fx.teacher, run / "teacher.pt")
    shutil.copy2(fx.teacher.parent / "config.yaml", run / "config.yaml")
    return Case(["train-large", "--data", "digits", *FAST, "--out", run],
                ("already holds a run, a finished one", "pass --overwrite to replace it"),
                [run / "last.pt"], unchanged=[run / "teacher.pt", run / "config.yaml"])


def tl_out_holds_unfinished_run(tmp: Path, fx: Fx) -> Case:
    run = tmp / "run"
    run.mkdir()
    shutil.copy2(fx.teacher.parent / "config.yaml", run / "config.yaml")
    return Case(["train-large", "--data", "digits", *FAST, "--out", run],
                ("already holds a run, an unfinished one", "pass --resume to continue it, --overwrite to replace it"),
                [run / "teacher.pt", run / "last.pt"], unchanged=[run / "config.yaml"])


def tl_resume_nothing(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--resume", "--out", out],
                ("there is no run to resume", "drop --resume"), bad)


def tl_resume_finished(tmp: Path, fx: Fx) -> Case:
    run = tmp / "run"
    run.mkdir()
    shutil.copy2(fx.teacher, run / "teacher.pt")
    shutil.copy2(fx.teacher.parent / "config.yaml", run / "config.yaml")
    return Case(["train-large", "--data", "digits", *FAST, "--resume", "--out", run],
                ("holds a finished run", "--overwrite"), [run / "last.pt"],
                unchanged=[run / "teacher.pt", run / "config.yaml"])


def tl_resume_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    torch.save({"model": {}, "epoch": 0, "x": hostile_payload(marker)}, run / "last.pt")
    return Case(["train-large", "--data", "digits", *FAST, "--resume", "--out", run],
                ("resume checkpoint", "holds pickled Python objects", "save a plain state dict"),
                [run / "teacher.pt"], unchanged=[run / "last.pt"], markers=[marker])


def tl_device_cuda(tmp: Path, fx: Fx) -> Case:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--device", "cuda", "--out", out],
                ("CUDA is not available", "use --device cpu or auto"), bad)


def tl_bad_device_name(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--device", "gpu0", "--out", out],
                ("device must be auto, cpu, cuda or cuda:N", "fix the value"), bad)


def tl_unknown_source_prefix(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "imagenet:/data/imagenet", *FAST, "--out", out],
                ("unknown data source 'imagenet:/data/imagenet'", "use one of: digits"), bad)


def tl_missing_data_path(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"mnist:{tmp / 'no-such-dir'}", *FAST, "--out", out],
                ("no-such-dir does not exist", "check the path; expected mnist:DIR"), bad)


def tl_yaml_python_object(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    cfg = write_yaml(tmp / "c.yaml", f'train_large: !!python/object/apply:os.system ["touch {marker}"]\n')
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--data", "digits", "--out", out],
                ("python/object/apply:os.system", "plain YAML"), bad, markers=[marker])


def tl_yaml_python_name(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "train_large:\n  model: !!python/name:os.system\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--data", "digits", "--out", out],
                ("python/name:os.system", "plain YAML"), bad)


def tl_set_python_tag(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    out, bad = tl_out(tmp)
    return Case(["train-large", *FAST, "--out", out,
                 "--set", f'data.source=!!python/object/apply:os.system ["touch {marker}"]'],
                ("unknown data source '!!python/object/apply:os.system", "use one of"), bad, markers=[marker])


def tl_malformed_set(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--set", "train_large.epochs", "--out", out],
                ("is not of the form key=value", "--set train_large.epochs=3"), bad)


# ---------------------------------------------------------------------------------------------- precompute
def alias_bomb(flow: bool = False) -> str:
    """A few hundred bytes of nested anchors that expand to 9**9 (387 million) strings."""
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        ref = f"*{chr(96 + i)}"
        levels.append(f"&{chr(97 + i)} [{', '.join([ref] * 9)}]")
    if flow:
        return "[" + ", ".join(levels) + "]"
    return "".join(f"l{i}: {v}\n" for i, v in enumerate(levels[:-1])) + f"bomb: {levels[-1]}\n"


def tl_yaml_alias_bomb(tmp: Path, fx: Fx) -> Case:
    text = alias_bomb().replace("\n", "\n  ").rstrip() + "\n"
    cfg = write_yaml(tmp / "c.yaml", "data:\n  " + text.replace("bomb:", "source:"))
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--out", out, *FAST],
                ("aliases expand to more than 10,000 values", "fewer anchors and aliases"), [out, *bad])


def tl_set_alias_bomb(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--set", f"data.source={alias_bomb(flow=True)}", "--out", out,
                 *FAST], ("--set data.source=... is refused", "fewer anchors and aliases"), [out, *bad])


def image_folder(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            tiny_png(root / name / f"{i}.png", 40 * c + i)
    return root


def tl_folder_symlink_loop(tmp: Path, fx: Fx) -> Case:
    """cat/up -> .. would reach every dog image again as a cat, in train and test."""
    root = image_folder(tmp / "data")
    (root / "cat" / "up").symlink_to("..")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"folder:{root}", "--out", out, *FAST],
                ("cat/up is", "again (a symbolic link loop)", "remove the symbolic link"), [out, *bad])


def tl_folder_duplicate_file(tmp: Path, fx: Fx) -> Case:
    root = image_folder(tmp / "data")
    (root / "cat" / "9.png").symlink_to(root / "dog" / "1.png")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"folder:{root}", "--out", out, *FAST],
                ("is the same file as", "remove one of them"), [out, *bad])


def tl_folder_hard_link(tmp: Path, fx: Fx) -> Case:
    """A hard link is no link to follow: only the file's identity (device, inode) shows it is listed twice."""
    root = image_folder(tmp / "data")
    os.link(root / "dog" / "1.png", root / "cat" / "9.png")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"folder:{root}", "--out", out, *FAST],
                ("dog/1.png is the same file as", "cat/9.png (a link or a duplicate)", "remove one of them"),
                [out, *bad])


def tl_folder_linked_under_two_classes(tmp: Path, fx: Fx) -> Case:
    """dog/cats -> ../cat: every cat image would also be a dog."""
    root = image_folder(tmp / "data")
    (root / "dog" / "cats").symlink_to("../cat")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"folder:{root}", "--out", out, *FAST],
                ("dog/cats is", "cat again (a folder linked twice)", "so that every folder is reached once"),
                [out, *bad])


def tl_folder_empty_image(tmp: Path, fx: Fx) -> Case:
    root = image_folder(tmp / "data")
    (root / "dog" / "empty.png").write_bytes(b"")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"folder:{root}", "--out", out, *FAST],
                ("empty.png is empty (0 bytes)", "replace or delete the broken file"), [out, *bad])


def tl_model_too_small_input(tmp: Path, fx: Fx) -> Case:
    """A ViT with a 16-pixel patch grid on the 8x8 digits: refused before the run folder exists."""
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--model", "vit_tiny_patch16_224", "--epochs", "1", "--quiet",
                 "--out", out], ("train_large.model 'vit_tiny_patch16_224' cannot take the data's 1x8x8 inputs",
                                 "choose a model that takes 8x8 images"), [out, *bad])


def tl_pretrained_unknown_name(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST[2:], "--model", "test_resnett.r160_in1k", "--init",
                 "pretrained", "--out", out], ("unknown timm model 'test_resnett.r160_in1k'", "did you mean test_resnet"),
                [out, *bad])


def tl_pretrained_unknown_tag(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST[2:], "--model", "test_resnet.r161_in1k", "--init",
                 "pretrained", "--out", out], ("no pretrained tag 'r161_in1k'", "known tags: r160_in1k"), [out, *bad])


def tl_pretrained_not_in_cache(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST[2:], "--model", "resnet18.a1_in1k", "--init",
                 "pretrained", "--out", out],
                ("timm/resnet18.a1_in1k/model.safetensors is not in the Hugging Face cache", "HF_HUB_CACHE"),
                [out, *bad])


def tl_pretrained_head_never_trained(tmp: Path, fx: Fx) -> Case:
    """1000 ImageNet classes on the 10 digits with 0 epochs: the new classifier would stay untrained."""
    fx.hub
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--model", "test_resnet.r160_in1k", "--init", "pretrained",
                 "--epochs", "0", "--out", out], ("would be replaced by a new one and never trained", "--epochs N"),
                [out, *bad])


def tl_bad_init(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", *FAST, "--init", "imagenet", "--out", out],
                ("train_large.init must be 'scratch', 'pretrained' or 'checkpoint:PATH'", "fix the value"), bad)


# hf: and wds: sources (tiny files written with the datasets and webdataset libraries)
HF_FAST = [*FAST, "--device", "cpu", "--batch-size", "64", "--set", "data.input_size=16"]


def tl_hf_missing_column(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("datasets")
    root = write_hf_parquet(tmp / "pq")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"hf:{root}", *HF_FAST, "--set", "data.label_column=labels", "--out", out],
                ("has no column 'labels' (columns: image, label, caption)", "set data.label_column"), bad)


def tl_hf_label_outside_classes(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("datasets")
    root = write_hf_parquet(tmp / "pq", labels=[c % 3 for c in range(59)] + [-1])  # an unlabeled test row
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"hf:{root}", *HF_FAST, "--out", out],
                ("split 'test'", "has label -1 at row 11, outside the 3 classes", "leave that split out"), bad)


def tl_hf_undecodable_image(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("datasets")
    images = [encoded(x) for x in pixels(60)[0]]
    images[7] = b"\x89PNG not really" * 4
    root = write_hf_parquet(tmp / "pq", images=images)
    out, bad = tl_out(tmp)
    # no val/test split and one batch of all 60 rows: the broken row is decoded in the first training batch
    return Case(["train-large", "--data", f"hf:{root}", *HF_FAST, "--set", "data.val_size=0",
                 "--set", "data.test_size=0", "--out", out],
                ("cannot decode the image of row 7 (train row 7)", "cannot identify image file its bytes",
                 "fix or drop that row"), bad)


def tl_hf_hub_dataset_not_in_cache(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("datasets")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "hf:acme/never-fetched", *HF_FAST, "--out", out],
                ("acme/never-fetched is not in the local Hugging Face caches and cannot be downloaded (offline)",
                 "`hf download acme/never-fetched --repo-type dataset`"), bad)


def tl_hf_hub_dataset_without_the_config(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("datasets")
    env = fx.request.getfixturevalue("monkeypatch")
    env.setenv("HF_HUB_CACHE", str(tmp / "hub"))
    env.setenv("HF_DATASETS_CACHE", str(tmp / "datasets"))
    snapshot = write_hub_dataset(tmp / "hub", "acme/tiny", config="small")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "hf:acme/tiny", *HF_FAST, "--set", "data.hf_config=large", "--out", out],
                ("'hf:acme/tiny' has no configuration 'large' in the local cache (configurations: small)",
                 "set data.hf_config to one of those"), bad,
                unchanged=[snapshot / "README.md", snapshot / "small" / "train-00000-of-00001.parquet"])


def tl_wds_missing_cls(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("webdataset")
    root = write_wds(tmp / "shards", drop_cls="sample00023")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", wds_spec(root), *HF_FAST, "--out", out],
                ("sample 'sample00023' in", "shard-000001.tar has no 'cls' field", "write each sample's class index"),
                bad)


def tl_wds_undecodable_image(tmp: Path, fx: Fx, *extra: str) -> Case:
    import tarfile

    pytest.importorskip("webdataset")
    root = write_wds(tmp / "shards", shards=1)
    with tarfile.open(root / "shard-000000.tar", "a") as tar:  # one more sample whose PNG is not one
        for name, data in (("broken.png", b"not a png" * 9), ("broken.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", wds_spec(root, 1), *HF_FAST, "--set", "data.val_size=0",
                 "--set", "data.test_size=0", *extra, "--out", out],
                ("cannot decode the image of sample 'broken'", "replace the sample's image"), bad)


def tl_wds_undecodable_image_in_a_worker(tmp: Path, fx: Fx) -> Case:
    """The same, decoded in a DataLoader worker process: the error crosses back as the same one line."""
    return tl_wds_undecodable_image(tmp, fx, "--set", "data.num_workers=1")


def tl_wds_pattern_matches_nothing(tmp: Path, fx: Fx) -> Case:
    pytest.importorskip("webdataset")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"wds:{tmp}/shards-{{000000..000009}}.tar", *HF_FAST, "--out", out],
                ("shards-{000000..000009}.tar matches no shard file", "check the pattern"), bad)


def pc_out(tmp: Path) -> tuple[Path, list[Path]]:
    out = tmp / "pc" / "targets.h5"
    return out, [out]


def pc_topk_too_large(tmp: Path, fx: Fx) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", fx.teacher, "--topk", "10", "--out", out, "--quiet"],
                ("topk=10 must be 0 (dense) or in 1..9", "use --topk below that"), stores=stores)


def pc_negative_topk(tmp: Path, fx: Fx) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", fx.teacher, "--topk", "-1", "--out", out, "--quiet"],
                ("precompute.topk must be >= 0", "fix the value"), stores=stores)


def pc_teacher_truncated(tmp: Path, fx: Fx) -> Case:
    (tmp / "teacher.pt").write_bytes(fx.teacher.read_bytes()[:-4096])
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", tmp / "teacher.pt", "--out", out, "--quiet"],
                ("is corrupt or truncated", "write it again"), stores=stores)


def pc_teacher_other_arch(tmp: Path, fx: Fx) -> Case:
    art = teacher_artifact(fx)
    art["arch"] = "resnet10t"
    torch.save(art, tmp / "teacher.pt")
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", tmp / "teacher.pt", "--out", out, "--quiet"],
                ("do not fit 'resnet10t'", "write the teacher again with train-large"), stores=stores)


def pc_checkpoint_other_arch(tmp: Path, fx: Fx) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--model", "resnet10t", "--checkpoint", fx.teacher, "--data", "digits",
                 "--out", out, "--quiet"],
                ("does not fit model 'resnet10t'", "pass the architecture"), stores=stores)


def pc_teacher_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    art = teacher_artifact(fx)
    art["x"] = hostile_payload(marker)
    torch.save(art, tmp / "teacher.pt")
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", tmp / "teacher.pt", "--out", out, "--quiet"],
                ("holds pickled Python objects", "save a plain state dict"), stores=stores, markers=[marker])


def pc_checkpoint_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    torch.save({"state_dict": teacher_artifact(fx)["state_dict"], "x": hostile_payload(marker)}, tmp / "w.pth")
    out, stores = pc_out(tmp)
    return Case(["precompute", "--model", "test_resnet", "--checkpoint", tmp / "w.pth", "--data", "digits",
                 "--out", out, "--quiet"],
                ("holds pickled Python objects", "save a plain state dict"), stores=stores, markers=[marker])


def pc_class_count(tmp: Path, fx: Fx) -> Case:
    rng = np.random.default_rng(0)
    np.savez(tmp / "three.npz", x=rng.integers(0, 255, (120, 8, 8), dtype=np.uint8), y=np.arange(120) % 3)
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", fx.teacher, "--data", f"npz:{tmp / 'three.npz'}", "--out", out,
                 "--quiet"], ("predicts 10 classes", "has 3", "precompute with data of the teacher's classes"),
                stores=stores)


def pc_out_holds_other_store(tmp: Path, fx: Fx) -> Case:
    master = copy_store(fx.targets, tmp / "store")
    return Case(["precompute", "--teacher", fx.teacher, "--dtype", "float16", "--out", master, "--quiet"],
                ("already holds a targets store from another precompute run", "pass --overwrite"),
                unchanged=[master, *shards_of(master)])


def pc_no_teacher(tmp: Path, fx: Fx) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--checkpoint", tmp / "w.pth", "--out", out, "--quiet"],
                ("no teacher given (--model is missing)", "pass --teacher"), stores=stores)


def pc_second_writer(tmp: Path, fx: Fx) -> Case:
    """Another precompute holds the lock of the store folder: this one refuses at once and deletes nothing."""
    from reducedmpl.targets import StoreLock

    out, stores = pc_out(tmp)
    held = StoreLock(out)  # released when the case is dropped, after the command ran
    out.parent.mkdir(parents=True, exist_ok=True)
    leftover = out.parent / ".targets-00000-of-00001.h5.tmp"  # the other writer's shard in progress
    leftover.write_bytes(b"being written")
    case = Case(["precompute", "--teacher", fx.teacher, "--out", out, "--quiet"],
                ("another precompute is writing", "wait for it to finish"), stores=stores, unchanged=[leftover])
    case.held = held  # type: ignore[attr-defined]
    return case


def pc_note_then_error(tmp: Path, fx: Fx) -> Case:
    """Other split settings than the teacher's (a note), then a refusal: only the refusal is printed."""
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", fx.teacher, "--set", "data.labeled_per_class=3", "--topk", "10",
                 "--out", out], ("topk=10 must be 0 (dense) or in 1..9", "use --topk below that"), stores=stores)


def pc_raw_pickle_teacher(tmp: Path, fx: Fx) -> Case:
    """A state dict written with plain pickle: torch warns about its protocol before refusing; no warning shows."""
    with open(tmp / "teacher.pt", "wb") as f:
        pickle.dump(teacher_artifact(fx)["state_dict"], f, protocol=4)
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", tmp / "teacher.pt", "--out", out, "--quiet"],
                ("holds pickled Python objects", "save a plain state dict"), stores=stores)


# ---------------------------------------------------------------------------------------------- distill
def _distill(master: Path, out: Path, *extra: str) -> list:
    return ["distill", "--targets", master, "--mode", "kd", "--steps", "2", "--quiet", "--device", "cpu",
            "--set", "eval_every=1", "--set", "probe_size=2", "--out", out, *extra]


def di_other_data(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(_distill(fx.targets, out, "--set", "data.labeled_per_class=5"),
                ("was computed for other data", "run `reducedmpl precompute` for this data"), bad,
                unchanged=[fx.targets])


def di_missing_shard(tmp: Path, fx: Fx) -> Case:
    master = copy_store(fx.targets, tmp / "store")
    shards_of(master)[0].unlink()
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("needs shard", "which is missing", "copy the whole store folder"),
                bad, stores=[master])


def di_master_without_shards(tmp: Path, fx: Fx) -> Case:
    (tmp / "alone").mkdir()
    shutil.copy2(fx.targets, tmp / "alone" / "targets.h5")
    out, bad = di_out(tmp)
    return Case(_distill(tmp / "alone", out), ("needs shard", "copy the whole store folder, or rerun precompute"),
                bad, stores=[tmp / "alone" / "targets.h5"])


def di_incomplete_master(tmp: Path, fx: Fx) -> Case:
    master = copy_store(fx.targets, tmp / "store")
    with h5py.File(master, "r+") as f:
        f.attrs["complete"] = False
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("is incomplete", "rerun it"), bad, stores=[master])


def di_unknown_schema(tmp: Path, fx: Fx) -> Case:
    master = copy_store(fx.targets, tmp / "store")
    with h5py.File(master, "r+") as f:
        f.attrs["schema_version"] = 99
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("has schema version 99", "rerun precompute with this reducedmpl"), bad,
                stores=[master])


def di_nan_logits(tmp: Path, fx: Fx) -> Case:
    master = copy_store(fx.targets, tmp / "store")
    with h5py.File(shards_of(master)[0], "r+") as f:
        logits = f["logits"][...]
        logits[:, 3] = np.nan
        logits[::7, 0] = np.inf
        f["logits"][...] = logits
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("has NaN/Inf in 'logits'", "rerun `reducedmpl precompute`"), bad)


def di_not_hdf5(tmp: Path, fx: Fx) -> Case:
    (tmp / "targets.h5").write_bytes(b"this is not an HDF5 file\n" * 20)
    out, bad = di_out(tmp)
    return Case(_distill(tmp / "targets.h5", out), ("is not a readable HDF5 file", "rerun `reducedmpl precompute`"),
                bad, stores=[tmp / "targets.h5"])


def di_teacher_as_targets(tmp: Path, fx: Fx) -> Case:
    """The new user's trip: --targets runs/t/teacher.pt names the file to pass instead."""
    out, bad = di_out(tmp)
    return Case(_distill(fx.teacher, out), ("is a teacher artifact (teacher.pt), not a targets store",
                                            f"pass the targets.h5 that `reducedmpl precompute --teacher {fx.teacher}`",
                                            "writes beside it"), bad, unchanged=[fx.teacher])


def di_missing_store(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(_distill(tmp / "nope" / "targets.h5", out), ("does not exist", "run `reducedmpl precompute` first"),
                bad)


def di_outside_store_folder(tmp: Path, fx: Fx) -> Case:
    master = outside_store(fx, tmp)
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("outside the store folder", "refusing to read it", "rerun precompute"),
                bad, stores=[master])


def di_negative_steps(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(["distill", "--targets", tmp / "t.h5", "--steps", "-5", "--out", out],
                ("distill.steps must be >= 0", "fix the value"), bad)


def di_unknown_mode(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(["distill", "--targets", tmp / "t.h5", "--mode", "mpl", "--out", out],
                ("distill.mode must be one of reducedmpl, kd, online-kd, supervised", "use one of the listed values"), bad)


def di_resume_nothing(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(_distill(fx.targets, out, "--resume"), ("there is no run to resume", "drop --resume"), bad)


def di_resume_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 2\n")
    torch.save({"distiller": {}, "x": hostile_payload(marker)}, run / "last.pt")
    return Case(_distill(fx.targets, run, "--resume"),
                ("resume checkpoint", "holds pickled Python objects", "save a plain state dict"),
                [run / "student.pt", run / "reduced_teacher.pt"], unchanged=[run / "last.pt"], markers=[marker])


def di_class_count(tmp: Path, fx: Fx) -> Case:
    """A store whose class names were rewritten to 11 (a store for an 11-class teacher)."""
    master = copy_store(fx.targets, tmp / "store")
    with h5py.File(master, "r+") as f:
        names = [f"c{i}" for i in range(11)]
        f.attrs["class_names"] = np.array(names, dtype=h5py.string_dtype())
        f.attrs["num_classes"] = 11
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("dataset 'logits' has shape", "rerun `reducedmpl precompute`"), bad,
                stores=[master])


def reordered_class_names(fx: Fx, tmp: Path) -> Path:
    """A copy of the tiny store whose class names are the data's in another order (its master and shards)."""
    master = copy_store(fx.targets, tmp / "store")
    for path in [master, *shards_of(master)]:
        with h5py.File(path, "r+") as f:
            if "class_names" in f.attrs:
                f.attrs["class_names"] = np.array([str(9 - i) for i in range(10)], dtype=h5py.string_dtype())
    return master


def di_class_names_order(tmp: Path, fx: Fx) -> Case:
    master = reordered_class_names(fx, tmp)
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("has other class names than the data (the same names in another order)",
                                        "precompute targets with a teacher trained on this data's classes"),
                [out, *bad])


def di_student_too_small_input(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(_distill(fx.targets, out, "--student", "vit_tiny_patch16_224"),
                ("distill.student 'vit_tiny_patch16_224' cannot take the data's 1x8x8 inputs", "data.input_size"),
                [out, *bad])


def di_student_head_without_reset(tmp: Path, fx: Fx) -> Case:
    """A student checkpoint with a classifier for 1000 classes on the 10 digits, without distill.reset_head."""
    import timm

    torch.save(timm.create_model("test_resnet").state_dict(), tmp / "imagenet.pth")
    out, bad = di_out(tmp)
    return Case(_distill(fx.targets, out, "--student-init", f"checkpoint:{tmp / 'imagenet.pth'}"),
                ("classifier for another number of classes", "distill.reset_head"), bad)


def di_student_input_size_too_small(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(_distill(fx.targets, out, "--student", "test_convnext", "--input-size", "16"),
                ("distill.student 'test_convnext' cannot take the data's 1x16x16 inputs", "distill.input_size"),
                [out, *bad])


def di_student_pretrained_not_in_cache(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(_distill(fx.targets, out, "--student", "hf-hub:acme/not-fetched", "--student-init", "pretrained"),
                ("acme/not-fetched/config.json is not in the Hugging Face cache", "hf download acme/not-fetched"),
                [out, *bad])


def di_views_of_one_size_for_another(tmp: Path, fx: Fx) -> Case:
    """A store whose views were stored as tensors of the teacher's size (rebuild scheme 1) cannot serve a student
    at another size: refused, with the two ways out."""
    master = tmp / "store" / "targets.h5"
    cli("precompute", "--teacher", fx.teacher, "--out", master, "--views", "2", "--splits", "labeled,unlabeled",
        "--quiet")
    for path in [master, *shards_of(master)]:
        with h5py.File(path, "r+") as f:
            policy = json.loads(f.attrs["view_policy"])
            f.attrs["view_policy"] = json.dumps({**policy, "rebuild": 1}, sort_keys=True)
    out, bad = di_out(tmp)
    return Case(_distill(master, out, "--input-size", "16"),
                ("views were made with view rebuild scheme 1", "distill.replay_views=false"), [out, *bad])


def di_wds_shard_changed(tmp: Path, fx: Fx) -> Case:
    """Shards rewritten (the same keys and labels, other images) after precompute: distill refuses the store."""
    pytest.importorskip("webdataset")
    root = write_wds(tmp / "shards")
    cli("train-large", "--data", wds_spec(root), *HF_FAST, "--set", "data.labeled_per_class=6", "--out", tmp / "t")
    master = tmp / "targets.h5"
    cli("precompute", "--teacher", tmp / "t" / "teacher.pt", "--out", master, "--quiet", "--device", "cpu")
    write_wds(root, seed=1)
    out, bad = di_out(tmp)
    return Case(_distill(master, out, "--student", "test_resnet"),
                ("was computed for other data", "run `reducedmpl precompute` for this data"), bad, unchanged=[master])


# ---------------------------------------------------------------------------------------------- inspect
def in_missing(tmp: Path, fx: Fx) -> Case:
    return Case(["inspect", tmp / "nothing.pt"], ("does not exist", "pass a targets.h5, teacher.pt or student.pt"))


def in_missing_store(tmp: Path, fx: Fx) -> Case:
    return Case(["inspect", tmp / "nothing.h5"], ("does not exist", "pass a targets.h5, teacher.pt or student.pt"))


def in_not_artifact(tmp: Path, fx: Fx) -> Case:
    (tmp / "notes.txt").write_text("hello\n")
    return Case(["inspect", tmp / "notes.txt"],
                ("neither a targets store nor a reducedmpl teacher/student artifact", "pass a targets.h5"))


def in_plain_state_dict(tmp: Path, fx: Fx) -> Case:
    torch.save({"w": torch.zeros(3)}, tmp / "weights.pt")
    return Case(["inspect", tmp / "weights.pt"],
                ("neither a targets store nor a reducedmpl teacher/student artifact", "pass a targets.h5"))


def in_truncated(tmp: Path, fx: Fx) -> Case:
    (tmp / "teacher.pt").write_bytes(fx.teacher.read_bytes()[:2000])
    return Case(["inspect", tmp / "teacher.pt"], ("is corrupt or truncated", "write it again"))


def in_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    art = teacher_artifact(fx)
    art["x"] = hostile_payload(marker)
    torch.save(art, tmp / "teacher.pt")
    return Case(["inspect", tmp / "teacher.pt"], ("holds pickled Python objects", "save a plain state dict"),
                markers=[marker])


# ---------------------------------------------------------------------------------------------- run
def run_args(pipeline: Path, tmp: Path, *extra: str) -> list:
    return ["run", pipeline, "--out-root", tmp / "runs", "--quiet", *extra]


# ---------------------------------------------------------------------------------------------- export
def ex_targets_store(tmp: Path, fx: Fx) -> Case:
    return Case(["export", fx.targets, "--format", "onnx", "--out", tmp / "m.onnx"],
                ("is a targets store", "pass the teacher.pt or student.pt"),
                [tmp / "m.onnx", tmp / "m.onnx.json"], unchanged=[fx.targets])


def ex_truncated(tmp: Path, fx: Fx) -> Case:
    (tmp / "teacher.pt").write_bytes(fx.teacher.read_bytes()[:3000])
    return Case(["export", tmp / "teacher.pt", "--format", "torchscript", "--out", tmp / "m.pt"],
                ("is corrupt or truncated", "write it again"), [tmp / "m.pt", tmp / "m.pt.json"])


def ex_unknown_format(tmp: Path, fx: Fx) -> Case:
    return Case(["export", fx.teacher, "--format", "tflite", "--out", tmp / "m"],
                ("unknown export format 'tflite'", "choose one of onnx, torchscript, safetensors"),
                [tmp / "m", tmp / "m.json"], unchanged=[fx.teacher])


def ex_hostile(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    art = teacher_artifact(fx)
    art["x"] = hostile_payload(marker)
    torch.save(art, tmp / "teacher.pt")
    return Case(["export", tmp / "teacher.pt", "--format", "onnx", "--out", tmp / "m.onnx"],
                ("holds pickled Python objects", "save a plain state dict"), [tmp / "m.onnx"], markers=[marker])


def ex_reduced_teacher(tmp: Path, fx: Fx) -> Case:
    torch.save({"kind": "reduced_teacher", "state_dict": {}, "num_classes": 10}, tmp / "reduced_teacher.pt")
    return Case(["export", tmp / "reduced_teacher.pt", "--format", "onnx", "--out", tmp / "m.onnx"],
                ("not a reducedmpl teacher or student artifact", "pass the teacher.pt or student.pt"),
                [tmp / "m.onnx"])


def run_missing_pipeline(tmp: Path, fx: Fx) -> Case:
    return Case(run_args(tmp / "nope.yaml", tmp), ("nope.yaml does not exist", "check the path"),
                [tmp / "runs"])


def run_not_mapping(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", "- train_large\n- distill\n")
    return Case(run_args(p, tmp), ("must hold a mapping of sections", "see pipelines/digits.yaml"), [tmp / "runs"])


def run_invalid_yaml(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", "name: x\ndistill: {steps: 3\n")
    return Case(run_args(p, tmp), ("is not valid YAML at line", "fix the YAML syntax"), [tmp / "runs"])


def run_malformed_set(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", (REPO / "pipelines" / "digits.yaml").read_text())
    return Case(run_args(p, tmp, "--set", "distill.steps"), ("is not of the form key=value", "write it like --set"),
                [tmp / "runs"])


def run_python_object(tmp: Path, fx: Fx) -> Case:
    marker = tmp / "PWNED"
    p = write_yaml(tmp / "p.yaml", f'name: evil\ndistill: !!python/object/apply:os.system ["touch {marker}"]\n')
    return Case(run_args(p, tmp), ("python/object/apply:os.system", "plain YAML"), [tmp / "runs"], markers=[marker])


def run_python_name(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", "name: !!python/name:os.system\n")
    return Case(run_args(p, tmp), ("python/name:os.system", "plain YAML"), [tmp / "runs"])


def run_stage_data_not_mapping(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", "name: x\ndata: {source: digits}\ntrain_large: {data: 3}\n")
    return Case(run_args(p, tmp), ("train_large.data must be a mapping (got 3)", "write it as a YAML section"),
                [tmp / "runs"])


def run_compare_runs_not_a_list(tmp: Path, fx: Fx) -> Case:
    """The fix holds square brackets, which the console must print as they are (not as markup)."""
    p = write_yaml(tmp / "p.yaml", "name: x\ncompare: {runs: 3}\n")
    return Case(run_args(p, tmp), ("compare.runs must be a list (got 3)", "write it as [a, b, ...]"), [tmp / "runs"])


def run_missing_data(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", f"name: x\ndata: {{source: 'mnist:{tmp / 'no-mnist'}'}}\n"
                                   "train_large: {model: test_resnet}\n")
    return Case(run_args(p, tmp), ("no-mnist does not exist", "point it at your data"), [tmp / "runs"])


def run_yaml_alias_bomb(tmp: Path, fx: Fx) -> Case:
    p = write_yaml(tmp / "p.yaml", alias_bomb().replace("bomb:", "name:"))
    return Case(run_args(p, tmp), ("aliases expand to more than 10,000 values", "fewer anchors and aliases"),
                [tmp / "runs"])


# ---------------------------------------------------------------------------------------------- report
def report_not_a_run(tmp: Path, fx: Fx) -> Case:
    (tmp / "folder").mkdir()
    return Case(["report", tmp / "folder"], ("holds no index.json", "pass a run folder written by `reducedmpl run`"),
                [tmp / "folder" / "report"])


def report_missing_folder(tmp: Path, fx: Fx) -> Case:
    return Case(["report", tmp / "nope"], ("holds no index.json", "pass a run folder"), [tmp / "nope"])


def report_corrupt_index(tmp: Path, fx: Fx) -> Case:
    (tmp / "run").mkdir()
    (tmp / "run" / "index.json").write_text("{not json")
    return Case(["report", tmp / "run"], ("cannot read", "index.json", "run the pipeline again"),
                [tmp / "run" / "report"])


def report_index_not_a_run_index(tmp: Path, fx: Fx) -> Case:
    (tmp / "run").mkdir()
    (tmp / "run" / "index.json").write_text('{"name": "x", "stages": [{"stage": "distill"}]}')
    return Case(["report", tmp / "run"], ("is not an index written by `reducedmpl run`", "run the pipeline again"),
                [tmp / "run" / "report"])


def report_corrupt_result(tmp: Path, fx: Fx) -> Case:
    run = tmp / "run"
    (run / "d").mkdir(parents=True)
    (run / "index.json").write_text('{"name": "x", "stages": [{"label": "distill-kd-0", "stage": "distill", '
                                    '"key": "k", "folder": "d", "run": "kd", "mode": "kd", "seed": 0}]}')
    (run / "d" / "result.json").write_text('{"test_acc": 0.')  # torn write
    return Case(["report", run], ("cannot read", "result.json", "run the pipeline again"), [run / "report"])


# ---------------------------------------------------------------------------------------------- third round
# 1. the message names the real cause
def nan_teacher(fx: Fx, tmp: Path) -> Path:
    """The tiny teacher with every float weight NaN (a valid artifact otherwise)."""
    art = teacher_artifact(fx)
    art["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                         for k, v in art["state_dict"].items()}
    torch.save(art, tmp / "nan.pt")
    return tmp / "nan.pt"


NAN = ("NaN/Inf weight values", "retrain it")


def di_online_kd_nan_teacher(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    args = _distill(fx.targets, out)
    args[args.index("kd")] = "online-kd"
    return Case([*args, "--teacher", nan_teacher(fx, tmp)], NAN, bad)


def ex_nan_onnx(tmp: Path, fx: Fx) -> Case:
    return Case(["export", nan_teacher(fx, tmp), "--format", "onnx", "--out", tmp / "m.onnx"], NAN,
                [tmp / "m.onnx", tmp / "m.onnx.json"])


def ex_nan_safetensors(tmp: Path, fx: Fx) -> Case:
    return Case(["export", nan_teacher(fx, tmp), "--format", "safetensors", "--out", tmp / "m.safetensors"], NAN,
                [tmp / "m.safetensors", tmp / "m.safetensors.json"])


def pc_nan_teacher(tmp: Path, fx: Fx) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", nan_teacher(fx, tmp), "--out", out, "--quiet"], NAN, stores=stores)


def unwritable_folder(tmp: Path, fx: Fx) -> Path:
    """A folder nothing can be written into: immutable (``chattr +i``, which binds root too) or, for a user
    without that right, read-only by its mode; the case is skipped where neither holds."""
    import subprocess

    folder = tmp / "locked"
    folder.mkdir()
    undo = []
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
    fx.request.addfinalizer(lambda: subprocess.run(undo, capture_output=True) if undo else folder.chmod(0o755))
    try:
        (folder / "probe").write_text("")
    except OSError:
        return folder
    pytest.skip("no folder can be made unwritable here")


def _unwritable_export(fmt: str, suffix: str) -> Callable[[Path, Fx], Case]:
    def build(tmp: Path, fx: Fx) -> Case:
        out = unwritable_folder(tmp, fx) / f"m{suffix}"
        return Case(["export", fx.teacher, "--format", fmt, "--out", out], (f"cannot write {out}", "writable"),
                    [out, out.with_name(out.name + ".json")], unchanged=[fx.teacher])
    build.__name__ = f"ex_unwritable_{fmt}"
    return build


ex_unwritable_torchscript = _unwritable_export("torchscript", ".pt")
ex_unwritable_safetensors = _unwritable_export("safetensors", ".safetensors")
ex_unwritable_onnx = _unwritable_export("onnx", ".onnx")


def pc_unwritable(tmp: Path, fx: Fx) -> Case:
    out = unwritable_folder(tmp, fx) / "targets.h5"
    return Case(["precompute", "--teacher", fx.teacher, "--out", out, "--quiet"], (f"cannot write {out}", "writable"),
                [out])


def tl_unwritable(tmp: Path, fx: Fx) -> Case:
    out = unwritable_folder(tmp, fx)
    return Case(["train-large", "--data", "digits", *FAST, "--overwrite", "--out", out],
                (f"{out}", "writable"), [out / "teacher.pt"])


def tl_resume_random_bytes(tmp: Path, fx: Fx) -> Case:
    """A last.pt of random bytes is damaged, not "pickled objects"; the fix is one the user can apply."""
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "last.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    return Case(["train-large", "--data", "digits", *FAST, "--resume", "--out", run],
                ("resume checkpoint", "is corrupt", "pass --overwrite"), [run / "teacher.pt"],
                unchanged=[run / "last.pt"])


def in_random_bytes(tmp: Path, fx: Fx) -> Case:
    (tmp / "last.pt").write_bytes(b"\x80\x02" + np.random.default_rng(1).bytes(5000))  # a pickle header, then noise
    return Case(["inspect", tmp / "last.pt"], ("is corrupt", "restore it"))


# 2. messages stay short, whatever the input
def tl_set_huge_value(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", "digits", "--set", "model=" + "q" * 120_000, "--out", out],
                ("unknown timm model 'qqq", "timm.list_models"), bad)


def tl_config_huge_value(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "train_large:\n  model: " + "y" * 5_000_000 + "\n")
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--data", "digits", "--out", out],
                ("over the 1 MiB a settings text may hold", "keep settings short"), bad)


def run_aliases_of_a_long_string(tmp: Path, fx: Fx) -> Case:
    """116 KB: one 100 KB string and 4,000 aliases of it (few values, but 400 MB of text once expanded)."""
    p = write_yaml(tmp / "p.yaml", "name: x\ntrain_large:\n  model: [&a " + "z" * 100_000 + ", "
                   + ", ".join(["*a"] * 4000) + "]\n")
    return Case(run_args(p, tmp), ("aliases expand to more than 1,000,000 characters", "fewer anchors and aliases"),
                [tmp / "runs"], max_seconds=10)


# 3. limits count what they claim to count; ranges are checked before allocation
def tl_yaml_plain_20000_keys(tmp: Path, fx: Fx) -> Case:
    cfg = write_yaml(tmp / "c.yaml", "train_large:\n" + "".join(f"  k{i}: 1\n" for i in range(20_000)))
    out, bad = tl_out(tmp)
    return Case(["train-large", "--config", cfg, "--data", "digits", "--out", out],
                ("unknown config key 'train_large.k0'", "valid keys"), bad)


def _npz_with_label(tmp: Path, label: int) -> Path:
    y = np.arange(20) % 4
    y[3] = label
    np.savez(tmp / "d.npz", x=np.zeros((20, 8, 8), np.uint8), y=y)
    return tmp / "d.npz"


def tl_npz_huge_label(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"npz:{_npz_with_label(tmp, 10**9)}", *FAST, "--out", out],
                ("has label 1000000000", "number the classes 0..K-1"), bad, max_seconds=20)


def tl_npz_negative_label(tmp: Path, fx: Fx) -> Case:
    out, bad = tl_out(tmp)
    return Case(["train-large", "--data", f"npz:{_npz_with_label(tmp, -3)}", *FAST, "--out", out],
                ("has label -3", "fix the labels"), bad)


def pc_more_shards_than_rows(tmp: Path, fx: Fx) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", fx.teacher, "--shards", "5000", "--out", out, "--quiet"],
                ("more than the", "rows to store", "choose at most"), [out.parent], stores=stores)


def ex_batch_too_large(tmp: Path, fx: Fx) -> Case:
    return Case(["export", fx.teacher, "--format", "onnx", "--batch", str(10**9), "--out", tmp / "m.onnx"],
                ("--batch 1000000000 would make inputs of", "choose --batch"), [tmp / "m.onnx"], max_seconds=20)


# 4. no setting is silently ignored
def di_augmentation_over_stored_views(tmp: Path, fx: Fx) -> Case:
    master = tmp / "views" / "targets.h5"
    cli("precompute", "--teacher", fx.teacher, "--views", "2", "--out", master, "--quiet")
    out, bad = di_out(tmp)
    return Case(_distill(master, out, "--set", "data.randaugment=rand-m9-n2"),
                ("data.randaugment='rand-m9-n2' would be ignored", "distill.replay_views=false"), bad)


def di_online_kd_other_teacher(tmp: Path, fx: Fx) -> Case:
    art = teacher_artifact(fx)
    art["metrics"] = {**art["metrics"], "note": "another file"}  # a sound teacher, but not the store's
    torch.save(art, tmp / "other.pt")
    out, bad = di_out(tmp)
    args = _distill(fx.targets, out)
    args[args.index("kd")] = "online-kd"
    return Case([*args, "--teacher", tmp / "other.pt"],
                ("is not the teacher that made the store", "pass the teacher the store was computed with"), bad)


def ex_opset_on_torchscript(tmp: Path, fx: Fx) -> Case:
    return Case(["export", fx.teacher, "--format", "torchscript", "--opset", "17", "--out", tmp / "m.pt"],
                ("--opset applies to onnx only", "leave out --opset"), [tmp / "m.pt"])


# 5. no command overwrites its own input
def ex_out_is_the_artifact(tmp: Path, fx: Fx) -> Case:
    shutil.copy2(fx.teacher, tmp / "student.pt")
    return Case(["export", tmp / "student.pt", "--format", "torchscript", "--out", tmp / "student.pt"],
                ("would be overwritten", "choose another --out"), unchanged=[tmp / "student.pt"])


def pc_out_is_the_teacher(tmp: Path, fx: Fx) -> Case:
    """Refused in one line, and the store lock's cleanup prints nothing after it."""
    shutil.copy2(fx.teacher, tmp / "teacher.pt")
    return Case(["precompute", "--teacher", tmp / "teacher.pt", "--out", tmp / "teacher.pt", "--quiet"],
                ("would be overwritten", "choose another --out"), unchanged=[tmp / "teacher.pt"])


def tl_init_is_the_output(tmp: Path, fx: Fx) -> Case:
    out = tmp / "out"
    out.mkdir()
    shutil.copy2(fx.teacher, out / "teacher.pt")
    return Case(["train-large", "--data", "digits", *FAST, "--init", f"checkpoint:{out / 'teacher.pt'}",
                 "--overwrite", "--out", out], ("would be overwritten", "choose another --out"),
                unchanged=[out / "teacher.pt"])


# 6. the outcome is reported truthfully
def ex_opset_no_exporter_writes(tmp: Path, fx: Fx) -> Case:
    return Case(["export", fx.teacher, "--format", "onnx", "--opset", "1", "--out", tmp / "m.onnx"],
                ("--opset 1 is not an ONNX opset the exporters write", "choose an --opset in that range"),
                [tmp / "m.onnx", tmp / "m.onnx.json"])


def pc_teacher_is_a_store(tmp: Path, fx: Fx) -> Case:
    """A targets store named teacher.pt is what its bytes say, and the fix names where a store goes."""
    shutil.copy2(fx.targets, tmp / "teacher.pt")
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", tmp / "teacher.pt", "--out", out, "--quiet"],
                ("is a targets store (HDF5), not a PyTorch checkpoint", "distill --targets"), stores=stores)


def tl_resume_checkpoint_of_another_run(tmp: Path, fx: Fx) -> Case:
    """The folder's history (config.yaml) is of one model; its last.pt of another."""
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: resnet18\nepochs: 1\n")
    torch.save({"config": {"model": "test_resnet", "epochs": 1}, "model": {}, "epoch": 0}, run / "last.pt")
    return Case(["train-large", "--data", "digits", *FAST, "--resume", "--out", run],
                ("belongs to another run than its config.yaml", "--overwrite"), [run / "teacher.pt"],
                unchanged=[run / "last.pt"])


# 7. function matching: mixed views and the online mix
def _pc_mix(tmp: Path, fx: Fx, views: str, mix: str, alpha: str, *fragments: str) -> Case:
    out, stores = pc_out(tmp)
    return Case(["precompute", "--teacher", fx.teacher, "--views", views, "--view-mix", mix, "--mix-alpha", alpha,
                 "--out", out, "--quiet"], fragments, stores=stores)


def pc_view_mix_with_one_view(tmp: Path, fx: Fx) -> Case:
    return _pc_mix(tmp, fx, "1", "mixup", "1", "view_mix=mixup (--view-mix) mixes augmented views", "--views 2 or more")


def pc_mix_alpha_zero(tmp: Path, fx: Fx) -> Case:
    return _pc_mix(tmp, fx, "2", "mixup", "0", "precompute.mix_alpha must be a finite number > 0", "fix the value")


def pc_mix_alpha_not_finite(tmp: Path, fx: Fx) -> Case:
    return _pc_mix(tmp, fx, "2", "mixup", "nan", "precompute.mix_alpha must be a finite number > 0", "fix the value")


def pc_unknown_view_mix(tmp: Path, fx: Fx) -> Case:
    return _pc_mix(tmp, fx, "2", "cutmix", "1", "precompute.view_mix must be one of none, mixup",
                   "use one of the listed values")


def di_online_mix_without_online_kd(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(["distill", "--targets", tmp / "t.h5", "--mode", "kd", "--set", "distill.online_mix=mixup",
                 "--out", out], ("distill.online_mix mixes the batches the large teacher sees", "--mode online-kd"),
                bad)


def di_online_mix_alpha_infinite(tmp: Path, fx: Fx) -> Case:
    out, bad = di_out(tmp)
    return Case(["distill", "--targets", tmp / "t.h5", "--mode", "online-kd", "--set", "distill.online_mix=mixup",
                 "--set", "distill.mix_alpha=.inf", "--out", out],
                ("distill.mix_alpha must be a finite number > 0", "fix the value"), bad)


def di_mixed_views_of_other_rows(tmp: Path, fx: Fx) -> Case:
    """A mixed store whose recorded partner pool is not the rows it holds (here: its policy edited) is refused
    before the run starts: its views could not be rebuilt."""
    master = tmp / "store" / "targets.h5"
    cli("precompute", "--teacher", fx.teacher, "--out", master, "--views", "2", "--view-mix", "mixup", "--splits",
        "labeled,unlabeled", "--quiet")
    for path in [master, *shards_of(master)]:
        with h5py.File(path, "r+") as f:
            policy = json.loads(f.attrs["view_policy"])
            f.attrs["view_policy"] = json.dumps({**policy, "pool_rows": policy["pool_rows"] + 1}, sort_keys=True)
    out, bad = di_out(tmp)
    return Case(_distill(master, out), ("partner rows of the store's mixed views", "rerun `reducedmpl precompute`"),
                [out, *bad])


THIRD_ROUND: list[Callable[[Path, Fx], Case]] = [
    di_online_kd_nan_teacher, ex_nan_onnx, ex_nan_safetensors, pc_nan_teacher, ex_unwritable_torchscript,
    ex_unwritable_safetensors, ex_unwritable_onnx, pc_unwritable, tl_unwritable, tl_resume_random_bytes,
    in_random_bytes, tl_set_huge_value, tl_config_huge_value, run_aliases_of_a_long_string, tl_yaml_plain_20000_keys,
    tl_npz_huge_label, tl_npz_negative_label, pc_more_shards_than_rows, ex_batch_too_large,
    di_augmentation_over_stored_views, di_online_kd_other_teacher, ex_opset_on_torchscript, ex_out_is_the_artifact,
    pc_out_is_the_teacher, tl_init_is_the_output, ex_opset_no_exporter_writes, pc_teacher_is_a_store,
    tl_resume_checkpoint_of_another_run, pc_view_mix_with_one_view, pc_mix_alpha_zero, pc_mix_alpha_not_finite,
    pc_unknown_view_mix, di_online_mix_without_online_kd, di_online_mix_alpha_infinite, di_mixed_views_of_other_rows,
]


# ---------------------------------------------------------------------------------------------- the matrix
def outside_store(fx: Fx, tmp: Path) -> Path:
    """A master in ``tmp/store`` whose virtual datasets read a (real, complete) shard in ``tmp/elsewhere``."""
    src = fx.targets
    (tmp / "elsewhere").mkdir()
    for shard in shards_of(src):
        shutil.copy2(shard, tmp / "elsewhere" / shard.name)
    folder = tmp / "store"
    folder.mkdir()
    master = folder / "targets.h5"
    with h5py.File(src, "r") as old, h5py.File(master, "w", libver=("v110", "latest")) as new:
        for name, ds in old.items():
            layout = h5py.VirtualLayout(shape=ds.shape, dtype=ds.dtype)
            for vm in ds.virtual_sources():
                sel = vm.vspace.get_select_bounds()
                start, stop = sel[0][0], sel[1][0] + 1
                layout[start:stop] = h5py.VirtualSource(f"../elsewhere/{vm.file_name}", vm.dset_name,
                                                        shape=(stop - start,) + ds.shape[1:], dtype=ds.dtype)
            new.create_virtual_dataset(name, layout)
        for key, value in old.attrs.items():
            new.attrs[key] = value
    with h5py.File(master, "r") as f:  # the hostile file really works in plain h5py
        assert f["id"].shape[0] > 0 and np.isfinite(f["logits"][:5]).all()
    return master


BUILDERS: list[Callable[[Path, Fx], Case]] = [
    tl_yaml_unknown_key, tl_yaml_wrong_type, tl_yaml_unknown_section, tl_yaml_section_not_mapping,
    tl_yaml_data_not_mapping, tl_negative_lr, tl_negative_epochs,
    tl_empty_folder, tl_empty_npz, tl_too_many_labels, tl_unreadable_image, tl_truncated_idx, tl_truncated_gzip_idx,
    tl_truncated_cifar, tl_unknown_model, tl_init_other_arch, tl_init_truncated, tl_init_missing,
    tl_init_other_class_count, tl_init_hostile, tl_out_holds_run, tl_out_holds_unfinished_run, tl_resume_nothing, tl_resume_finished,
    tl_resume_hostile, tl_device_cuda, tl_bad_device_name, tl_unknown_source_prefix, tl_missing_data_path,
    tl_yaml_python_object, tl_yaml_python_name, tl_set_python_tag, tl_malformed_set,
    tl_yaml_alias_bomb, tl_set_alias_bomb, tl_folder_symlink_loop, tl_folder_duplicate_file, tl_folder_hard_link,
    tl_folder_linked_under_two_classes, tl_folder_empty_image,
    tl_model_too_small_input, tl_pretrained_unknown_name, tl_pretrained_unknown_tag, tl_pretrained_not_in_cache,
    tl_pretrained_head_never_trained, tl_bad_init, tl_hf_missing_column, tl_hf_label_outside_classes, tl_hf_undecodable_image,
    tl_hf_hub_dataset_not_in_cache, tl_hf_hub_dataset_without_the_config,
    tl_wds_missing_cls, tl_wds_undecodable_image, tl_wds_undecodable_image_in_a_worker,
    tl_wds_pattern_matches_nothing,
    pc_topk_too_large, pc_negative_topk, pc_teacher_truncated, pc_teacher_other_arch, pc_checkpoint_other_arch,
    pc_teacher_hostile, pc_checkpoint_hostile, pc_class_count, pc_out_holds_other_store, pc_no_teacher,
    pc_second_writer, pc_note_then_error, pc_raw_pickle_teacher,
    di_other_data, di_missing_shard, di_master_without_shards, di_incomplete_master, di_unknown_schema,
    di_nan_logits, di_not_hdf5, di_teacher_as_targets, di_missing_store, di_outside_store_folder, di_negative_steps,
    di_unknown_mode, di_resume_nothing, di_resume_hostile, di_class_count, di_class_names_order,
    di_student_too_small_input, di_student_head_without_reset, di_student_input_size_too_small,
    di_student_pretrained_not_in_cache, di_views_of_one_size_for_another, di_wds_shard_changed,
    in_missing, in_missing_store, in_not_artifact, in_plain_state_dict, in_truncated, in_hostile,
    ex_targets_store, ex_truncated, ex_unknown_format, ex_hostile, ex_reduced_teacher,
    run_missing_pipeline, run_not_mapping, run_invalid_yaml, run_malformed_set, run_python_object, run_python_name,
    run_missing_data, run_stage_data_not_mapping, run_compare_runs_not_a_list, run_yaml_alias_bomb,
    report_not_a_run, report_missing_folder, report_corrupt_index, report_index_not_a_run_index,
    report_corrupt_result, *THIRD_ROUND,
]


def assert_no_acceptable_artifact(case: Case, before: dict[Path, str]) -> None:
    for path in case.forbidden:
        assert not path.exists(), f"{path} was left behind"
    for store in case.stores:
        if store.exists():
            with pytest.raises(UserError):
                TargetStore.open(store, memory_budget_bytes=0).close()
    for path, digest in before.items():
        assert path.exists() and sha(path) == digest, f"{path} was changed"
    for marker in case.markers:
        assert not marker.exists(), f"hostile code ran: {marker} was created"


@pytest.mark.parametrize("build", BUILDERS, ids=[b.__name__ for b in BUILDERS])
def test_bad_input_is_one_line_error(build, tmp_path, request):
    case = build(tmp_path, Fx(request))
    assert len(case.fragments) >= 2, "check a fragment of the problem and one of the fix"
    before = {p: sha(p) for p in case.unchanged}
    t0 = time.perf_counter()
    result = cli(*case.argv, check=False)
    seconds = time.perf_counter() - t0
    assert "Traceback" not in result.stdout + result.stderr and "Exception ignored" not in result.stderr
    assert_one_line_error(result, *case.fragments)
    assert len(result.stderr.strip().encode()) <= MESSAGE_MAX_BYTES, result.stderr
    assert case.max_seconds is None or seconds < case.max_seconds, seconds
    assert_no_acceptable_artifact(case, before)


def test_the_matrix_covers_every_command():
    commands = {"tl": "train-large", "pc": "precompute", "di": "distill", "in": "inspect", "ex": "export",
                "run": "run", "report": "report"}
    assert len(BUILDERS) >= 30
    assert {b.__name__.split("_")[0] for b in BUILDERS} == set(commands)


# ---------------------------------------------------------------------------------------------- hostile files
def test_inspect_calls_a_store_with_the_data_s_classes_in_another_order_unsound(tiny_targets, tmp_path):
    master = reordered_class_names(SimpleNamespace(targets=tiny_targets), tmp_path)
    r = cli("inspect", master, check=False)
    assert r.exit_code == 1 and "Traceback" not in r.stdout + r.stderr, (r.stdout, r.stderr)
    assert "other class names than the data" in " ".join(r.stdout.split())
    assert cli("inspect", tiny_targets).exit_code == 0  # the store as written is sound


def test_two_precompute_runs_into_one_store_at_once(tiny_teacher, tmp_path):
    """Started together: one writes the store; the other refuses in one line while the first holds the lock, or
    finds the store finished. Nobody deletes the other's shards; the store is sound."""
    from conftest import cli_subprocess

    out = tmp_path / "store" / "targets.h5"
    args = ["precompute", "--teacher", tiny_teacher, "--out", out, "--shards", "4", "--batch-size", "64", "--quiet"]
    procs = [cli_subprocess(*args) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for rc, stdout, stderr in results:
        assert "Traceback" not in stdout + stderr and "leftover" not in stdout + stderr, stderr
        assert rc == 0 or (rc == 2 and stderr.strip().splitlines() == [stderr.strip()]
                           and "another precompute is writing" in stderr), (rc, stderr)
    assert sorted(r[0] for r in results)[0] == 0
    TargetStore.open(out, memory_budget_bytes=0).close()


def test_resume_refuses_a_changed_file_list(tmp_path, monkeypatch):
    """A run on a folder stopped inside an epoch; then an image is deleted: --resume refuses in one line."""
    import signal

    from reducedmpl.data.loading import Batcher

    root = image_folder(tmp_path / "data", per_class=6)
    args = ["train-large", "--data", f"folder:{root}", "--model", "test_resnet", "--epochs", "3", "--batch-size", "2",
            "--quiet", "--set", "data.input_size=8", "--out", tmp_path / "out"]
    original, calls = Batcher.batch, []

    def ctrl_c_at_the_third_batch(self, epoch, b):
        calls.append(b)
        if self.train and len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, epoch, b)

    monkeypatch.setattr(Batcher, "batch", ctrl_c_at_the_third_batch)
    assert cli(*args, check=False).exit_code == 130
    monkeypatch.undo()
    assert (tmp_path / "out" / "last.pt").exists()
    (root / "dog" / "2.png").unlink()
    assert_one_line_error(cli(*args, "--resume", check=False), "the data changed since the run in",
                          "restore the data as it was")
    assert not (tmp_path / "out" / "teacher.pt").exists()


def test_a_distill_refused_for_nan_leaves_no_run_to_resume(tiny_targets, tmp_path):
    out = tmp_path / "out"
    r = cli(*_distill(tiny_targets, out, "--set", "student_optim.lr=1.0e+30"), check=False)
    assert_one_line_error(r, "the student's loss became", "lower the learning rate")
    assert not any((out / n).exists() for n in ("last.pt", "config.yaml", "student.pt"))
    cli(*_distill(tiny_targets, out))  # a plain rerun with a sane learning rate, no --resume or --overwrite
    assert (out / "student.pt").exists()


def test_inspect_refuses_a_store_reading_outside_its_folder(tiny_targets, tmp_path):
    """inspect reports the store as unsound (exit 1: its documented code for a broken artifact), never reads it."""
    master = outside_store(SimpleNamespace(targets=tiny_targets), tmp_path)
    r = cli("inspect", master, check=False)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    assert "outside the store folder" in " ".join(r.stdout.split())
    r = cli("inspect", master, "--json", check=False)
    assert r.exit_code == 1 and "outside the store folder" in r.stdout


def test_yaml_tags_never_run_code(tmp_path):
    """A python tag in a pipeline, a stage config or a --set value is refused and its code never runs."""
    marker = tmp_path / "PWNED"
    for i, text in enumerate([f'!!python/object/apply:os.system ["touch {marker}"]\n',
                              f'name: !!python/object/apply:os.system ["touch {marker}"]\n',
                              f'distill: {{steps: !!python/object/apply:os.system ["touch {marker}"]}}\n',
                              'precompute: {dtype: !!python/name:os.system }\n']):
        p = write_yaml(tmp_path / f"p{i}.yaml", text)
        assert_one_line_error(cli("run", p, "--out-root", tmp_path / "runs", "--dry-run", check=False), "plain YAML")
        assert_one_line_error(cli("distill", "--targets", tmp_path / "t.h5", "--config", p, check=False), "plain YAML")
    r = cli("distill", "--targets", tmp_path / "t.h5", "--set", f'steps=!!python/object/apply:os.system ["touch {marker}"]',
            check=False)
    assert_one_line_error(r, "distill.steps must be of type int")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- source guards
PACKAGE = REPO / "reducedmpl"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, node.func.value.id, node.func.attr


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_load_in_the_package_is_safe():
    """Every torch.load uses weights_only=True, every YAML read yaml.safe_load, every np.load allow_pickle=False;
    nothing calls pickle.load(s) or imports a loader under another name (a cheap guard against regressions)."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    seen = {"torch.load": 0, "yaml.safe_load": 0}
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "yaml", "pickle", "dill", "marshal"):
                names = {a.name for a in node.names}
                if names & {"load", "loads", "unsafe_load", "full_load", "Unpickler", "UnsafeLoader", "Loader",
                            "FullLoader"}:
                    problems.append(f"{where}:{node.lineno}: from {node.module} import {sorted(names)}")
            if isinstance(node, ast.Import) and any(a.name in ("dill", "marshal", "shelve", "jsonpickle")
                                                    for a in node.names):
                problems.append(f"{where}:{node.lineno}: imports an unsafe deserialiser")
        for call, mod, attr in _calls(tree):
            line = f"{where}:{call.lineno}"
            if mod == "torch" and attr == "load":
                seen["torch.load"] += 1
                if _kw(call, "weights_only") is not True:
                    problems.append(f"{line}: torch.load without weights_only=True")
            if mod == "yaml" and attr in ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load",
                                          "full_load_all"):
                problems.append(f"{line}: yaml.{attr} (use yaml.safe_load)")
            if mod == "yaml" and attr in ("Loader", "UnsafeLoader", "FullLoader"):
                problems.append(f"{line}: yaml.{attr} (use yaml.SafeLoader)")
            if mod == "yaml" and attr in ("safe_load", "SafeLoader"):
                seen["yaml.safe_load"] += 1
            if mod == "pickle" and attr in ("load", "loads"):
                problems.append(f"{line}: pickle.{attr} (unpickle only with a restricted Unpickler)")
            if mod in ("np", "numpy") and attr == "load" and _kw(call, "allow_pickle") is not False:
                problems.append(f"{line}: np.load without allow_pickle=False")
    assert not problems, "\n".join(problems)
    assert seen["torch.load"] >= 2 and seen["yaml.safe_load"] >= 2, seen
    # the one pickle reader (CIFAR batches) imports nothing but numpy's array rebuilders
    from reducedmpl.data import cifar

    assert set(cifar._PICKLE_ALLOWED) <= {("numpy.core.multiarray", "_reconstruct"),
                                            ("numpy._core.multiarray", "_reconstruct"),
                                            ("numpy", "ndarray"), ("numpy", "dtype")}


def test_a_wrong_targets_file_is_reported_once_under_torchrun(tiny_teacher, tmp_path, monkeypatch):
    """Every rank opens the same --targets file: only rank 0 prints the error, the others exit 2 silently."""
    args = _distill(tiny_teacher, tmp_path / "out")
    monkeypatch.setenv("RANK", "1")
    r = cli(*args, check=False)
    assert r.exit_code == 2 and r.stderr.strip() == ""
    monkeypatch.setenv("RANK", "0")
    assert_one_line_error(cli(*args, check=False), "is a teacher artifact")
