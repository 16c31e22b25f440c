"""The model zoo: paper parameter counts, torchvision parity, variants, sizes, summaries."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from resnet_train import create_model, list_models
from resnet_train.errors import CheckpointError, ConfigError
from resnet_train.models.build import build_model
from resnet_train.models.resnet import PreActBlock
from resnet_train.models.summary import summarize
from tests.conftest import REPO, compose_config, run_cli

TORCHVISION = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
]  # fmt: skip


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rounded(count: int, given: str) -> bool:
    """Whether `count` parameters, in millions, round to the paper's figure `given`."""
    decimals = len(given.split(".")[1])
    return f"{count / 1e6:.{decimals}f}" == given


@pytest.mark.parametrize("name", TORCHVISION)
def test_imagenet_models_load_torchvision_weights_and_agree(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert n_params(ours) == n_params(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() <= 1e-5


# He et al. 2015, Table 6 (CIFAR-10, option A); He et al. 2016 (pre-activation, 1.7M each);
# Zagoruyko & Komodakis 2016 (WRN-28-10 36.5M; WRN-16-8 11.0M).
@pytest.mark.parametrize(
    ("name", "millions"),
    [("resnet20", "0.27"), ("resnet32", "0.46"), ("resnet44", "0.66"), ("resnet56", "0.85"),
     ("resnet110", "1.7"), ("resnet1202", "19.4"), ("preact_resnet110", "1.7"),
     ("preact_resnet164", "1.7"), ("wrn28_10", "36.5"), ("wrn16_8", "11.0")],
)  # fmt: skip
def test_cifar_parameter_counts_match_the_papers(name, millions):
    assert rounded(n_params(create_model(name)), millions)


@pytest.mark.parametrize(
    ("name", "millions"), [("resnext29_8x64d", "34.4"), ("resnext29_16x64d", "68.1")]
)
def test_cifar_resnext_parameter_counts_match_the_paper(name, millions):
    # Xie et al. 2017, Table 7. Its figures are the weights of convs and the classifier; BN's
    # affine parameters (57k and 100k) are left out (68,155,210 with them would read 68.2M).
    model = create_model(name)
    bn = sum(n_params(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert rounded(n_params(model) - bn, millions)


def test_bottleneck_stride_placement_v1_and_v1_5():
    v15 = create_model("resnet50")
    v1 = create_model("resnet50", stride_in_1x1=True)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert n_params(v1) == n_params(v15)
    x = torch.randn(1, 3, 64, 64)
    v1.load_state_dict(v15.state_dict())
    v1.eval(), v15.eval()
    with torch.no_grad():
        assert v1(x).shape == v15(x).shape and not torch.allclose(v1(x), v15(x))
    cfg = compose_config("model=resnet50", "data=imagenet", "model.stride_in_1x1=true")
    assert build_model(cfg).layer3[0].conv1.stride == (2, 2)


def test_cifar_resnet_shortcut_a_is_parameter_free_and_b_projects():
    a = create_model("resnet56")
    assert [len(stage) for stage in a.stages()] == [9, 9, 9]
    assert [stage[0].conv1.out_channels for stage in a.stages()] == [16, 32, 64]
    assert all(n_params(s[0].downsample or nn.Identity()) == 0 for s in a.stages())
    b = create_model("resnet56", shortcut="B")
    assert isinstance(b.layer2[0].downsample[0], nn.Conv2d) and b.layer1[0].downsample is None
    assert n_params(b) - n_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    x = torch.randn(2, 3, 32, 32)
    assert a(x).shape == b(x).shape == (2, 10)


def test_plain_networks_have_no_shortcuts():
    plain = create_model("plain20")
    resnet = create_model("resnet20")
    assert n_params(plain) == n_params(resnet)
    assert all(
        not block.residual and block.downsample is None
        for stage in plain.stages()
        for block in stage
    )
    plain.load_state_dict(resnet.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), resnet.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x), resnet(x))
    same = build_model(compose_config("model=resnet56", "data=cifar10", "model.shortcut=none"))
    assert same.state_dict().keys() == create_model("plain56").state_dict().keys()
    assert not any(block.residual for stage in same.stages() for block in stage)


def test_preact_blocks_run_bn_relu_conv_and_end_with_bn_relu():
    model = create_model("preact_resnet110").eval()
    block = model.layer2[1]
    assert isinstance(block, PreActBlock)
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        manual = block.conv1(torch.relu(block.bn1(x)))
        manual = block.conv2(torch.relu(block.bn2(manual))) + x
        assert torch.allclose(block(x), manual, atol=1e-6)
    assert model.bn1 is None and isinstance(model.final_bn, nn.BatchNorm2d)
    assert model.final_bn.num_features == 64
    assert create_model("preact_resnet164").final_bn.num_features == 256
    assert create_model("preact_resnet18").final_bn.num_features == 512


@pytest.mark.parametrize("name", ["preact_resnet110", "preact_resnet18"])
def test_the_first_preact_block_activates_before_splitting_into_two_paths(name):
    """He et al. 2016 section 4: the first unit's BN-ReLU comes before the split, so its
    identity shortcut carries the activated stem output (it carried the raw conv output)."""
    model = create_model(name).eval()
    first, second = model.layer1[0], model.layer1[1]
    assert first.downsample is None
    nn.init.zeros_(first.conv2.weight)  # the residual branch gives zero: the block is its shortcut
    nn.init.zeros_(second.conv2.weight)
    nn.init.normal_(first.bn1.bias)
    x = torch.randn(2, first.bn1.num_features, 8, 8)
    with torch.no_grad():
        assert torch.equal(first(x), torch.relu(first.bn1(x)))
        assert torch.equal(second(x), x)  # the others carry their input as it is
        for stage in model.stages()[1:]:  # a projection takes the activated input: unchanged
            assert stage[0].preactivated_shortcut and stage[0].downsample is not None


def test_a_preact_checkpoint_of_an_earlier_version_is_refused_not_computed_otherwise(tmp_path):
    """A preact_resnet110 saved before the first block's change loaded silently and computed
    another function (eval's test loss moved from 389.8 to 486.7)."""
    from resnet_train.models.weights import PREACT_KEY, PREACT_REVISION

    model = create_model("preact_resnet110")
    state = {"format_version": 2, "model": model.state_dict(), "optimizer": {}, "scheduler": {},
             "epoch": 1, "config": {"model": {"name": "preact_resnet110"},
                                    "data": {"name": "synthetic", "num_classes": 10}}}  # fmt: skip
    torch.save(state, tmp_path / "old.pt")
    torch.save({**state, PREACT_KEY: PREACT_REVISION}, tmp_path / "new.pt")
    with pytest.raises(
        CheckpointError,
        match="holds a pre-activation net saved by an earlier "
        "resnet-train, whose first block's shortcut carried the un-activated",
    ):
        create_model("preact_resnet110", weights=tmp_path / "old.pt")  # fmt: skip
    assert isinstance(create_model("preact_resnet110", weights=tmp_path / "new.pt"), nn.Module)
    for name in ("preact_resnet164", "wrn16_8", "resnet20"):  # (their first block projects, or
        other = create_model(name)  # is post-activation: unchanged, and still read)
        path = tmp_path / f"{name}.pt"
        torch.save({**state, "model": other.state_dict(),
                    "config": {**state["config"], "model": {"name": name}}}, path)  # fmt: skip
        create_model(name, weights=path)


def test_wide_resnet_dropout_sits_between_the_convs():
    model = create_model("wrn16_8", dropout=0.3)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 and all(d.p == 0.3 for d in dropouts)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert not any(isinstance(m, nn.Dropout) for m in create_model("wrn16_8").modules())


def test_convolutions_get_he_fan_out_init():
    torch.manual_seed(0)
    conv = create_model("resnet50").layer4[0].conv2  # 512 -> 512, 3x3
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_zero_init_residual_zeroes_the_last_bn_of_each_branch():
    model = create_model("resnet50", zero_init_residual=True)
    assert all(block.bn3.weight.abs().sum() == 0 for stage in model.stages() for block in stage)
    model = create_model("resnet20", zero_init_residual=True)
    assert all(block.bn2.weight.abs().sum() == 0 for stage in model.stages() for block in stage)
    assert create_model("resnet20").layer1[0].bn2.weight.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet18"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("size", [32, 64, 100, 224, 256])
def test_any_input_size_gives_logits(name, stem, size):
    model = create_model(name, num_classes=7, stem=stem).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)


def test_cifar_stem_keeps_resolution_and_imagenet_stem_quarters_it():
    x = torch.randn(1, 3, 32, 32)
    assert create_model("resnet18", stem="cifar").forward_stem(x).shape[-1] == 32
    assert create_model("resnet18", stem="imagenet").forward_stem(x).shape[-1] == 8


def test_the_stem_and_classes_follow_the_data_unless_set():
    model = build_model(compose_config("model=resnet18", "data=cifar10"))
    assert model.conv1.kernel_size == (3, 3) and model.fc.out_features == 10
    model = build_model(compose_config("model=resnet18", "data=cifar10", "model.stem=imagenet"))
    assert model.conv1.kernel_size == (7, 7)
    model = build_model(compose_config("model=resnet18", "data=imagenet"))
    assert model.conv1.kernel_size == (7, 7) and model.fc.out_features == 1000
    model = build_model(compose_config("model=resnet56", "data=cifar100"))
    assert model.fc.out_features == 100


def test_every_model_has_a_config_that_builds():
    names = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    assert names == list_models()
    x = torch.randn(1, 3, 32, 32, device="meta")
    for name in names:  # on the meta device: shapes without arithmetic (ResNet-1202 included)
        cfg = compose_config(f"model={name}", "data=cifar10")
        with torch.device("meta"):
            model = build_model(cfg).eval()
        with torch.no_grad():
            assert model(x).shape == (1, 10), name


@pytest.mark.parametrize(
    ("name", "size", "low", "high"),
    [("resnet50", 224, 4.0e9, 4.2e9), ("resnet18", 224, 1.75e9, 1.85e9),
     ("resnet20", 32, 40e6, 42e6)],
)  # fmt: skip
def test_summary_counts_multiply_accumulates(name, size, low, high):
    summary = summarize(create_model(name), size)
    assert low <= summary.macs <= high
    assert summary.parameters == n_params(create_model(name))


def test_summary_task_prints_shapes_and_writes_nothing(tmp_path):
    result = run_cli("task=summary", "model=resnet50", "data=imagenet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters   25,557,032" in out and "(4.09 G) at 224x224" in out
    assert "layer4   (1, 2048, 7, 7)" in out and "fc       (1, 1000)" in out
    assert list(tmp_path.iterdir()) == []
    # what would train: a linear probe trains the classifier only (2048 x 10 + 10)
    result = run_cli("task=summary", "model=resnet50", "data=cifar10", "model.freeze=backbone",
                     "model.stem=imagenet", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trainable    20,490" in result.stdout
    result = run_cli("task=summary", "model.freeze=[layer9]", cwd=tmp_path)
    assert result.returncode == 2 and "model.freeze=layer9 is invalid" in result.stderr
    # a checkpoint's summary is of its own model: a 4-class resnet32 (it showed the command
    # line's: resnet20, 10 classes)
    model = create_model("resnet32", num_classes=4)
    state = {"format_version": 2, "model": model.state_dict(), "optimizer": {}, "scheduler": {},
             "epoch": 1, "config": {"model": {"name": "resnet32"},
                                    "data": {"name": "synthetic", "num_classes": 4}}}  # fmt: skip
    torch.save(state, tmp_path / "c4.pt")
    result = run_cli("task=summary", f"model.weights={tmp_path / 'c4.pt'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "fc       (1, 4)" in result.stdout
    assert f"parameters   {n_params(model):,}" in result.stdout


def test_torchvision_weights_file_loads_and_fine_tunes(tmp_path):
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    same = create_model("resnet18", weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(same(x), reference(x))
    with pytest.warns(UserWarning, match=r"its classifier of 1000 classes was replaced by a new "
                      r"one of num_classes=10 \(for fine-tuning\)"):  # fmt: skip
        tuned = create_model("resnet18", num_classes=10, weights=path)
    assert tuned.fc.out_features == 10
    assert torch.equal(tuned.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # On 32 px data the model takes the CIFAR stem, which an ImageNet file does not fit.
    cfg = compose_config("model=resnet18", "data=synthetic", f"model.weights={path}")
    with pytest.raises(CheckpointError, match="shapes differ: conv1.weight.*model.stem=imagenet"):
        build_model(cfg)
    cfg = compose_config(
        "model=resnet18", "data=synthetic", f"model.weights={path}", "model.stem=imagenet"
    )
    assert torch.equal(build_model(cfg).conv1.weight, reference.conv1.weight.data)


def test_create_model_with_ones_own_checkpoint_builds_the_model_it_holds(tmp_path):
    """create_model(name, weights=a 12-class checkpoint) gave 10 outputs, a new random
    classifier and no word of it; one of a shortcut-B or pruned model failed to load."""
    import warnings

    from resnet_train.deploy.prune import prune_groups
    from resnet_train.models.channels import channel_record

    pytest.importorskip("torch_pruning")
    model = create_model("resnet20", num_classes=12, shortcut="B").eval()
    reference = copy.deepcopy(model)
    prune_groups(model, 0.3, "l1", 32, 8)
    x = torch.randn(2, 3, 32, 32)
    for name, net, extra in (
        ("run.pt", reference, {}),
        ("pruned.pt", model, {"channels": channel_record(model, reference)}),
    ):
        state = {"model": net.state_dict(), "config": {"model": {"name": "resnet20",
                 "shortcut": "B", "stem": "cifar"}}, **extra}  # fmt: skip
        torch.save(state, tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no classifier replaced)
            loaded = create_model("resnet20", weights=tmp_path / name).eval()
            # None, as for the options left out: the file's (it built a new 10-class head)
            forwarded = create_model("resnet20", weights=tmp_path / name, num_classes=None)
        assert loaded.fc.out_features == 12 and forwarded.fc.out_features == 12
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), net(x))
            torch.testing.assert_close(forwarded.eval()(x), net(x))


def test_create_model_refuses_bad_options_naming_them(tmp_path):
    """Each was a deep torch error, a silent default (stem="") or accepted ("yes")."""
    for bad, message in (
        (dict(num_classes=0), "num_classes=0 is invalid: must be an integer >= 1"),
        (dict(num_classes=-1), "num_classes=-1 is invalid"),
        (dict(num_classes=True), "num_classes=True is invalid"),
        (dict(dropout=-1.0), r"dropout=-1.0 is invalid: must be in \[0, 1\)"),
        (dict(dropout="0.1"), r"dropout='0.1' is invalid"),
        (dict(stem=""), "stem='' is invalid: allowed: cifar, imagenet"),
        (dict(shortcut="b"), "shortcut='b' is invalid: allowed: A, B, none"),
        (dict(stride_in_1x1="yes"), "stride_in_1x1='yes' is invalid: must be True or False"),
        (dict(weights=tmp_path), "is a folder: give a weights file in it"),
    ):
        with pytest.raises(ValueError, match=message):
            create_model("resnet20", **bad)
    with pytest.raises(TypeError, match=r"unknown option 'device'.*\.to\(device\)"):
        create_model("resnet20", device="cpu")
    with pytest.raises(TypeError, match="weights=123 is invalid"):
        create_model("resnet20", weights=123)
    # the config's check, in the API: a plain net whose blocks all start at zero cannot learn
    with pytest.raises(ValueError, match="zero_init_residual=True is invalid without shortcuts"):
        create_model("plain20", zero_init_residual=True)
    assert create_model("resnet20", num_classes=np.int64(4)).fc.out_features == 4
    zeroed = create_model("resnet20", zero_init_residual=np.True_)  # numpy's bool is a bool
    assert not zeroed.layer1[0].bn2.weight.any()


def test_weights_of_another_model_are_refused_with_the_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit this model \(unexpected: layer1.2"):
        create_model("resnet18", weights=path)
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("resnet18", weights=tmp_path / "missing.pth")


def test_a_plain_net_with_shortcuts_is_refused_not_a_resnet_named_plain():
    """model=plain20 model.shortcut=B trained ResNet-20 under plain20's name (a sweep over
    plain20,resnet20 compared two ResNets)."""
    from resnet_train.models.build import check_model

    for name, shortcut, twin in (("plain20", "B", "resnet20"), ("plain18", "A", "resnet18")):
        cfg = compose_config("data=synthetic", f"model={name}", f"model.shortcut={shortcut}")
        with pytest.raises(ConfigError) as e:
            check_model(cfg)
        assert str(e.value) == (
            f"model.shortcut={shortcut} is invalid for {name}: a plain net has no shortcuts; "
            f"{twin} with model.shortcut={shortcut} is that net with them"
        )
        with pytest.raises(ValueError, match=f"shortcut={shortcut} is invalid for {name}"):
            create_model(name, shortcut=shortcut)
    check_model(compose_config("data=synthetic", "model=plain20", "model.shortcut=none"))


def test_a_checkpoint_of_another_network_with_the_same_shapes_is_refused(tmp_path):
    """A resnet20's checkpoint loaded silently into plain20 (same tensors, another network),
    and stride-on-1x1 bottlenecks into stride-on-3x3 ones; the file's run names them."""
    from resnet_train.models.build import check_weights

    def checkpoint(name: str, **model_keys) -> Path:
        model = create_model(name, **model_keys)
        path = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.pt"
        config = {"model": {"name": name, **model_keys},
                  "data": {"name": "synthetic", "num_classes": 10}}  # fmt: skip
        torch.save({"format_version": 2, "model": model.state_dict(), "optimizer": {},
                    "scheduler": {}, "epoch": 1, "config": config}, path)  # fmt: skip
        return path

    r20, r164 = checkpoint("resnet20"), checkpoint("preact_resnet164", stride_in_1x1=True)
    for overrides, weights, message in (
        (["model=plain20"], r20, "holds a resnet20, not a plain20: set model=resnet20"),
        (["model=resnet20", "model.shortcut=none"], r20,
         "was trained with model.shortcut=A: set model.shortcut=A (here none)"),
        (["model=resnet20", "model.shortcut=B"], r20, "trained with model.shortcut=A"),
        (["model=preact_resnet164"], r164, "was trained with model.stride_in_1x1=true: set "
         "model.stride_in_1x1=true (its bottlenecks halve the resolution in their first 1x1"),
    ):  # fmt: skip
        cfg = compose_config("data=synthetic", *overrides, f"model.weights={weights}")
        with pytest.raises(CheckpointError, match=re.escape(message)):
            check_weights(cfg)
        with pytest.raises(CheckpointError, match=re.escape(message)):
            build_model(cfg)
    for overrides, weights in (
        (["model=resnet20"], r20),
        (["model=preact_resnet164", "model.stride_in_1x1=true"], r164),
    ):
        build_model(compose_config("data=synthetic", *overrides, f"model.weights={weights}"))
    with pytest.raises(ValueError, match="holds a resnet20, not a plain20: give 'resnet20'"):
        create_model("plain20", weights=r20)  # the Python API


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="model 'resnet19' is unknown: allowed: .*resnet18"):
        create_model("resnet19")
    assert isinstance(create_model("resnet50", num_classes=1000), nn.Module)


def test_model_keys_that_this_model_does_not_use_are_said():
    from resnet_train.models.build import check_model, model_notes

    def notes(*overrides: str) -> list[str]:
        cfg = compose_config("data=synthetic", *overrides)
        return model_notes(cfg, build_model(cfg))

    assert notes("model=resnet20", "model.stride_in_1x1=true") == [
        "model.stride_in_1x1=true does nothing in resnet20: it places the stride in bottleneck "
        "blocks, and this model has none"
    ]
    assert notes("model=preact_resnet110", "model.zero_init_residual=true") == [
        "model.zero_init_residual=true does nothing in preact_resnet110: its pre-activation "
        "blocks end in a conv, not a BatchNorm"
    ]
    both = ["model.stride_in_1x1=true", "model.zero_init_residual=true"]
    assert notes("model=resnet50", *both) == []
    assert notes("model=resnet20") == []
    # pre-activation blocks are not zeroed: without shortcuts too, a note, not a refusal
    preact = ["model=preact_resnet18", "model.shortcut=none", "model.zero_init_residual=true"]
    check_model(compose_config("data=synthetic", *preact))
    assert notes(*preact)[0].startswith("model.zero_init_residual=true does nothing")
