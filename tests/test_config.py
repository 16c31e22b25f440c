"""Config composition and validation: every shipped file composes; bad input fails fast."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from resnet_train.config import validate
from resnet_train.errors import ConfigError
from tests.conftest import REPO, SMOKE, compose_config, compose_hydra, run_cli, run_dir_name

GROUP_FILES = sorted((path.parent.name, path.stem) for path in (REPO / "configs").glob("*/*.yaml"))


def test_every_group_has_options():
    groups = {group for group, _ in GROUP_FILES}
    assert groups == {"model", "data", "optim", "schedule", "trainer", "experiment"}


@pytest.mark.parametrize(("group", "option"), GROUP_FILES)
def test_every_config_file_composes_and_validates(group, option):
    """A distillation recipe asks for its teacher on the command line; null trains the student
    alone (its baseline). A fine-tuning recipe asks for its weights, data=imagefolder for the
    folder of the images."""
    given: list[str] = []
    cfg = compose_config(f"{group}={option}")
    if cfg.trainer.distill.teacher == "REQUIRED":
        with pytest.raises(ConfigError, match=r"^trainer.distill.teacher='REQUIRED' is invalid: "
                           r"this experiment distils: give the teacher's weights"):  # fmt: skip
            validate(cfg)
        given.append("trainer.distill.teacher=null")
    if cfg.model.weights == "REQUIRED":
        with pytest.raises(ConfigError, match=r"^model.weights='REQUIRED' is invalid: this "
                           r"experiment fine-tunes: give the pretrained weights"):  # fmt: skip
            validate(cfg)
        given.append(f"model.weights={__file__}")
    if cfg.data.root is None:
        with pytest.raises(ConfigError, match=r"^data.root=null is invalid: data=imagefolder "
                           r"reads its images from a folder: give data.root=DIR"):  # fmt: skip
            validate(compose_config(f"{group}={option}", *given))
        given.append("data.root=/data/own")
    cfg = compose_config(f"{group}={option}", *given)
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
        ("task=deploy", "task='deploy' is invalid: allowed: train, summary, eval, export"),
        ("seed=-1", "seed=-1 is invalid: must be in [0, 4294967295]"),
        ("seed=99999999999", "seed=99999999999 is invalid: must be in [0, 4294967295]"),
        ("optim.lr=inf", "optim.lr=inf is invalid: must be a finite number"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan is invalid: must be a finite number"),
        ("data.augment.mixup_alpha=inf", "data.augment.mixup_alpha=inf is invalid: must be a fin"),
        ("optim.betas=[0.9,inf]", "optim.betas=[0.9, inf] is invalid: must be a finite number"),
        ("data.image_size=64", "data.image_size=64 is invalid: data=cifar10 has images of 32x32"),
        ("data.batch_size=1", "data.batch_size=1 is invalid: must be >= 2: BatchNorm cannot"),
        ("data.augment.padding=99", "data.augment.padding=99 is invalid: must be in [0, 32]"),
        ("model.weights=/nowhere.pt", "model.weights='/nowhere.pt' is invalid: no such file"),
        ("resume=''", "resume='' is invalid: auto, the path of a checkpoint, or null"),
        ("model.weights=''", "model.weights='' is invalid: an empty path"),
        (
            "trainer.distill.temperature=1e20",
            "trainer.distill.temperature=1e+20 is invalid: must be in [0.01, 1000]",
        ),
        ("trainer.distill.temperature=1e-45", "trainer.distill.temperature=1e-45 is invalid"),
        (
            "model.freeze=[fc] optim.backbone_lr_mult=0",
            "model.freeze=['fc'] is invalid with "
            "optim.backbone_lr_mult=0: it freezes the classifier",
        ),
        (
            "trainer.compile_mode=fast",
            "trainer.compile_mode='fast' is invalid: allowed: default, "
            "reduce-overhead, max-autotune, max-autotune-no-cudagraphs",
        ),
        (
            "trainer.compile_mode=reduce-overhead",
            "trainer.compile_mode='reduce-overhead' is "
            "invalid: a torch.compile mode needs trainer.compile=true (to train without "
            "compiling, also set trainer.compile_mode=default)",
        ),
    ],
)
def test_out_of_range_values_name_key_value_and_allowed(override, message):
    cfg = compose_config(*override.split(" "))
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
        ("data.root=/nowhere", "cifar10 not found: /nowhere/cifar-10-batches-py/data_batch_1"),
        ("trainer.epochs=null", "trainer.epochs=null is invalid: it needs a value of type int"),
        ("trainer.early_stopping=null",
         "trainer.early_stopping=null is invalid: it is a group of keys (monitor, mode,"),
        ("trainer.epochs=1,2", "'trainer.epochs=1,2': to sweep over the values add -m"),
        ("~trainer.epochs", "~trainer.epochs is invalid: a key of the schema cannot be deleted"),
        ("trainer=null", "a config group takes one of its options' names (group=OPTION)"),
        ("model.weights=.", "model.weights='.' is invalid: is a folder, not a file"),
        ("trainer.deterministic=2", "trainer.deterministic=2 is invalid: allowed: true, false"),
        ("optim.nesterov=yes", "optim.nesterov=yes is invalid: allowed: true, false"),
        ("--cfg job trainer.qat=2", "trainer.qat=2 is invalid: allowed: true, false"),
        ("--cfg job model.freeze=[layer9]", "model.freeze=layer9 is invalid: this model's parts"),
        ("model=plain20 model.zero_init_residual=true",
         "model.zero_init_residual=true is invalid for plain20 without shortcuts"),
        ("--cfg job model=plain20 model.zero_init_residual=true",
         "model.zero_init_residual=true is invalid for plain20 without shortcuts"),
        ("data.mean=[true,1,2]", "is invalid: must be three numbers (R, G, B)"),
        ("data.mean=[125.3,123.0,113.9]", "data.mean=[125.3, 123.0, 113.9] is invalid: pixels "
         "are scaled to [0, 1] before they are normalised: give it on that scale (divided by "
         "255: [0.4914, 0.4824, 0.4467])"),
        ("data.batch_size=99999999999999999999", "data.batch_size=99999999999999999999 is inv"),
        ("model.num_classes=100000000000",
         "model.num_classes=100000000000 is invalid: must be in [1, 100,000]"),
        ("data.num_classes=100000000000",
         "data.num_classes=100000000000 is invalid: must be in [1, 100,000]"),
        ("data.image_size=1000000", "data.image_size=1000000 is invalid: must be in [8, 4,096]"),
        ("data.loader=torch data.augment.randaugment=true data.augment.trivialaugment=true",
         "data.augment.trivialaugment=true is invalid: only one of autoaugment, randaugment"),
        # an empty path would read every image under the current folder
        ("task=predict predict.inputs=", "predict.inputs='' is invalid: task=predict needs the "
         "images: predict.inputs=PATH"),
        # Hydra's lexer takes no unquoted non-ASCII value (it said "LexerNoViableAltException")
        ("name=p-é", "name=p-é is invalid: Hydra reads unquoted values of ASCII characters only; "
         "quote the value (in a shell: \"name='p-é'\")"),
    ],
)  # fmt: skip
def test_cli_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, override, expected):
    data = [] if override.startswith("data.root") else SMOKE
    result = run_cli(*data, "data.download=false", *override.split(" "), "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"resnet-train: error: {result.stderr[21:].strip()}"]
    assert expected in result.stderr
    if override in ("model.depht=18", "data.root=/nowhere"):  # the README shows these whole
        assert result.stderr.strip() in (REPO / "README.md").read_text()
    # Nothing was written: no run directory, so no checkpoint.
    assert list(Path(tmp_path).iterdir()) == []


@pytest.mark.parametrize("value", ["x'y", 'x"y', "a$b'c", "p-é", "back\\slash`", "x'y\\", "a\\'b"])
def test_the_quoting_a_lexer_error_advises_works_in_a_shell(tmp_path, value):
    """Followed as printed, in a shell, the advice gives the value itself (for a value holding a
    quote it advised a quoting that failed again)."""
    import shlex

    result = run_cli(*SMOKE, f"name={value}", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 2
    advice = result.stderr.split("(in a shell: ", 1)[1].rstrip().removesuffix(")")
    command = f"{shlex.quote(sys.executable)} -m resnet_train {' '.join(SMOKE)} {advice} --cfg job"
    shown = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["name"] == value


@pytest.mark.skipif(torch.cuda.is_available(), reason="trainer.device=auto is a GPU here")
def test_sync_batchnorm_on_a_machine_without_cuda_is_refused_however_the_device_is_named(tmp_path):
    for device in ("cpu", "auto"):
        result = run_cli(*SMOKE, f"trainer.device={device}", "trainer.sync_batchnorm=true",
                         cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2 and result.stderr == (
            "resnet-train: error: trainer.sync_batchnorm=true is invalid: SyncBatchNorm runs on "
            f"CUDA devices only, and trainer.device={device} is the CPU here; use false\n"
        )
    assert list(tmp_path.iterdir()) == []


def test_missing_cifar_says_what_data_root_must_hold_or_names_the_parent(tmp_path):
    """data.root naming the batch folder itself (a common slip) gets its parent as the advice;
    a folder without the data gets the layout, never the failing value as an example."""
    from resnet_train.data.cifar import cifar_files
    from resnet_train.errors import DataError

    inner = tmp_path / "cifar-10-batches-py"
    inner.mkdir()
    (inner / "data_batch_1").write_bytes(b"")
    for download in (False, True):  # (never downloads a second copy inside it)
        with pytest.raises(DataError) as e:
            cifar_files("cifar10", inner, train=True, download=download)
        assert (
            f"data.root={inner} holds the batch files themselves: give its parent, "
            f"data.root={tmp_path}" in str(e.value)
        )
        assert list(inner.iterdir()) == [inner / "data_batch_1"]
    other = tmp_path / "cifar10"  # the files in a folder of another name
    other.mkdir()
    (other / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match="they go in a folder named cifar-10-batches-py/ inside "
                       "data.root"):  # fmt: skip
        cifar_files("cifar10", other, train=True, download=True)
    with pytest.raises(DataError) as e:
        cifar_files("cifar10", tmp_path / "empty", train=False, download=False)
    assert str(e.value).endswith(
        "set data.root to the folder that contains cifar-10-batches-py/ (data.root=DIR for "
        "DIR/cifar-10-batches-py/test_batch), or data.download=true to fetch it"
    )


def test_weights_that_do_not_fit_the_model_are_refused_before_the_run_directory(tmp_path):
    """Checked before the run, on a model without storage: the run directory used to be made
    (.hydra/, train.log) before the weights were found not to fit."""
    from resnet_train.models import create_model

    torch.save(create_model("resnet32").state_dict(), tmp_path / "r32.pth")
    result = run_cli(*SMOKE, f"model.weights={tmp_path / 'r32.pth'}", "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"resnet-train: error: model.weights={tmp_path / 'r32.pth'} does not fit this model "
        "(unexpected: layer1.3."
    ), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r32.pth"]  # no run directory
    # an exported model given as weights is named as what it is (it was "unreadable")
    exported = tmp_path / "model.pt2"
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    torch.export.save(program, exported)
    result = run_cli(*SMOKE, f"model.weights={exported}", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip() == (
        f"resnet-train: error: model.weights={exported} is a torch.export program (what "
        "task=export writes), not weights: give a torchvision .pth or a resnet-train checkpoint "
        "(.pt)"
    )


def test_cli_config_errors_are_one_line(tmp_path):
    result = run_cli(*SMOKE, "optim.lr=-1", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2
    assert lines == ["resnet-train: error: optim.lr=-1.0 is invalid: must be > 0"]


def test_cli_help_lists_groups_and_options(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for line in (
        "data: cifar10, cifar100, imagefolder, imagenet, synthetic",
        "schedule: constant, cosine, cosine_restarts, multistep, onecycle, step",
        "optim: adamw, sgd",
    ):
        assert line in result.stdout
    assert "resnet18" in result.stdout and "resnet110" in result.stdout


def test_help_into_a_pipe_its_reader_closed_is_no_traceback(tmp_path):
    """`resnet-train --help | head -1` printed a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "resnet_train", "--help"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # (before it prints: the reader has gone)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_flags_after_an_override_that_another_follows_are_taken(tmp_path):
    """`seed=1 --cfg job model=resnet18` was Hydra's usage page (argparse takes the overrides
    in one run): the flags are moved first."""
    result = run_cli("seed=7", "--cfg", "job", "model=resnet18", "--resolve", "data.root=x",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["seed"] == 7 and printed["model"]["name"] == "resnet18"
    assert printed["data"]["root"] == "x"


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


# Keys that must agree with each other or with the data, each refused by the check that runs
# before a single run starts (the CLI's precheck: composition, validation, the data's size).
SYN = ["data=synthetic", "trainer.device=cpu", "data.test_size=32"]
DISAGREEING = {
    "empty training set": (
        ["data.train_size=100", "data.valid_ratio=0.999"],
        "data.valid_ratio=0.999 is invalid: it leaves 0 of the 100 training images to train on",
    ),
    "empty validation set": (
        ["data.train_size=100", "data.valid_ratio=0.001"],
        "data.valid_ratio=0.001 is invalid: it holds out 0 of the 100 training images",
    ),
    "warm-up in epochs": (
        ["trainer.epochs=3", "schedule.warmup=3"],
        "schedule.warmup=3 is invalid: the warm-up must end before the run does: less than "
        "trainer.epochs=3",
    ),
    "warm-up in steps": (
        ["data.train_size=128", "trainer.epochs=2", "schedule.interval=step", "schedule.warmup=8"],
        "schedule.warmup=8 is invalid: the warm-up must end before the run does, in less than "
        "its 8 optimizer steps (trainer.epochs=2 x 4 steps per epoch",
    ),
    "floor above the scaled rate": (
        ["optim.lr_scaling=linear", "schedule.min_lr=0.05"],
        "schedule.min_lr=0.05 is invalid: the floor must be below the learning rate 0.0125 "
        "(optim.lr=0.1 x global batch 32 / optim.reference_batch=256)",
    ),
    "floor above the rate": (
        ["schedule=cosine_restarts", "schedule.min_lr=0.1"],
        "schedule.min_lr=0.1 is invalid: must be in [0, 0.1)",
    ),
    "mode against the metric": (
        ["trainer.early_stopping.monitor=valid/loss", "trainer.early_stopping.mode=max"],
        "trainer.early_stopping.mode='max' is invalid: valid/loss improves when it goes down",
    ),
    "fewer classifier outputs than classes": (
        ["model.num_classes=5"],
        "model.num_classes=5 is invalid: the data has 10 classes (labels 0 to 9)",
    ),
    "early stopping without validation": (
        ["data.valid_ratio=0", "trainer.early_stopping.patience=3"],
        "trainer.early_stopping.patience=3 is invalid: early stopping watches the validation "
        "set, and data.valid_ratio=0 has none",
    ),
    "EMA selected without EMA": (
        ["trainer.ema.select=ema"],
        "trainer.ema.select='ema' is invalid: there are no EMA weights to select",
    ),
    "momentum cycled by a schedule that does not": (
        ["schedule.cycle_momentum=true"],
        "schedule.cycle_momentum=true is invalid: only schedule=onecycle cycles the momentum",
    ),
    "momentum cycled without momentum": (
        ["schedule=onecycle", "optim.momentum=0", "schedule.cycle_momentum=true"],
        "schedule.cycle_momentum=true is invalid: needs a momentum to cycle",
    ),
}


@pytest.mark.parametrize("case", DISAGREEING)
def test_keys_that_disagree_are_refused_in_one_line_before_anything_is_written(
    case, tmp_path, monkeypatch, capsys
):
    from resnet_train.cli import precheck

    overrides, message = DISAGREEING[case]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        precheck([*SYN, *overrides, "hydra.run.dir=run"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.count("\n") == 1 and err.startswith("resnet-train: error: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train_size=60000"], "data.train_size=60000 is invalid: the cifar10 training set "
                                    "has 200 images; set at most 200, or null for all"),
        (["data.test_size=500"], "data.test_size=500 is invalid: the cifar10 test set has 40"),
        (["data.num_classes=5"], "data.num_classes=5 is invalid: data=cifar10 has 10 classes"),
    ],
)  # fmt: skip
def test_sizes_the_data_set_cannot_give_are_refused(
    overrides, message, cifar10_root, tmp_path, monkeypatch, capsys
):
    from resnet_train.cli import precheck

    root, _ = cifar10_root
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        precheck(["data=cifar10", f"data.root={root}", "trainer.device=cpu", *overrides])
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_num_classes_mismatch_is_one_line_through_the_cli(tmp_path):
    result = run_cli(*SMOKE, "model.num_classes=5", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("resnet-train: error: model.num_classes=5 is invalid")
    assert result.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_early_stopping_mode_follows_the_metric():
    from resnet_train.config import complete

    for monitor, mode in (("valid/acc", "max"), ("valid/loss", "min")):
        cfg = compose_config(f"trainer.early_stopping.monitor={monitor}")
        validate(cfg)
        assert cfg.trainer.early_stopping.mode is None
        assert complete(cfg).trainer.early_stopping.mode == mode


def test_resume_from_a_file_into_a_directory_that_holds_another_run_is_refused(
    tmp_path, monkeypatch, capsys
):
    from resnet_train.cli import precheck
    from resnet_train.engine.trainer import fit

    for name, seed in (("p1", 0), ("p2", 1)):
        fit(compose_config(*SMOKE, "data.train_size=64", f"seed={seed}"), tmp_path / name)
    before = sorted(p.name for p in (tmp_path / "p2").iterdir())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        precheck([*SMOKE, "data.train_size=64", "seed=1", "hydra.run.dir=p2", "trainer.epochs=2",
                  f"resume={tmp_path / 'p1' / 'last.pt'}"])  # fmt: skip
    assert "run directory p2 already holds last.pt, best.pt, metrics.json of another run: " in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cfg", "job", "model.depht=18"], "model.depht is not a config key: allowed in model: "),
        (["--cfg", "job", "optim.lr=-1"], "optim.lr=-1.0 is invalid: must be > 0"),
        (["-c", "all", "--package", "optim", "optim.momentum=2"],
         "optim.momentum=2.0 is invalid: must be in [0, 1)"),
    ],
)  # fmt: skip
def test_printing_a_config_checks_it_as_a_run_would(args, message, monkeypatch, capsys):
    from resnet_train import cli

    monkeypatch.setattr(sys, "argv", ["resnet-train", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"resnet-train: error: {message}") and err.count("\n") == 1
    assert cli.cfg_print_overrides(["--cfg", "job", "optim.lr=0.2"]) == ["optim.lr=0.2"]
    assert cli.cfg_print_overrides(["--help"]) is None
    assert cli.cfg_print_overrides(["-m", "optim.lr=0.1,0.2"]) is None


# --- run directory names ------------------------------------------------------------------------


def test_run_directory_names_are_short_stable_and_differ_for_every_training_change(monkeypatch):
    base = run_dir_name("model=resnet18", "data=cifar10")
    assert re.fullmatch(r"resnet18-cifar10-[0-9a-f]{8}", base)
    # The same config however spelt: order, defaults written out, keys that may change on resume
    same = [
        ("data=cifar10", "model=resnet18"),
        ("model=resnet18", "data=cifar10", "optim.lr=0.1", "seed=0"),
        ("model=resnet18", "data=cifar10", "data.root=/elsewhere", "trainer.epochs=3",
         "trainer.device=cpu", "trainer.checkpoint_every_steps=500", "resume=auto"),
    ]  # fmt: skip
    for overrides in same:
        assert run_dir_name(*overrides) == base, overrides
    # Any key that trains differently: another directory each, with no [ ] , = or spaces in it
    others = [
        ("model=resnet18", "data=cifar10", "optim.lr=0.2"),
        ("model=resnet18", "data=cifar10", "seed=1"),
        ("model=resnet18", "data=cifar10", "schedule=multistep",
         "schedule.milestones=[32000,48000]"),
        ("model=resnet18", "data=cifar10", "data.augment.crop=none"),
        ("model=resnet18", "data=cifar100"),
    ]  # fmt: skip
    names = {run_dir_name(*overrides) for overrides in others}
    assert len(names) == len(others) and base not in names
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in names), names
    # torchrun's process count trains differently (another global batch): its own directory
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_dir_name("model=resnet18", "data=cifar10") != base
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_dir_name("model=resnet18", "data=cifar10") == base
    assert run_dir_name("model=resnet18", "name=baseline") == "baseline"
    evaluation = run_dir_name("task=eval", "model.weights='outputs/r20 [v2]/best.pt'")
    assert re.fullmatch(r"eval-r20_v2-[0-9a-f]{8}", evaluation), evaluation


def test_a_distilled_run_is_named_by_its_teachers_contents_not_its_path(tmp_path):
    """A run distilled from a teacher, one from another teacher and a plain run get three
    directories; the same teacher moved elsewhere (a resume may give its new path) keeps its
    run's directory."""
    first, second = tmp_path / "t1.pt", tmp_path / "t2.pt"
    first.write_bytes(b"teacher one")
    second.write_bytes(b"teacher two")
    plain = run_dir_name("model=resnet20", "data=cifar10")
    kd = run_dir_name("model=resnet20", "data=cifar10", f"trainer.distill.teacher={first}")
    other = run_dir_name("model=resnet20", "data=cifar10", f"trainer.distill.teacher={second}")
    assert len({plain, kd, other}) == 3
    moved = tmp_path / "elsewhere" / "teacher.pt"
    moved.parent.mkdir()
    first.rename(moved)
    assert run_dir_name("model=resnet20", "data=cifar10", f"trainer.distill.teacher={moved}") == kd


def test_each_sweep_gets_a_directory_of_its_own_that_a_relaunch_finds_again(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from resnet_train.config import sweep_name

    def name(*task_overrides: str, params: dict | None = None) -> str:
        cfg = compose_hydra(*SMOKE)
        HydraConfig.instance().set_config(cfg)
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.overrides.task = list(task_overrides)
            cfg.hydra.sweeper.params = params
        return sweep_name(None, _root_=cfg)

    first = name("optim.lr=0.1,0.05", "seed=0")
    assert re.fullmatch(r"resnet20-synthetic-[0-9a-f]{8}", first)
    assert name("seed=0", "optim.lr=0.1,0.05") == first  # the same sweep, other order
    assert name("optim.lr=0.1,0.05", "seed=0", "resume=auto", "data.root=/x") == first
    assert name("optim.lr=0.1,0.2", "seed=0") != first  # another sweep
    # the same jobs in another order, or spelt as a range: the same sweep
    assert name("optim.lr=0.05,0.1", "seed=0") == first
    assert name("seed=6,5") == name("seed=5,6") == name("seed=range(5,7)")
    assert name("seed=5,6,7") != name("seed=5,6")
    # a search keeps its values' order (its study refuses a choice in another order)
    search = {"optim.lr": "interval(0.01, 0.1)"}
    assert name("seed=choice(1,0)", params=search) != name("seed=choice(0,1)", params=search)
    # a sweep begun under the earlier naming (its overrides as spelt) finds its folder again
    canonical = name("seed=6,5")
    monkeypatch.chdir(tmp_path)
    assert name("seed=6,5") == canonical  # (no folder of either name: the canonical one)
    from resnet_train import config

    spelt = {"base": config.training_identity(compose_hydra(*SMOKE)), "overrides": ["seed=6,5"],
             "params": None}  # fmt: skip
    earlier = f"resnet20-synthetic-{config._digest(spelt)}"
    assert earlier != canonical
    (tmp_path / "outputs" / "multirun" / earlier).mkdir(parents=True)
    assert name("seed=6,5") == earlier and name("seed=5,6") == canonical
    assert name(params={"optim.lr": "interval(0.01, 0.1)"}) != name(
        params={"optim.lr": "interval(0.01, 0.5)"}
    )
    assert name("model=resnet20,resnet32").startswith("models-synthetic-")
    # sweeps over other teachers: other folders (by the teachers' contents)
    teachers = []
    for i in range(4):
        teachers.append(tmp_path / f"t{i}.pt")
        teachers[-1].write_bytes(b"teacher %d" % i)
    t = [str(p) for p in teachers]
    first_pair = name(f"trainer.distill.teacher={t[0]},{t[1]}")
    assert first_pair != name(f"trainer.distill.teacher={t[2]},{t[3]}")
    assert first_pair == name(f"trainer.distill.teacher={t[1]},{t[0]}")
    assert sweep_name("depth", _root_=OmegaConf.create({})) == "depth"


def test_yes_no_keys_take_true_false_quoted_or_not_and_interpolations():
    from resnet_train.cli import check_bool_overrides

    check_bool_overrides(["trainer.qat=true", "trainer.qat='false'", "trainer.qat=True",
                          "trainer.qat=${oc.env:QAT,false}", "trainer.epochs=2"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^trainer.qat=1 is invalid: allowed: true, false$"):
        check_bool_overrides(["trainer.qat=1"])


@pytest.mark.parametrize(
    ("swept", "message"),
    [
        ("model.depht=18,19", "model.depht is not a config key: allowed in model: name, stem"),
        ("optim.lr=0.1,abc", "optim.lr=abc is invalid: Value 'abc' of type 'str' could not be"),
        ("model=resnet20,resnet99", "model=resnet99 is invalid: allowed: plain110, plain18"),
        # a value every job would refuse (a search's fixed keys: it ran every trial into it)
        ("optim.lr=-1 seed=0,1", "every job of this sweep would be refused: optim.lr=-1.0 is "
         "invalid: must be > 0"),
    ],
)  # fmt: skip
def test_a_sweeps_bad_key_type_or_option_is_one_line_before_any_job(tmp_path, swept, message):
    """Every value of a sweep is composed before its first job: a bad one is one line, exit 2,
    and no job has run (it was Hydra's many-line message, exit 1, after the jobs before it)."""
    result = run_cli("-m", *SMOKE, "data.train_size=64", *swept.split(), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"resnet-train: error: {result.stderr[21:].strip()}\n"
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Hydra used the name for the sweep's folder before any job refused it: outputs/ itself
        (["-m", "name=..", "seed=0,1"], "name='..' is invalid: a non-empty folder name without"),
        (["-m", "name=a,b"], "name=a,b is invalid: name= names the sweep's folder"),
        # (a traceback: Hydra takes only one of them)
        (["-m", "--cfg", "job", "seed=0,1"], "--cfg with -m is invalid: --cfg prints one job's"),
        # a single run with the SLURM launcher trained here, on the login node
        (["hydra/launcher=slurm", "seed=1"], "hydra/launcher=slurm is invalid without -m"),
        # (it said hydra=launcher/slrum)
        (["hydra/launcher=slrum"], "hydra/launcher=slrum is invalid: allowed: "),
        (["--nproc-per-node=0", "seed=1"], "--nproc-per-node=0 is invalid: must be a number of"),
    ],
)  # fmt: skip
def test_sweep_launcher_and_flag_mistakes_are_one_line(args, message, tmp_path, monkeypatch,
                                                       capsys):  # fmt: skip
    from resnet_train import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["resnet-train", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith(f"resnet-train: error: {message}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_sweeps_check_refuses_only_what_every_job_would_and_reads_ones_own_configs(tmp_path):
    """Refused up front only when every job of the grid would be (data=imagefolder without a root
    and trainer.epochs=0 are refused by three jobs of four: the fourth trains); one's own
    experiment files (hydra.searchpath) compose in the check as in the jobs."""
    from resnet_train import cli

    cli.check_sweep_overrides(["experiment=smoke", "data=imagefolder,synthetic",
                               "trainer.epochs=0,1"])  # fmt: skip
    with pytest.raises(SystemExit):
        cli.check_sweep_overrides(["experiment=smoke", "data=imagefolder", "trainer.epochs=0,1"])
    own = tmp_path / "experiment" / "mine.yaml"
    own.parent.mkdir()
    own.write_text("# @package _global_\ndefaults:\n  - override /data: synthetic\n"
                   "trainer:\n  epochs: 1\n")  # fmt: skip
    cli.check_sweep_overrides([f"hydra.searchpath=[file://{tmp_path}]", "experiment=mine,smoke"])


def test_the_swept_keys_are_read_as_hydra_reads_a_sweep():
    """A quoted comma or a list value is one value, not a sweep (the report showed
    schedule.milestones=[30,60] as a swept key)."""
    from resnet_train.config import swept_in

    overrides = ["seed=0,1", "optim.lr=range(0.1,0.3,0.1)", "model=choice(resnet20,resnet32)",
                 "name='a,b'", "schedule.milestones=[30,60]", "+data.mean=[0.5,0.5,0.5]",
                 "trainer.epochs=2"]  # fmt: skip
    assert swept_in(overrides) == {"seed", "optim.lr", "model"}
    assert swept_in(["trainer.epochs=2"], {"optim.lr": "interval(0.01, 0.1)"}) == {"optim.lr"}


def test_a_sweep_names_its_jobs_by_the_resume_changeable_keys_it_sweeps_itself():
    """data.num_workers=0,4 names the jobs (they shared a folder); through a group's options only
    the keys a recipe sets do: a relaunch of experiment=a,b with trainer.log_every_steps=5 or
    another data.root finds its jobs again."""
    from resnet_train.config import _names_jobs

    assert _names_jobs("data.num_workers", "data.num_workers")
    assert _names_jobs("trainer.early_stopping.patience", "trainer.early_stopping")
    assert _names_jobs("trainer.epochs", "experiment") and _names_jobs("trainer.epochs", "trainer")
    assert not _names_jobs("trainer.log_every_steps", "experiment")
    assert not _names_jobs("trainer.device", "trainer")
    assert not _names_jobs("data.root", "data")


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=[resnet56,resnet20]"], "model=[resnet56,resnet20] is invalid: model takes one "
         "option (a list merges them into one config); to run each, sweep: -m "
         "model=resnet56,resnet20"),
        (["hydra.mode=MULTIRUN", "seed=0"], "hydra.mode=MULTIRUN is invalid: give -m"),
        (["hydra.job.chdir=true"], "hydra.job.chdir=true is invalid: resnet-train reads "
         "data.root, model.weights and the other paths from the folder it starts in"),
        (["--experimental-rerun", "x.pickle"], "--experimental-rerun is invalid here"),
        (["--config-dir", "nope"], "--config-dir=nope is invalid: no such folder"),
        (["--cfg", "job", "--resolve", "optim.lr=-1"], "optim.lr=-1.0 is invalid: must be > 0"),
        (["data.root=${oc.env:NO_SUCH_VARIABLE}", "--cfg", "job"], "data.root is invalid: its "
         "interpolation does not resolve (KeyError raised while resolving interpolation: "
         "\"Environment variable 'NO_SUCH_VARIABLE' not found\")"),
        (["-m", "data.root=${oc.env:NO_SUCH_VARIABLE}", "seed=0,1"],
         "data.root is invalid: its interpolation does not resolve"),
        (["-m", "name=${nope.x}", "seed=0,1"], "name is invalid: its interpolation does not "
         "resolve (Interpolation key 'nope.x' not found)"),
        (["-m", "optim.lr=interval(0.01,0.1)"], "optim.lr=interval(0.01,0.1) is invalid: "
         "interval() is a search space, which only a search draws from: add "
         "hydra/sweeper=optuna_cpu"),
        (["-m", "seed=range(5,1)"], "seed=range(5,1) is invalid: it gives no value, so the sweep "
         "would run no job"),
        (["-m", "model=glob(nomatch*)"], "model=glob(nomatch*) is invalid: it matches none of "
         "the options of model: plain110, plain18"),
        (["-m", "optim.lr=glob(*)"], "it matches none of optim.lr is not a config group"),
        (["hydra.run.dri=x"], "hydra.run.dri is not a config key: allowed in hydra.run: dir"),
        (["-m", "hydra.sweep.dri=x", "seed=1,2"],
         "hydra.sweep.dri is not a config key: allowed in hydra.sweep: dir, subdir"),
    ],
)  # fmt: skip
def test_what_hydra_takes_but_means_nothing_here_is_one_line(tmp_path, args, message):
    """Each was silently accepted (a merged model, a single run for MULTIRUN, a sweep of 0 jobs
    with exit 0), a traceback (interpolations, interval without a search, --experimental-rerun)
    or ran without its checks (--cfg job --resolve)."""
    result = run_cli(*SMOKE, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("resnet-train: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_single_run_with_config_dir_is_checked_as_any_run(tmp_path):
    """`--config-dir DIR` (one's own configs) skipped a single run's checks: bad input wrote a
    run folder, and a run refused as finished had its .hydra/ record rewritten."""
    experiment = tmp_path / "my,conf=1" / "experiment"  # (a comma, an = : quoted for Hydra)
    experiment.mkdir(parents=True)
    (experiment / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: resnet32\n"
        "  - override /data: synthetic\nname: mine\ndata:\n  train_size: 64\n  test_size: 16\n"
        "trainer:\n  epochs: 1\n"
    )
    bad = run_cli("--config-dir", "my,conf=1", "experiment=mine", "optim.lr=-1", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "resnet-train: error: optim.lr=-1.0 is invalid: must be > 0"]  # fmt: skip
    assert not (tmp_path / "outputs").exists()
    first = run_cli("-cd", "my,conf=1", "experiment=mine", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "outputs" / "mine"
    assert torch.load(run / "last.pt", weights_only=True)["config"]["model"]["name"] == "resnet32"
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    log = (run / "train.log").read_bytes()
    again = run_cli("--config-dir", "my,conf=1", "experiment=mine", "optim.lr=0.05",
                    cwd=tmp_path)  # fmt: skip
    assert again.returncode == 2 and "of a finished run" in again.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == record
    assert (run / "train.log").read_bytes() == log
