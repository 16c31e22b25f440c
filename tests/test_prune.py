"""task=prune: which filters go, that the pruned model rebuilds from its record, that it
fine-tunes, resumes, evaluates and distils like any model, and the errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_train.deploy.prune import prune_blocks, prune_groups
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.models import create_model
from resnet_train.models.channels import apply_channels, channel_record
from resnet_train.models.resnet import BasicBlock
from resnet_train.models.summary import summarize
from tests.conftest import compose_config, run_cli

TINY = ["data=synthetic", "data.train_size=96", "data.test_size=32", "data.batch_size=16",
        "trainer.epochs=1", "trainer.device=cpu"]  # fmt: skip


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_l1_blocks_pruning_removes_exactly_the_filters_that_do_nothing():
    """In each block, 30% of conv1's filters are made dead (zero weights, and a BN that maps
    zero to zero): L1 ranks them last, pruning removes them, and the outputs do not change."""
    model = trained_looking(create_model("resnet20"))
    for block in model.modules():
        if isinstance(block, BasicBlock):
            width = block.conv1.out_channels
            dead = torch.randperm(width, generator=torch.Generator().manual_seed(width))[
                : round(0.3 * width)
            ]
            block.conv1.weight.data[dead] = 0
            block.bn1.bias.data[dead] = 0
            block.bn1.running_mean[dead] = 0
    before = model(images())
    pruned = copy.deepcopy(model)
    assert prune_blocks(pruned, 0.3, "l1", seed=0) == 9
    for (name, a), (_, b) in zip(model.named_modules(), pruned.named_modules(), strict=True):
        if isinstance(a, BasicBlock):
            assert b.conv1.out_channels == b.bn1.num_features == b.conv2.in_channels
            assert b.conv1.out_channels == a.conv1.out_channels - round(0.3 * a.conv1.out_channels)
            assert b.conv2.out_channels == a.conv2.out_channels, name  # the block's output stays
    torch.testing.assert_close(pruned(images()), before, rtol=1e-5, atol=1e-5)
    macs = summarize(pruned, 32).macs / summarize(model, 32).macs
    assert 0.68 < macs < 0.72  # nearly all of a CIFAR ResNet's arithmetic is inside its blocks


@pytest.mark.parametrize(
    ("name", "method"),
    [("resnet20", "blocks"), ("resnet56", "blocks"), ("preact_resnet18", "blocks"),
     ("resnet18", "groups"), ("resnet50", "groups"), ("plain20", "groups"),
     ("resnet50", "blocks")],
)  # fmt: skip
def test_a_pruned_model_rebuilds_from_its_channel_record(name, method):
    """A fresh model of the architecture, given the record, takes the pruned weights strictly
    and gives the same outputs; the record is plain data (loads with weights_only=True)."""
    pytest.importorskip("torch_pruning")
    size = 32
    model = trained_looking(create_model(name, num_classes=10, stem="cifar"))
    reference = copy.deepcopy(model)
    if method == "blocks":
        prune_blocks(model, 0.4, "l2", seed=0)
    else:
        prune_groups(model, 0.4, "l1", size)
    record = channel_record(model, reference)
    assert record and summarize(model, size).macs < 0.8 * summarize(reference, size).macs
    rebuilt = apply_channels(create_model(name, num_classes=10, stem="cifar"), record)
    rebuilt.load_state_dict(model.state_dict())  # strict
    torch.testing.assert_close(rebuilt.eval()(images()), model.eval()(images()))
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("method", ["blocks", "groups"])
def test_random_importance_is_a_seeded_baseline(method):
    """(groups drew from torch's global generator: two runs, two models)"""
    if method == "groups":
        pytest.importorskip("torch_pruning")
    base = trained_looking(create_model("resnet20", shortcut="B" if method == "groups" else None))
    a, b, c = (copy.deepcopy(base) for _ in range(3))
    for model, seed in ((a, 3), (b, 3), (c, 4)):
        torch.manual_seed(seed + 10)  # (whatever the global generator holds)
        if method == "blocks":
            prune_blocks(model, 0.5, "random", seed=seed)
        else:
            prune_groups(model, 0.5, "random", 32, seed=seed)
    assert torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)
    assert not torch.equal(a.layer1[0].conv1.weight, c.layer1[0].conv1.weight)


@pytest.mark.parametrize(("name", "round_to"), [("resnet20", 8), ("resnet20", 1), ("resnet18", 8)])
def test_groups_pruning_keeps_what_blocks_pruning_keeps_of_each_width(name, round_to):
    """Torch-Pruning rounds its kept channels down to round_to: 0.3 of ResNet-20's 64 channels
    kept 40 (a 70% cut in MACs where blocks cut 33%); each width now keeps kept()'s count."""
    pytest.importorskip("torch_pruning")
    from resnet_train.deploy.prune import kept

    model = create_model(name, num_classes=10, stem="cifar", shortcut="B")
    reference = copy.deepcopy(model)
    prune_groups(model, 0.3, "l1", 32, round_to)
    pairs = [(a.out_channels, b.out_channels) for a, b in zip(reference.modules(), model.modules(),
             strict=True) if isinstance(a, nn.Conv2d)]  # fmt: skip
    assert all(width_after == kept(width, 0.3, round_to) for width, width_after in pairs), pairs
    macs = summarize(model, 32).macs / summarize(reference, 32).macs
    assert 0.4 < macs < 0.55  # inputs and outputs both shrink: about half the MACs go


def test_groups_pruning_keeps_the_nearest_multiple_of_a_grouped_convs_groups():
    """ResNeXt-50's 128-channel grouped conv (32 groups) kept 64 of 128 at ratio 0.3 (Torch-
    Pruning rounds down to the groups): the nearest multiple, 96."""
    pytest.importorskip("torch_pruning")
    model = create_model("resnext50_32x4d", num_classes=10, stem="cifar")
    reference = copy.deepcopy(model)
    prune_groups(model, 0.3, "l1", 32, 8)
    widths = sorted(
        {
            (a.out_channels, b.out_channels)
            for a, b in zip(reference.modules(), model.modules(), strict=True)
            if isinstance(a, nn.Conv2d) and a.groups > 1
        }
    )
    assert widths == [(128, 96), (256, 192), (512, 352), (1024, 704)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("prune")
    result = run_cli("model=resnet20", *TINY, "name=base", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def test_prune_fine_tune_resume_eval_and_distil_from_the_pruned_model(trained):
    cwd = trained
    pruned = run_cli("task=prune", "model.weights=outputs/base/last.pt", "prune.ratio=0.4",
                     "prune.round_to=1", "name=pruned", cwd=cwd)  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    record = json.loads((cwd / "outputs" / "pruned" / "prune.json").read_text())
    assert record["method"] == "blocks" and record["ratio"] == 0.4 and record["round_to"] == 1
    assert record["before"]["parameters"] == sum(
        p.numel() for p in create_model("resnet20").parameters()
    )
    assert 0.35 < record["macs_removed"] < 0.42 and 0 <= record["after"]["acc"] <= 100
    file = cwd / "outputs" / "pruned" / "pruned.pt"
    state = torch.load(file, weights_only=True)
    assert state["channels"]["layer1.0.conv1"] == [10, 16]  # 16 - round(0.4 * 16)
    # the class names come along: predict names them, eval checks the data's against them
    source = torch.load(cwd / "outputs" / "base" / "last.pt", weights_only=False)
    assert state["classes"] == source["classes"] and len(state["classes"]) == 10

    # fine-tuning is an ordinary run from it, the command it prints (it lacked the data's keys);
    # its checkpoints carry the widths on
    hint = pruned.stdout.split("fine-tune it: resnet-train ")[1].splitlines()[0].split(" ")
    assert hint == ["model=resnet20", f"model.weights={file}", "data=synthetic",
                    "data.train_size=96", "data.test_size=32"]  # fmt: skip
    args = [*hint, "trainer.epochs=1", "trainer.device=cpu", "name=ft"]
    first = run_cli(*args, cwd=cwd)
    assert first.returncode == 0, first.stderr
    assert "resnet20 (0.16M parameters)" in first.stdout
    last = load_checkpoint(cwd / "outputs" / "ft" / "last.pt")
    assert last["channels"] == state["channels"]
    # the resume does not read the file it was fine-tuned from: gone, it resumes all the same
    away = file.rename(file.with_name("away.pt"))
    resumed = run_cli(*args, "trainer.epochs=2", "resume=auto", cwd=cwd)
    away.rename(file)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((cwd / "outputs" / "ft" / "metrics.json").read_text())
    assert metrics["epochs_done"] == 2

    selected = metrics["selected_checkpoint"]  # (the run's test figures are this file's)
    evaluated = run_cli("task=eval", f"model.weights=outputs/ft/{selected}", "name=ev", cwd=cwd)
    assert evaluated.returncode == 0, evaluated.stderr
    top1 = json.loads((cwd / "outputs" / "ev" / "eval.json").read_text())["top1"]
    assert top1 == pytest.approx(metrics["test"]["acc"])  # the run's own test, reproduced

    from resnet_train.engine.distill import load_teacher

    teacher = load_teacher(compose_config("model=resnet20", *TINY,
                                          f"trainer.distill.teacher={file}"))  # fmt: skip
    assert teacher.model.layer1[0].conv1.out_channels == 10


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prune.ratio=0", "prune.ratio=0.0 is invalid: must be in (0, 1)"),
        ("prune.ratio=1", "prune.ratio=1.0 is invalid: must be in (0, 1)"),
        ("prune.ratio=-0.2", "prune.ratio=-0.2 is invalid: must be in (0, 1)"),
        (
            "prune.importance=taylor",
            "prune.importance='taylor' is invalid: allowed: l1, l2, random",
        ),
        (
            "prune.method=groups",
            "prune.method='groups' is invalid for shortcut A: the zero-padding",
        ),
        ("model=resnet32", "does not fit"),
    ],
)
def test_bad_prune_settings_fail_in_one_line_and_write_nothing(
    override, message, trained, monkeypatch, capsys
):
    """The command line's own check (precheck), in-process: exit 2, one line, no directory."""
    from resnet_train.cli import precheck

    cwd = trained
    weights = "model.weights=outputs/base/last.pt"
    if override == "model=resnet32":  # a bare state dict of another architecture
        torch.save(load_checkpoint(cwd / "outputs" / "base" / "last.pt")["model"], cwd / "r20.pth")
        weights = "model.weights=r20.pth"
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as stop:
        precheck(["task=prune", weights, override, "hydra.run.dir=outputs/bad"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("resnet-train: error: ") and message in err, err
    assert not (cwd / "outputs" / "bad").exists()


@pytest.mark.parametrize(
    ("width", "ratio", "round_to", "keep"),
    [(16, 0.3, 1, 11), (16, 0.3, 8, 8), (64, 0.3, 8, 48), (32, 0.3, 4, 24), (16, 0.9, 8, 8),
     (4, 0.1, 8, 4), (16, 0.99, 1, 1)],
)  # fmt: skip
def test_round_to_keeps_a_multiple_of_it_in_each_pruned_layer(width, ratio, round_to, keep):
    from resnet_train.deploy.prune import kept

    assert kept(width, ratio, round_to) == keep


def test_blocks_pruning_with_round_to_keeps_multiples_of_eight():
    model = create_model("resnet56")
    prune_blocks(model, 0.3, "l1", seed=0, round_to=8)
    widths = {m.conv1.out_channels for m in model.modules() if isinstance(m, BasicBlock)}
    assert widths == {8, 24, 48}


def test_a_pruned_model_fine_tunes_on_data_with_other_classes(tmp_path):
    """The record's classifier gives its input width only: the classes are the new data's."""
    pytest.importorskip("torch_pruning")
    from resnet_train.models.build import build_model

    model = trained_looking(create_model("resnet18", num_classes=10, stem="cifar"))
    reference = copy.deepcopy(model)
    prune_groups(model, 0.5, "l1", 32)
    file = tmp_path / "pruned.pt"
    torch.save({"model": model.state_dict(), "channels": channel_record(model, reference)}, file)
    cfg = compose_config("model=resnet18", "data=synthetic", "data.num_classes=100",
                         f"model.weights={file}")  # fmt: skip
    tuned = build_model(cfg)
    assert tuned.fc.out_features == 100 and tuned.fc.in_features == model.fc.in_features
    assert tuned(images(2)).shape == (2, 100)


def test_pruning_that_removes_nothing_is_refused_naming_why(trained, monkeypatch):
    from resnet_train.deploy.prune import run_prune
    from resnet_train.errors import ConfigError

    monkeypatch.chdir(trained)
    args = ["task=prune", "model.weights=outputs/base/last.pt", "prune.ratio=0.05"]
    with pytest.raises(ConfigError, match=r"^prune.ratio=0.05 is invalid: it removes no channel: "
                       r"the ratio is too small for prune.round_to=8"):  # fmt: skip
        run_prune(compose_config(*args), trained / "outputs" / "nothing", args)
    assert not (trained / "outputs" / "nothing" / "pruned.pt").exists()


def test_the_unpruned_reference_keeps_the_runs_model_settings(tmp_path, monkeypatch):
    """stride_in_1x1 moves no weights but changes the network: the pruned model must rebuild
    with it, and the fine-tuning command the log suggests must say it."""
    pytest.importorskip("torch_pruning")
    from resnet_train.deploy.prune import run_prune

    monkeypatch.chdir(tmp_path)
    base = ["model=resnet50", "model.stride_in_1x1=true", "data=synthetic", "data.test_size=8",
            "data.batch_size=4", "trainer.device=cpu"]  # fmt: skip
    weights = tmp_path / "r50.pth"
    torch.save(create_model("resnet50", num_classes=10, stem="cifar",
                            stride_in_1x1=True).state_dict(), weights)  # fmt: skip
    cfg = compose_config(*base, "task=prune", f"model.weights={weights}", "prune.ratio=0.5")
    result = run_prune(cfg, tmp_path / "p", [*base, f"model.weights={weights}"])
    assert result["method"] == "groups" and result["macs_removed"] > 0.5
    log = (tmp_path / "p" / "prune.json").read_text()
    assert json.loads(log)["pruned_layers"] > 0
