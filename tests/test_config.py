import pytest
import yaml

from reducedmpl.config import TrainLargeConfig, apply_overrides, from_dict, parse_override, stage_config
from reducedmpl.errors import ConfigError


def write(tmp_path, doc) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_defaults_validate():
    cfg = stage_config("train_large")
    assert isinstance(cfg, TrainLargeConfig) and cfg.data.source == "digits"


def test_file_then_set_then_flags(tmp_path):
    path = write(tmp_path, {"data": {"source": "digits", "labeled_per_class": 5},
                            "train_large": {"epochs": 7, "optim": {"lr": 0.01}}})
    cfg = stage_config("train_large", path, ["train_large.epochs=9", "optim.opt=sgd", "data.split_seed=3"],
                       {"epochs": 11, "model": None})
    assert cfg.epochs == 11  # flag beats --set beats file
    assert cfg.optim.lr == 0.01 and cfg.optim.opt == "sgd"
    assert cfg.data.labeled_per_class == 5 and cfg.data.split_seed == 3
    assert cfg.model == "resnet18"  # a flag left unset keeps the file/default value


@pytest.mark.parametrize("doc, fragment", [
    ({"train_large": {"epoch": 3}}, "did you mean 'epochs'"),
    ({"train_large": {"optim": {"lrr": 3}}}, "did you mean 'lr'"),
    ({"data": {"sorce": "digits"}}, "did you mean 'source'"),
    ({"train_lage": {}}, "did you mean 'train_large'"),
    ({"train_large": {"epochs": "three"}}, "must be of type int"),
    ({"train_large": {"epochs": 2.5}}, "must be of type int"),
    ({"train_large": {"ema": "yes"}}, "must be of type bool"),
    ({"train_large": {"optim": {"lr": -0.1}}}, "lr must be > 0"),
    ({"train_large": {"optim": {"sched": "linear"}}}, "must be one of"),
    ({"train_large": {"init": "imagenet"}}, "scratch"),
    ({"data": {"labeled_per_class": 3, "labeled_fraction": 0.5}}, "only one of"),
    ({"data": {"randaugment": "augmix"}}, "rand-m9-n2"),
    ({"train_large": {"device": "tpu"}}, "device"),
])
def test_bad_config_names_the_problem(tmp_path, doc, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        stage_config("train_large", write(tmp_path, doc))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_float_accepts_int_and_optional():
    cfg = from_dict(TrainLargeConfig, {"optim": {"lr": 1}, "clip_grad": None})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=mnist:/x/y") == (["a"], "mnist:/x/y")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_yaml_is_parsed_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("train_large: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        stage_config("train_large", p)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        stage_config("train_large", tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        stage_config("train_large", p)


def test_resume_with_other_settings_names_the_keys_that_differ(tmp_path):
    from reducedmpl.engine.runs import _differing_keys

    a = {"seed": 0, "optim": {"lr": 0.1, "opt": "sgd"}, "data": {"source": "digits"}, "targets": "/a"}
    b = {"seed": 1, "optim": {"lr": 0.2, "opt": "sgd"}, "data": {"source": "digits"}, "targets": "/b", "new": 1}
    assert _differing_keys(a, b) == ["new", "optim.lr", "seed", "targets"]
    assert _differing_keys(a, b, ignore=("targets",)) == ["new", "optim.lr", "seed"]


def test_a_partial_nested_section_keeps_the_fields_own_defaults():
    """distill.student_optim defaults to SGD momentum at lr 0.05; setting only its optimizer must not fall back to
    OptimConfig's class defaults (lr 1e-3, weight decay 0.05)."""
    cfg = stage_config("distill", overrides=["distill.student_optim.opt=nesterov"])
    assert cfg.student_optim.opt == "nesterov"
    assert cfg.student_optim.lr == 0.05 and cfg.student_optim.weight_decay == 5e-4
    teacher = stage_config("distill", overrides=["distill.teacher_optim.lr=1.0e-4"]).teacher_optim
    assert teacher.lr == 1e-4 and teacher.opt == "adam" and teacher.weight_decay == 0.0 and teacher.sched == "constant"
