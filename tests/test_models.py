"""The networks: paper parameter counts, torchvision parity, stems and input sizes."""

from __future__ import annotations

import pytest
import torch
import torchvision

from resnet_train import create_model, list_models
from resnet_train.engine.trainer import build_model
from tests.conftest import compose_config


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# He et al. 2015, Table 6 (CIFAR-10, shortcut option A).
@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("resnet20", "0.27"),
        ("resnet32", "0.46"),
        ("resnet44", "0.66"),
        ("resnet56", "0.85"),
        ("resnet110", "1.7"),
        ("resnet1202", "19.4"),
    ],
)
def test_cifar_parameter_counts_match_the_paper(name, millions):
    decimals = len(millions.split(".")[1])
    assert f"{n_params(create_model(name)) / 1e6:.{decimals}f}" == millions


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_imagenet_models_load_torchvision_weights_and_agree(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert n_params(ours) == n_params(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("size", [32, 64, 100, 224])
def test_any_input_size_gives_logits(stem, size):
    model = create_model("resnet18", num_classes=7, stem=stem).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_cifar_stem_keeps_resolution_and_imagenet_stem_quarters_it():
    cifar = create_model("resnet18", stem="cifar")
    imagenet = create_model("resnet18", stem="imagenet")
    x = torch.randn(1, 3, 32, 32)
    stem_out = lambda m: m.maxpool(m.relu(m.bn1(m.conv1(x))))  # noqa: E731
    assert stem_out(cifar).shape[-1] == 32
    assert stem_out(imagenet).shape[-1] == 8
    assert cifar.conv1.kernel_size == (3, 3) and imagenet.conv1.kernel_size == (7, 7)


def test_resnet18_on_cifar10_takes_the_cifar_stem_unless_overridden():
    model = build_model(compose_config("model=resnet18", "data=cifar10"))
    assert model.conv1.kernel_size == (3, 3) and model.fc.out_features == 10
    model = build_model(compose_config("model=resnet18", "data=cifar10", "model.stem=imagenet"))
    assert model.conv1.kernel_size == (7, 7)
    model = build_model(compose_config("model=resnet18", "data=imagenet"))
    assert model.conv1.kernel_size == (7, 7) and model.fc.out_features == 1000


def test_cifar_resnet_has_three_stages_of_16_32_64_and_parameter_free_shortcuts():
    model = create_model("resnet56")
    assert [len(stage) for stage in model.stages()] == [9, 9, 9]
    assert [stage[0].conv1.out_channels for stage in model.stages()] == [16, 32, 64]
    assert all(
        n_params(stage[0].downsample or torch.nn.Identity()) == 0 for stage in model.stages()
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_zero_init_residual_zeroes_the_last_bn_of_each_branch():
    model = create_model("resnet50", zero_init_residual=True)
    assert all(block.bn3.weight.abs().sum() == 0 for stage in model.stages() for block in stage)
    model = create_model("resnet20", zero_init_residual=True)
    assert all(block.bn2.weight.abs().sum() == 0 for stage in model.stages() for block in stage)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="model 'resnet19' is unknown: allowed: .*resnet18"):
        create_model("resnet19")
    assert {"resnet18", "resnet50", "resnet20", "resnet110"} <= set(list_models())
