"""After training: task=eval, BN folding, task=export (ONNX, pt2, int8) and QAT."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resnet_train import cli
from resnet_train.config import TASKS
from resnet_train.data.cifar import read_class_names
from resnet_train.deploy.evaluate import (
    calibration,
    classification_metrics,
    collect_logits,
    run_eval,
)
from resnet_train.deploy.fold import fold_batchnorm, pad_shortcuts_as_convs
from resnet_train.deploy.source import adopt_config, given_keys, require
from resnet_train.engine.trainer import fit
from resnet_train.errors import MissingDependencyError
from resnet_train.models import create_model, list_models
from resnet_train.models.qat import (
    FakeQuantConv2d,
    FakeQuantStemConv2d,
    fake_quantize_activation,
    fake_quantize_weight,
    prepare_qat,
)
from resnet_train.models.resnet import PadShortcut
from resnet_train.models.weights import load_weights
from tests.conftest import SHARED_DATA, compose_config, run_cli
from tests.test_train import scalars

TINY = [
    "model=resnet20",
    "data=synthetic",
    "data.train_size=192",
    "data.test_size=96",
    "data.batch_size=32",
    "data.num_workers=0",
    "trainer.epochs=2",
    "trainer.device=cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished run: its directory, with best.pt and metrics.json."""
    run_dir = tmp_path_factory.mktemp("deploy") / "outputs" / "tr"
    fit(compose_config(*TINY), run_dir)
    return run_dir


def real_images(n: int) -> torch.Tensor:
    """n real CIFAR-10 test images (normalised) where the release is beside the project, else
    a fixed random batch."""
    batch = SHARED_DATA / "cifar-10-batches-py" / "test_batch"
    if batch.is_file():
        import pickle

        with open(batch, "rb") as f:
            rows = pickle.load(f, encoding="latin1")["data"][:n]
        x = torch.from_numpy(rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    else:
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    return (x - mean) / std


def trained_looking(model: nn.Module) -> nn.Module:
    """BN statistics and affine parameters far from their initial values, so that a wrong fold
    shows (at initialisation every BN of eval mode is nearly the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)
    return model.eval()


# Every architecture of the zoo but the largest of each family (same code, more layers).
FOLD_MODELS = [
    n
    for n in list_models()
    if n
    not in (
        "resnet1202",
        "resnet152",
        "resnet101",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "wide_resnet101_2",
        "resnext29_16x64d",
        "wrn28_10",
    )  # fmt: skip
]


@pytest.mark.parametrize("name", FOLD_MODELS)
def test_folded_model_gives_the_same_outputs_with_fewer_modules_and_parameters(name):
    torch.manual_seed(0)
    model = trained_looking(create_model(name, num_classes=10, stem="cifar"))
    images = real_images(8)
    folded, report = fold_batchnorm(model)
    with torch.no_grad():
        want, got = model(images), folded(images)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert report.folded >= 1
    assert report.modules_after == report.modules_before - report.folded
    assert report.parameters_after < report.parameters_before
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == (
        report.batchnorms - report.folded
    )
    if not name.startswith(("preact", "wrn")):  # post-activation: every BN follows a conv
        assert report.folded == report.batchnorms
    assert model.bn1 is not None or name.startswith(("preact", "wrn"))  # the original is intact


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_both_shortcut_options_fold(shortcut):
    model = trained_looking(create_model("resnet20", num_classes=10, shortcut=shortcut))
    folded, report = fold_batchnorm(model)
    images = real_images(4)
    with torch.no_grad():
        assert float((folded(images) - model(images)).norm() / model(images).norm()) <= 1e-5
    # option B adds a projection conv + BN per stage change: two more pairs
    assert report.folded == (19 if shortcut == "A" else 21)


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_option_a_shortcuts_become_1x1_convs_that_compute_exactly_the_same(name):
    folded, _ = fold_batchnorm(trained_looking(create_model(name, num_classes=10)))
    images = real_images(8)
    rewritten, replaced = pad_shortcuts_as_convs(folded, images[:2])
    assert replaced == 2  # the two stage changes; the identities stay as they are
    kept = [m for m in rewritten.modules() if isinstance(m, PadShortcut)]
    assert len(kept) == sum(isinstance(m, PadShortcut) for m in folded.modules()) - 2
    assert all(m.stride == 1 for m in kept)
    with torch.no_grad():
        assert torch.equal(rewritten(images), folded(images))  # exact, not merely close
    assert any(isinstance(m, PadShortcut) and m.stride == 2 for m in folded.modules())  # a copy
    # option B has no such shortcut: nothing to replace
    plain_b = create_model("resnet20", num_classes=10, shortcut="B").eval()
    assert pad_shortcuts_as_convs(plain_b, images[:2])[1] == 0


def test_int8_onnx_of_option_a_resnet_runs_in_one_channels_last_chain(tmp_path):
    """The exported ResNet-20 has no Slice or Pad (its shortcuts are convs); its int8 model
    quantizes every conv (the stem's weights in 7 bits, the others in 8) and ONNX Runtime runs
    it channels-last from the first conv to the last, with no Transpose between blocks."""
    require("onnxruntime", "test")
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from resnet_train.deploy.export import INPUT, export_onnx
    from resnet_train.deploy.quantize import quantize_int8

    model = trained_looking(create_model("resnet20", num_classes=10))
    folded, _ = fold_batchnorm(model)
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    export_onnx(folded, real_images(2), fp32)
    ops = [n.op_type for n in onnx.load(str(fp32)).graph.node]
    assert "Slice" not in ops and "Pad" not in ops and ops.count("Conv") == 21
    calibration = real_images(64).numpy()
    quantize_int8(fp32, int8, [calibration[:32], calibration[32:]], INPUT)
    graph = onnx.load(str(int8)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    conv_weights = [weights[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] in weights and weights[n.input[0]].ndim == 4]  # fmt: skip
    assert len(conv_weights) == 21 and all(w.dtype == np.int8 for w in conv_weights)
    stem = [w for w in conv_weights if w.shape[1] == 3]
    assert len(stem) == 1 and np.abs(stem[0]).max() == 64  # 7 bits: no int16 saturation
    assert max(int(np.abs(w).max()) for w in conv_weights if w.shape[1] != 3) == 127
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert optimized.count("QLinearConv") == 21 and optimized.count("Transpose") <= 2
    images = real_images(16)
    with torch.no_grad():
        want = model(images).argmax(1)
    got = session.run(None, {INPUT: images.numpy()})[0].argmax(1)
    assert (got == want.numpy()).mean() >= 0.75


def test_fake_quantized_weights_take_at_most_255_levels_per_channel_and_pass_gradients():
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    q = fake_quantize_weight(w)
    for c in range(8):
        scale = w[c].abs().max().item() / 127
        levels = torch.round(q[c] / scale)
        assert levels.unique().numel() <= 255
        torch.testing.assert_close(levels * scale, q[c], rtol=0, atol=1e-6)
        assert float((q[c] - w[c]).detach().abs().max()) <= scale / 2 + 1e-6
    q.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))  # straight through
    x = torch.randn(2, 3, 5, 5) * 3
    a = fake_quantize_activation(x)
    assert a.unique().numel() <= 256
    assert float((a - x).abs().max()) <= float(x.max() - x.min()) / 255 / 2 + 1e-5


def test_qat_model_keeps_its_names_and_loads_into_the_plain_model():
    plain = create_model("resnet20", num_classes=10)
    model = create_model("resnet20", num_classes=10)
    assert prepare_qat(model) == 20  # the stem, 18 convs and the classifier
    assert isinstance(model.layer1[0].conv1, FakeQuantConv2d)
    assert type(model.conv1) is FakeQuantStemConv2d  # 7-bit weights, as in the int8 export
    x = real_images(2)
    stem_weight = fake_quantize_weight(model.conv1.weight, (-64, 64))
    assert torch.equal(model.conv1(x), nn.functional.conv2d(fake_quantize_activation(x),
                                                           stem_weight, None, 1, 1))  # fmt: skip
    scale = model.conv1.weight.detach().abs().amax(dim=(1, 2, 3)) / 64
    assert float((stem_weight.detach() / scale.view(-1, 1, 1, 1)).round().abs().max()) == 64
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict())
    images = real_images(4)
    model.eval(), plain.eval()
    with torch.no_grad():
        fq, fp = model(images), plain(images)
    assert not torch.equal(fq, fp)  # quantization changes the outputs ...
    assert float((fq - fp).norm() / fp.norm()) < 0.2  # ... a little


def test_calibration_error_of_a_perfectly_calibrated_and_an_overconfident_model():
    confidence = torch.tensor([0.95] * 20 + [0.55] * 20)
    correct = torch.tensor([True] * 19 + [False] + [True] * 11 + [False] * 9)
    ece, bins = calibration(confidence, correct, 15)
    assert ece == pytest.approx(0.0, abs=1e-4)
    assert sum(b["count"] for b in bins) == 40
    ece, _ = calibration(torch.full((10,), 0.9), torch.tensor([True] * 5 + [False] * 5), 15)
    assert ece == pytest.approx(40.0, abs=1e-4)


def test_metrics_of_known_logits():
    names = ["a", "b", "c"]
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 3, 1], [1, 0, 2]])
    labels = torch.tensor([0, 1, 2, 0])
    m = classification_metrics(logits, labels, names, 15)
    assert m["top1"] == 50.0 and m["top5"] == 100.0 and m["images"] == 4
    assert m["per_class_accuracy"] == {"a": 50.0, "b": 100.0, "c": 0.0}
    assert m["confusion"].tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 0]]
    assert m["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))


def test_cifar_class_names_come_from_the_release(cifar10_root):
    root, _ = cifar10_root
    assert read_class_names("cifar10", root) == [f"class{i}" for i in range(10)]
    real = read_class_names("cifar10", SHARED_DATA)
    if real is not None:
        assert real[:3] == ["airplane", "automobile", "bird"]


def test_a_checkpoint_decides_its_settings_unless_the_command_line_does():
    cfg = compose_config("data.root=/here", "data.test_size=50")
    saved = {"model": {"name": "resnet56"}, "data": {"name": "synthetic", "test_size": 10,
             "root": "/there", "batch_size": 7}, "seed": 3}  # fmt: skip
    given = given_keys(["data.root=/here", "+data.test_size=50"])
    out, adopted = adopt_config(cfg, saved, given)
    assert (out.model.name, out.data.name, out.data.batch_size, out.seed) == (
        "resnet56", "synthetic", 7, 3)  # fmt: skip
    assert (out.data.root, out.data.test_size) == ("/here", 50)
    assert "data.root" not in adopted and "model.name" in adopted
    # a data set chosen as a group replaces the saved data settings as a whole
    out, _ = adopt_config(compose_config("data=cifar100"), saved, given_keys(["data=cifar100"]))
    assert out.data.name == "cifar100" and out.model.name == "resnet56"


def test_every_task_name_has_its_entry_in_the_dispatch_table():
    assert set(cli.TASKS) == set(TASKS)


def test_a_missing_optional_dependency_names_the_pip_command(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingDependencyError, match=r"pip install 'resnet-train\[deploy\]'"):
        require("onnxruntime", "export.format=onnx")


@pytest.mark.slow
def test_eval_reproduces_the_runs_test_accuracy_and_writes_its_records(trained):
    work = trained.parents[1]
    reported = json.loads((trained / "metrics.json").read_text())["test"]["acc"]
    r = run_cli("task=eval", f"model.weights={trained / 'best.pt'}", "name=ev", cwd=work)
    assert r.returncode == 0, r.stderr
    out = work / "outputs" / "ev"
    result = json.loads((out / "eval.json").read_text())
    assert result["top1"] == reported  # exactly: the same images, batches and weights
    assert result["split"] == "test" and result["images"] == 96
    assert 0 <= result["ece"] <= 100 and result["top5"] >= result["top1"]
    assert set(result["per_class_accuracy"]) == {f"class{i}" for i in range(10)}
    assert result["training_reported_test_acc"] == reported
    assert "the same" in r.stdout + r.stderr
    rows = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert rows[0][1:] == [f"class{i}" for i in range(10)]
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum() == 96 and np.trace(counts) == round(reported * 96 / 100)
    for picture in ("confusion_matrix.png", "reliability.png"):
        with Image.open(out / picture) as image:
            assert image.size[0] >= 400 and image.size[1] >= 400
    tags = scalars(out)
    assert tags["eval/test/top1"][0][1] == pytest.approx(reported)


@pytest.mark.slow
def test_eval_of_the_validation_and_training_splits(trained):
    work = trained.parents[1]
    weights = f"model.weights={trained / 'best.pt'}"
    r = run_cli("task=eval", weights, "eval.split=valid", "name=ev2", cwd=work)
    assert r.returncode == 0, r.stderr
    result = json.loads((work / "outputs" / "ev2" / "eval.json").read_text())
    best = torch.load(trained / "best.pt", weights_only=True)
    assert result["split"] == "valid" and result["images"] == 19  # 10% of 192, stratified
    assert result["top1"] == best["best_valid"]["acc"]  # what the run measured when it kept it
    r = run_cli("task=eval", weights, "eval.split=train", "name=ev3", cwd=work)
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "outputs" / "ev3" / "eval.json").read_text())["images"] == 173


def test_flip_tta_averages_the_logits_of_each_image_and_its_mirror_image():
    model = trained_looking(create_model("resnet20", num_classes=10))
    images, labels = real_images(6), torch.arange(6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), 4)
    plain, _ = collect_logits(model, loader, torch.device("cpu"))
    tta, seen = collect_logits(model, loader, torch.device("cpu"), tta=True)
    with torch.no_grad():
        mirrored = model(images.flip(3))
    torch.testing.assert_close(tta, (plain + mirrored) / 2)
    assert torch.equal(seen, labels)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.weights=nowhere.pt"], "model.weights='nowhere.pt' is invalid: no such file"),
        (["model.weights=notes.txt"], "model.weights=notes.txt is unreadable"),
        (["model.weights=dict.pt"], "holds no state dict of model weights"),
        (["model.weights=WEIGHTS", "model=resnet32"], "does not fit this model (missing"),
        # the file's own model named (a stem hint came back after it had been followed)
        (["model.weights=WEIGHTS", "model=resnet32", "model.stem=imagenet"],
         "; the file holds a resnet20: set model=resnet20"),
        (["model.weights=WEIGHTS", "model.num_classes=12"], "classifier has 10 classes"),
        (["model.weights=WEIGHTS", "eval.split=valid", "data.valid_ratio=0"],
         "eval.split=valid is invalid: data.valid_ratio=0.0 holds out no validation images"),
        (["model.weights=WEIGHTS", "eval.split=dev"], "eval.split='dev' is invalid: allowed"),
        (["task=export", "model.weights=WEIGHTS", "export.format=tflite"],
         "export.format='tflite' is invalid: allowed: onnx, pt2"),
        (["task=export", "model.weights=WEIGHTS", "export.format=pt2", "export.quantize=int8"],
         "int8 models are made with ONNX Runtime: use export.format=onnx"),
        (["task=export"], "task=export needs the model to export: model.weights=PATH"),
        (["model.weights=WEIGHTS", "name=tr"], "holds a training run; task=eval writes into"),
        (["model.weights=outputs"], "model.weights='outputs' is invalid: is a folder, not a file"),
        (["task=prune", "model.weights=WEIGHTS", "prune.ratio=0.01"],
         "prune.ratio=0.01 is invalid: it removes no channel: the ratio is too small"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    trained, args, message, monkeypatch, capsys
):
    """The command line's own entry point, in this process (the subprocess tests above and
    below cover the process boundary)."""
    work = trained.parents[1]
    monkeypatch.chdir(work)
    (work / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"model": {"a": 1}}, work / "dict.pt")
    args = [a.replace("WEIGHTS", str(trained / "best.pt")) for a in args]
    if not any(a.startswith("task=") for a in args):
        args.insert(0, "task=eval")
    before = sorted(p.name for p in (work / "outputs").iterdir())
    monkeypatch.setattr(sys, "argv", ["resnet-train", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in (work / "outputs").iterdir()) == before


@pytest.mark.slow
def test_export_onnx_with_int8_checks_and_carries_what_a_user_needs(trained):
    import onnx
    import onnxruntime as ort

    work = trained.parents[1]
    r = run_cli("task=export", f"model.weights={trained / 'best.pt'}", "export.quantize=int8",
                "export.calibration_images=64", "name=ex", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = work / "outputs" / "ex"
    assert "ONNX Runtime gives PyTorch's logits on 64 test images" in r.stdout + r.stderr
    record = json.loads((out / "export.json").read_text())
    assert max(record["check"]["relative_error"].values()) <= 1e-4
    assert record["fold"]["folded"] == 19
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == [f"class{i}" for i in range(10)]
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["image_size"]) == 32
    # the file runs by itself, at any batch size, and gives the checkpoint's logits
    model = create_model("resnet20", num_classes=10)
    load_weights(model, trained / "best.pt")
    images = real_images(5)
    with torch.no_grad():
        want = model.eval()(images)
    for name in ("model.onnx", "model.int8.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        assert got.shape == (5, 10)
        if name == "model.onnx":
            assert float((got - want).norm() / want.norm()) <= 1e-4
    int8 = record["int8"]
    assert int8["calibration_images"] == 64 and int8["images"] == 96
    assert (
        abs(int8["top1_change"]) <= 100
        and (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size / 2
    )
    meta8 = {p.key: p.value for p in onnx.load(str(out / "model.int8.onnx")).metadata_props}
    assert meta8["class_names"] == meta["class_names"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_export_pt2_loads_back_with_its_metadata(trained):
    work = trained.parents[1]
    r = run_cli("task=export", f"model.weights={trained / 'best.pt'}", "export.format=pt2",
                "name=ex2", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    extra = {"resnet_train.json": ""}
    program = torch.export.load(str(work / "outputs" / "ex2" / "model.pt2"), extra_files=extra)
    meta = json.loads(extra["resnet_train.json"])
    assert meta["class_names"][0] == "class0" and meta["std"] == [0.25, 0.25, 0.25]
    model = create_model("resnet20", num_classes=10)
    load_weights(model, trained / "best.pt")
    images = real_images(3)
    with torch.no_grad():
        got, want = program.module()(images), model.eval()(images)
    assert float((got - want).norm() / want.norm()) <= 1e-4


def test_an_exports_metadata_gives_the_models_output_width(tmp_path):
    """model.num_classes=12 on 10 classes: the metadata said "N x 10" of a 12-logit output."""
    fit(compose_config(*TINY, "model.num_classes=12"), tmp_path / "outputs" / "wide")
    r = run_cli("task=export", f"model.weights={tmp_path / 'outputs' / 'wide' / 'best.pt'}",
                "export.format=pt2", "name=ex12", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    extra = {"resnet_train.json": ""}
    program = torch.export.load(str(tmp_path / "outputs" / "ex12" / "model.pt2"), extra_files=extra)
    meta = json.loads(extra["resnet_train.json"])
    assert len(meta["class_names"]) == 10
    assert meta["output"].startswith("logits: float32 N x 12, one logit per class of class_names")
    assert meta["output"].endswith("; the last 2 belong to no class of the data")
    with torch.no_grad():
        assert program.module()(real_images(2)).shape == (2, 12)
    # predict names those two outputs as no class (it called them class10 and class11)
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 120, 200)).save(tmp_path / "a.png")
    r = run_cli("task=predict", f"model.weights={tmp_path / 'outputs' / 'wide' / 'best.pt'}",
                f"predict.inputs={tmp_path / 'a.png'}", "predict.top_k=12", "name=p12",
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "outputs" / "p12" / "predictions.csv").read_text()
    assert "(no class: output 10)" in table and "(no class: output 11)" in table
    assert "class10" not in table


@pytest.mark.slow
def test_an_export_that_fails_its_check_leaves_no_file(trained):
    work = trained.parents[1]
    r = run_cli("task=export", f"model.weights={trained / 'best.pt'}", "name=ex3",
                "export.check_tolerance=1e-12", cwd=work)  # fmt: skip
    assert r.returncode == 2
    assert "> export.check_tolerance=1e-12; nothing written" in r.stderr.strip().splitlines()[-1]
    out = work / "outputs" / "ex3"
    assert not (out / "model.onnx").exists() and not (out / "export.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_qat_fine_tune_resumes_bit_identical_and_exports(tmp_path, trained):
    """trainer.qat=true from a checkpoint: stopped after its first epoch and resumed, it ends
    with the weights of the uninterrupted run; its checkpoint is a plain model's."""
    qat = [*TINY, f"model.weights={trained / 'best.pt'}", "trainer.qat=true"]
    fit(compose_config(*qat), tmp_path / "whole")
    fit(compose_config(*qat, "trainer.epochs=1"), tmp_path / "parts")
    fit(compose_config(*qat, "resume=auto"), tmp_path / "parts")
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = create_model("resnet20", num_classes=10)
    plain.load_state_dict(a)
    # task=eval tests it as its run did (fake-quantized), and reproduces the run's figure
    args = ["task=eval", f"model.weights={tmp_path / 'whole' / 'best.pt'}"]
    result = run_eval(compose_config(*args), tmp_path / "eval", args)
    reported = json.loads((tmp_path / "whole" / "metrics.json").read_text())["test"]["acc"]
    assert "trainer.qat" in result["from_checkpoint_run"] and result["top1"] == reported


def test_a_bare_state_dict_is_evaluated_with_the_model_and_data_of_the_command_line(
    trained, tmp_path
):
    """A torchvision-style .pth (no config inside) evaluates under the command line's settings;
    given the run's settings, it scores what the run's checkpoint scores."""
    state = torch.load(trained / "best.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "resnet20.pth")
    args = [*TINY, "task=eval", f"model.weights={tmp_path / 'resnet20.pth'}"]
    bare = run_eval(compose_config(*args), tmp_path / "bare", args)
    assert bare["from_checkpoint_run"] == []
    reported = json.loads((trained / "metrics.json").read_text())["test"]["acc"]
    assert bare["top1"] == reported and bare["images"] == 96


def test_the_deploy_package_never_imports_the_training_engine():
    code = (
        "import sys, resnet_train.deploy.export, resnet_train.deploy.evaluate;"
        "print([m for m in sys.modules if m.startswith('resnet_train.engine')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_calibration_bins_are_closed_on_the_right():
    """A confidence on an edge belongs to the bin below it: (0, 1/3], (1/3, 2/3], (2/3, 1]."""
    _, bins = calibration(torch.tensor([0.5, 1.0, 1 / 3]), torch.tensor([True, True, False]), 3)
    assert [b["count"] for b in bins] == [1, 1, 1]


def test_the_predict_table_shows_every_rank_asked_for_in_aligned_columns():
    from resnet_train.deploy.predict import _table

    rows = [["a.png", "golden retriever", "0.700000", "cat", "0.200000", "dog", "0.050000",
             "car", "0.030000", "ship", "0.020000"],
            ["photos/b.jpg", "cat", "0.900000", "golden retriever", "0.050000", "ship",
             "0.030000", "dog", "0.010000", "car", "0.010000"]]  # fmt: skip
    lines = _table(rows, 5, 10)
    assert lines[0].split() == ["image", "top-1", "top-2", "top-3", "top-4", "top-5"]
    assert lines[1].startswith("a.png ") and "ship 0.020" in lines[1]
    assert lines[1].index("golden retriever 0.700") == lines[0].index("top-1")
    assert "car 0.010" in lines[2]
    # each column starts at the same place in every line
    for rank in ("top-2", "top-5"):
        start = lines[0].index(rank)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in lines)
    assert len(_table(rows, 5, 1)) == 2 and _table([], 5, 10) == []
    # at most 5 ranks on the console (the CSV has every one)
    wide = [[r[0], *(r[1:] * 3)] for r in rows]
    assert _table(wide, 15, 10)[0].split()[-1] == "top-5"


def test_a_prediction_of_a_class_the_data_lacks_is_wrong_everywhere():
    """model.num_classes > data.num_classes: the extra outputs are an "other" column."""
    logits = torch.tensor([[0.0, 0, 0, 9], [0, 9, 0, 0], [0, 0, 9, 0]])
    m = classification_metrics(logits, torch.tensor([2, 1, 2]), ["a", "b", "c"], 15)
    assert m["top1"] == pytest.approx(200 / 3)
    assert m["per_class_accuracy"] == {"a": None, "b": 100.0, "c": 50.0}
    assert m["confusion"].tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]


@pytest.mark.parametrize(
    "record, args, message",
    [
        ("export.json", ["task=eval", "model.weights=WEIGHTS"], "export.json of a task=export"),
        ("eval.json", ["task=export", "model.weights=WEIGHTS"], "eval.json of a task=eval"),
        ("eval.json", TINY, "holds the eval.json of a task=eval, not a training run"),
    ],
)
def test_a_task_never_writes_into_another_tasks_directory(
    trained, record, args, message, monkeypatch, capsys
):
    work = trained.parents[1]
    monkeypatch.chdir(work)
    folder = work / "outputs" / f"taken-{record}"
    folder.mkdir(exist_ok=True)
    (folder / record).write_text("{}\n")
    args = [a.replace("WEIGHTS", str(trained / "best.pt")) for a in args]
    monkeypatch.setattr(sys, "argv", ["resnet-train", *args, f"name=taken-{record}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert sorted(p.name for p in folder.iterdir()) == [record]


@pytest.mark.slow
def test_an_export_stopped_at_its_last_step_leaves_no_file(trained, tmp_path, monkeypatch):
    """Ctrl-C during the int8 step: the checked fp32 file is not put in place either."""
    from resnet_train.deploy import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "quantize_int8", interrupted)
    args = ["task=export", f"model.weights={trained / 'best.pt'}", "export.quantize=int8"]
    with pytest.raises(KeyboardInterrupt):
        export.run_export(compose_config(*args), tmp_path / "ex", args)
    assert list((tmp_path / "ex").iterdir()) == []


def test_staged_files_appear_together_in_order_or_not_at_all(tmp_path):
    from resnet_train.deploy.staging import Staging, remove_leftovers

    run = tmp_path / "run"
    with Staging(run) as stage:
        stage.file("a.csv").write_text("a")
        events = stage.folder("tensorboard")
        (events / "events.1").write_text("e")
        stage.file("record.json").write_text("{}")
        assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == []
        done = stage.commit()
    assert [p.name for p in done] == ["a.csv", "tensorboard", "record.json"]  # record last
    assert (run / "a.csv").read_text() == "a" and (run / "tensorboard" / "events.1").is_file()
    assert sorted(p.name for p in run.iterdir()) == ["a.csv", "record.json", "tensorboard"]
    with pytest.raises(KeyboardInterrupt), Staging(run) as stage:
        stage.file("b.csv").write_text("b")
        stage.folder("tensorboard")
        raise KeyboardInterrupt
    assert sorted(p.name for p in run.iterdir()) == ["a.csv", "record.json", "tensorboard"]
    # what a SIGKILL left: removed by the next task there; other dot files are kept
    (run / ".model.4242.tmp.onnx").write_text("x")
    (run / ".quantize.4242.tmpab12").mkdir()
    (run / ".quantize.4242.tmpab12" / "prepared.onnx").write_text("x")
    (run / ".hydra").mkdir()
    live = f".eval.{os.getppid()}.tmp.json"  # a live process's: kept
    (run / live).write_text("{}")
    assert remove_leftovers(run) == [".model.4242.tmp.onnx", ".quantize.4242.tmpab12"]
    kept = [live, ".hydra", "a.csv", "record.json", "tensorboard"]
    assert sorted(p.name for p in run.iterdir()) == kept


def test_a_stop_signal_during_the_commit_waits_until_every_file_is_in_place(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM (as a task sees it: raising) after the first of three renames: the other two,
    the record among them, are still made, and the signal is raised after them."""
    import signal

    from resnet_train.cli import Terminated, stop_signals_unwind
    from resnet_train.deploy import staging

    renames = []

    def replace(src, dst):
        renames.append(Path(dst).name)
        os.rename(src, dst)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(staging.os, "replace", replace)
    run = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a task's SIGTERM: its default
    try:
        with pytest.raises(Terminated), stop_signals_unwind(), staging.Staging(run) as stage:
            for name in ("a.csv", "b.png", "record.json"):
                stage.file(name).write_text(name)
            stage.commit()
            renames.append("after the commit")  # not reached: the signal comes first
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert renames == ["a.csv", "b.png", "record.json"]
    assert sorted(p.name for p in run.iterdir()) == ["a.csv", "b.png", "record.json"]
    # the command's last line says the files are there (not that it left none)
    from resnet_train import cli

    monkeypatch.setattr(cli, "RUNNING_TASK", ["eval"])
    with pytest.raises(SystemExit) as stop:
        cli._interrupted(Terminated(signal.SIGTERM))
    assert stop.value.code == 143
    assert capsys.readouterr().err == (
        "resnet-train: terminated (SIGTERM): it came as task=eval's files were put in place: they "
        "all are, its record included (only what it prints after them is not)\n"
    )
    staging.FINISHED_WHEN_STOPPED.clear()


def test_stop_signals_raise_only_where_they_would_have_ended_the_process():
    """SIGTERM/SIGHUP with their default action unwind a task; one that nohup ignores or a
    launcher handles is left to them."""
    import signal

    from resnet_train.cli import Terminated, stop_signals_unwind

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with stop_signals_unwind():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # nohup's, kept
            with pytest.raises(Terminated) as stop:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            assert stop.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    finally:
        signal.signal(signal.SIGHUP, before)
        signal.signal(signal.SIGTERM, term)


def test_a_ctrl_c_in_the_check_before_a_task_names_that_task(trained, monkeypatch):
    from resnet_train.deploy import source

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "load_trained", interrupted)
    work = trained.parents[1]
    r = run_cli("task=eval", f"model.weights={trained / 'best.pt'}", "name=pre", cwd=work)
    assert r.returncode == 130
    assert r.stderr.strip().startswith("resnet-train: interrupted: task=eval stopped at once")
    assert not (work / "outputs" / "pre").exists()


def _only_its_log(run: Path, task: str) -> None:
    assert sorted(p.name for p in run.iterdir()) == [".hydra", f"{task}.log"]


@pytest.mark.slow
def test_sigterm_during_an_export_leaves_no_file_and_the_next_export_cleans_up(
    trained, monkeypatch, capsys
):
    """SIGTERM (a scheduler's stop, `timeout`) unwinds like Ctrl-C: nothing put in place, the
    temporary files removed, exit 143; what a SIGKILL leaves is removed by the next run."""
    import signal

    from resnet_train.deploy import export

    work = trained.parents[1]
    real = export.quantize_int8

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the export")

    monkeypatch.setattr(export, "quantize_int8", terminated)
    args = ["task=export", f"model.weights={trained / 'best.pt'}", "export.quantize=int8",
            "name=term"]  # fmt: skip
    # SIGTERM's default action, as in a command started from a shell (an earlier test of this
    # process may have left a handler of its own)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        r = run_cli(*args, cwd=work)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet-train: terminated (SIGTERM): task=export stopped"), r.stderr
    run = work / "outputs" / "term"
    _only_its_log(run, "export")
    # a SIGKILL would have left these: the next export there removes them, and succeeds
    (run / ".model.999999.tmp.onnx").write_text("half")
    (run / ".quantize.999999.tmpq1w2").mkdir()
    monkeypatch.setattr(export, "quantize_int8", real)
    r = run_cli(*args[:-2], "name=term", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "removed what a killed task=export left here: .model.999999.tmp.onnx, " in r.stdout
    assert sorted(p.name for p in run.iterdir()) == [
        ".hydra",
        "export.json",
        "export.log",
        "model.onnx",
    ]


@pytest.mark.slow
def test_a_ctrl_c_that_a_library_wraps_in_its_own_error_is_still_an_interruption(
    trained, monkeypatch
):
    """torch's ONNX exporter turns a Ctrl-C inside its import of torch._dynamo into its own
    export error: the command still says it was interrupted, in one line, exit 130."""
    from resnet_train.deploy import export

    def wrapped(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Failed to export the model with torch.export") from e

    monkeypatch.setattr(export, "export_onnx", wrapped)
    work = trained.parents[1]
    r = run_cli("task=export", f"model.weights={trained / 'best.pt'}", "name=wrapped", cwd=work)
    assert r.returncode == 130, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # (Hydra's "Error executing job with overrides" came first)
    assert lines[-1].startswith("resnet-train: interrupted: task=export stopped at once"), lines
    _only_its_log(work / "outputs" / "wrapped", "export")


@pytest.mark.slow
def test_an_eval_interrupted_at_its_end_leaves_none_of_its_files(trained, monkeypatch):
    from resnet_train.deploy import evaluate

    def interrupted(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "write_json", interrupted)  # eval.json: the last file
    work = trained.parents[1]
    r = run_cli("task=eval", f"model.weights={trained / 'best.pt'}", "name=evi", cwd=work)
    assert r.returncode == 130, r.stderr
    _only_its_log(work / "outputs" / "evi", "eval")  # no CSV, PNG or TensorBoard file


@pytest.mark.slow
def test_eval_and_predict_take_batches_of_one_image(trained, tmp_path):
    work = trained.parents[1]
    weights = f"model.weights={trained / 'best.pt'}"
    r = run_cli("task=eval", weights, "data.batch_size=1", "name=ev-b1", cwd=work)
    assert r.returncode == 0, r.stderr
    one = json.loads((work / "outputs" / "ev-b1" / "eval.json").read_text())
    reported = json.loads((trained / "metrics.json").read_text())["test"]["acc"]
    assert one["images"] == 96 and abs(one["top1"] - reported) <= 100 / 96  # one image at most
    r = run_cli("model=resnet20", "data=synthetic", "data.batch_size=1", "trainer.epochs=1",
                "trainer.device=cpu", "name=train-b1", cwd=work)  # fmt: skip
    assert r.returncode == 2 and "data.batch_size=1 is invalid: must be >= 2" in r.stderr


def test_a_qat_model_in_eval_mode_gives_each_image_the_same_logits_in_any_batch():
    """Fake quantization takes each image's own activation ranges in eval mode, so task=eval and
    task=predict of a QAT checkpoint do not depend on the batch an image is in; training
    batches keep their batch's ranges."""
    torch.manual_seed(0)
    model = trained_looking(create_model("resnet20", num_classes=10))
    prepare_qat(model)
    images = real_images(32)
    with torch.no_grad():
        whole = model.eval()(images)
        parts = torch.cat([model(images[i : i + 8]) for i in range(0, 32, 8)])
        reordered = model(images.flip(0)).flip(0)
    assert torch.equal(whole, parts) and torch.equal(whole, reordered)
    x = torch.cat([torch.rand(1, 3, 4, 4), 10 * torch.rand(1, 3, 4, 4)])
    per_image, per_batch = fake_quantize_activation(x, per_image=True), fake_quantize_activation(x)
    assert float((per_image[0] - x[0]).abs().max()) <= 1 / 255  # its own range: fine steps
    assert float((per_batch[0] - x[0]).abs().max()) > 1 / 255  # the batch's range: coarse
