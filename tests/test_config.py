"""Config composition and validation: every shipped file composes; bad input fails fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from resnet_train.config import validate
from resnet_train.errors import ConfigError
from tests.conftest import REPO, SMOKE, compose_config, run_cli

GROUP_FILES = sorted((path.parent.name, path.stem) for path in (REPO / "configs").glob("*/*.yaml"))


def test_every_group_has_options():
    groups = {group for group, _ in GROUP_FILES}
    assert groups == {"model", "data", "optim", "schedule", "trainer", "experiment"}


@pytest.mark.parametrize(("group", "option"), GROUP_FILES)
def test_every_config_file_composes_and_validates(group, option):
    cfg = compose_config(f"{group}={option}")
    validate(cfg)
    if group in ("model", "data", "optim", "schedule"):
        assert cfg[group].name == option


def test_user_line_composes_resnet18_on_cifar10():
    cfg = compose_config("model=resnet18", "data=cifar10")
    validate(cfg)
    assert (cfg.model.name, cfg.data.name, cfg.data.valid_ratio) == ("resnet18", "cifar10", 0.1)


def test_experiment_overrides_groups():
    cfg = compose_config("experiment=cifar10_resnet56")
    assert (cfg.model.name, cfg.data.name, cfg.trainer.epochs) == ("resnet56", "cifar10", 182)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr=-1.0 is invalid: must be > 0"),
        ("optim.lr=0", "optim.lr=0.0 is invalid: must be > 0"),
        ("data.valid_ratio=1.5", "data.valid_ratio=1.5 is invalid: must be in [0, 1)"),
        ("data.valid_ratio=-0.1", "data.valid_ratio=-0.1 is invalid"),
        ("trainer.epochs=0", "trainer.epochs=0 is invalid: must be >= 1"),
        ("data.batch_size=0", "data.batch_size=0 is invalid"),
        ("model.name=resnet19", "model.name='resnet19' is invalid: allowed: "),
        ("model.stem=vgg", "model.stem='vgg' is invalid: allowed: cifar, imagenet"),
        ("schedule.name=linear", "schedule.name='linear' is invalid: allowed: constant, step"),
        ("trainer.label_smoothing=1", "trainer.label_smoothing=1.0 is invalid"),
        ("trainer.device=tpu", "trainer.device='tpu' is invalid"),
        ("trainer.device=cuda:99", "trainer.device='cuda:99' is invalid"),
        ("data.augment.crop=zoom", "data.augment.crop='zoom' is invalid"),
        ("model.shortcut=C", "model.shortcut='C' is invalid: allowed: A, B, none"),
        ("model.dropout=1.0", "model.dropout=1.0 is invalid: must be in [0, 1)"),
        ("task=eval", "task='eval' is invalid: allowed: train, summary"),
    ],
)
def test_out_of_range_values_name_key_value_and_allowed(override, message):
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert message in str(error.value)


def test_misspelt_key_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("model.depht=18")
    assert "depht" in str(error.value.__cause__ or error.value)


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)) as error:
        compose_config("optim.lr=abc")
    assert "lr" in str(error.value.__cause__ or error.value)


def test_unknown_group_option_is_rejected():
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("model=resnet19")
    assert "resnet19" in str(error.value)


def test_schema_rejects_unknown_key_in_a_yaml_file(tmp_path):
    from omegaconf import OmegaConf

    from resnet_train.config import TrainConfig

    schema = OmegaConf.structured(TrainConfig)
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {"data": {"valid_ration": 0.1}})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=-1", "optim.lr=-1.0 is invalid: must be > 0"),
        ("data.valid_ratio=1.5", "data.valid_ratio=1.5 is invalid: must be in [0, 1)"),
        ("model=resnet19", "model=resnet19 is invalid: allowed: plain110, plain18"),
        ("model.name=resnet19", "model.name='resnet19' is invalid: allowed: plain110"),
        (
            "model.depht=18",
            "model.depht is not a config key: allowed in model: name, stem, num_classes",
        ),
        ("+trainer.epoch=3", "trainer.epoch is not a config key: allowed in trainer: epochs"),
        ("optim.lr=abc", "optim.lr=abc is invalid: Value 'abc' of type 'str' could not be"),
        ("trainer.epochs=1.5", "trainer.epochs=1.5 is invalid"),
        ("data.root=nowhere", "cifar10 not found: nowhere/cifar-10-batches-py/data_batch_1"),
    ],
)
def test_cli_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, override, expected):
    data = [] if override.startswith("data.root") else SMOKE
    result = run_cli(*data, "data.download=false", override, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"resnet-train: error: {result.stderr[21:].strip()}"]
    assert expected in result.stderr
    # Nothing was written: no run directory, so no checkpoint.
    assert list(Path(tmp_path).iterdir()) == []


def test_cli_config_errors_are_one_line(tmp_path):
    result = run_cli(*SMOKE, "optim.lr=-1", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2
    assert lines == ["resnet-train: error: optim.lr=-1.0 is invalid: must be > 0"]


def test_cli_help_lists_groups_and_options(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for line in (
        "data: cifar10, cifar100, imagenet, synthetic",
        "schedule: constant, cosine, cosine_restarts, multistep, onecycle, step",
        "optim: adamw, sgd",
    ):
        assert line in result.stdout
    assert "resnet18" in result.stdout and "resnet110" in result.stdout


def test_cli_cfg_job_prints_composed_config(tmp_path):
    result = run_cli(
        "--cfg", "job", "model=resnet18", "data=cifar10", "optim.lr=0.05", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    from omegaconf import OmegaConf

    printed = OmegaConf.create(result.stdout)
    assert printed.model.name == "resnet18"
    assert printed.data.name == "cifar10"
    assert printed.optim.lr == 0.05
    assert not (tmp_path / "outputs").exists()
