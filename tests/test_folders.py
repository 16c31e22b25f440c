"""One's own images: data=imagefolder, fine-tuning (freeze, backbone rate), class imbalance and
task=predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_train.config import validate
from resnet_train.data.folders import FolderImages, held_out_count, scan_folders
from resnet_train.data.loaders import build_loaders, read_splits
from resnet_train.data.sampler import EpochSampler
from resnet_train.data.settle import settle_data
from resnet_train.engine import faults
from resnet_train.engine.checkpoint import load_checkpoint
from resnet_train.engine.preemption import Preempted
from resnet_train.engine.trainer import EpochStats, class_weights, evaluate, fit
from resnet_train.errors import CheckpointError, ConfigError, DataError
from resnet_train.models import create_model
from resnet_train.models.freeze import freeze
from resnet_train.optim import build_optimizer, build_scheduler, group_lrs, main_lr
from tests.conftest import REPO, compose_config, make_shape_folders, run_cli, run_program
from tests.test_train import scalars

# An imbalanced set of one's own: 30, 24 and 10 pictures.
COUNTS = {"circle": 30, "square": 24, "triangle": 10}
SMALL_IMAGES = [
    "model=resnet20",
    "data=imagefolder",
    "data.image_size=32",
    "data.augment.crop=pad",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.device=cpu",
]


@pytest.fixture
def shapes(tmp_path) -> Path:
    root = make_shape_folders(tmp_path / "shapes", COUNTS)
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "square" / ".DS_Store").write_bytes(b"\0\1")
    return root


def folder_cfg(root: Path, *overrides: str):
    return compose_config(*SMALL_IMAGES, f"data.root={root}", *overrides)


# --- reading the folders --------------------------------------------------------------------------


def test_one_folder_is_split_per_class_and_its_test_split_does_not_follow_the_seed(shapes):
    found = scan_folders(str(shapes), 0.1, 0.2, 0, False)
    assert found.classes == ["circle", "square", "triangle"] and found.layout == "one folder"
    parts = {s: getattr(found, s) for s in ("train", "valid", "test")}
    every = [f for files, _ in parts.values() for f in files]
    assert len(every) == len(set(every)) == sum(COUNTS.values())  # disjoint, covering
    assert not any(f.endswith((".txt", "DS_Store")) for f in every)  # not images: ignored
    for c, (name, n) in enumerate(COUNTS.items()):
        test_n, valid_n = held_out_count(n, 0.2), held_out_count(n, 0.1)
        assert (parts["test"][1] == c).sum() == test_n
        assert (parts["valid"][1] == c).sum() == valid_n
        assert (parts["train"][1] == c).sum() == n - test_n - valid_n
        files, labels = parts["train"]
        assert {Path(f).parent.name for f in np.array(files)[labels == c]} == {name}
    other_seed = scan_folders(str(shapes), 0.1, 0.2, 1, False)
    assert other_seed.test[0] == found.test[0]  # every run is tested on the same images
    assert other_seed.valid[0] != found.valid[0]  # the validation split follows the seed
    assert held_out_count(10, 0.01) == 1  # a held-out split holds every class


def test_a_link_loop_or_a_second_link_to_an_image_reads_each_image_once(shapes):
    """A class folder holding a link to itself used to list every image ~40 times (os.walk
    follows the loop to the system's depth limit), in all three splits."""
    (shapes / "circle" / "loop").symlink_to(".", target_is_directory=True)
    first = sorted((shapes / "square").glob("*.png"))[0]
    (shapes / "square" / "again.png").symlink_to(first)
    found = scan_folders(str(shapes), 0.1, 0.2, 0, False)
    every = [f for part in (found.train, found.valid, found.test) for f in part[0]]
    assert len(every) == sum(COUNTS.values())
    assert not any("/loop/" in f for f in every)
    assert len({str(Path(f).resolve()) for f in every}) == len(every)  # each file once


def test_early_stopping_takes_a_validation_folder_whatever_the_ratio(tmp_path):
    """With its own val/ folder, data.valid_ratio is not used: data.valid_ratio=0 validates on
    val/ (early stopping was refused for want of a validation split)."""
    for split in ("train", "val"):
        make_shape_folders(tmp_path / "own" / split, {"circle": 6, "square": 6}, formats=False)
    args = ["data.valid_ratio=0", "trainer.early_stopping.patience=2"]
    validate(folder_cfg(tmp_path / "own", *args))
    with pytest.raises(ConfigError, match=r"trainer.early_stopping.patience=2 is invalid"):
        validate(folder_cfg(tmp_path / "own" / "train", *args))  # (no val/ folder there)


def test_split_folders_are_read_and_a_missing_split_is_carved_from_train(tmp_path):
    for split, n in (("train", 12), ("val", 3), ("test", 4)):
        make_shape_folders(tmp_path / "a" / split, {"circle": n, "bar": n}, formats=False)
    found = scan_folders(str(tmp_path / "a"), 0.1, 0.1, 0, False)
    assert found.layout == "split folders" and found.classes == ["bar", "circle"]
    assert [len(getattr(found, s)[0]) for s in ("train", "valid", "test")] == [24, 6, 8]
    # no test/: the test split is carved from train/ by data.test_ratio, val/ read as it is
    make_shape_folders(tmp_path / "b" / "train", {"circle": 10, "bar": 10}, formats=False)
    make_shape_folders(tmp_path / "b" / "valid", {"circle": 2, "bar": 2}, formats=False)
    found = scan_folders(str(tmp_path / "b"), 0.5, 0.2, 0, False)
    assert [len(getattr(found, s)[0]) for s in ("train", "valid", "test")] == [16, 4, 4]
    # a split without a class
    make_shape_folders(tmp_path / "c" / "train", {"circle": 4, "bar": 4}, formats=False)
    make_shape_folders(tmp_path / "c" / "test", {"circle": 2}, formats=False)
    with pytest.raises(DataError, match=r"test has no folder for class\(es\) bar: every split"):
        scan_folders(str(tmp_path / "c"), 0.0, 0.1, 0, False)


def test_the_small_validation_warning_points_at_a_validation_folder_where_there_is_one(tmp_path):
    """With DIR/train and DIR/val, data.valid_ratio does not size the validation split: the
    advice is to add images to val/ (ImageNet's val/ is its test set, and class folders alone
    have none)."""
    from omegaconf import OmegaConf

    from resnet_train.engine.trainer import _own_validation_folder

    for split in ("train", "val"):
        make_shape_folders(tmp_path / "a" / split, {"circle": 2, "bar": 2}, formats=False)
    make_shape_folders(tmp_path / "b", {"circle": 2, "bar": 2}, formats=False)

    def data(name, root):
        return OmegaConf.create({"name": name, "root": str(root)})

    assert _own_validation_folder(data("imagefolder", tmp_path / "a")) == tmp_path / "a" / "val"
    assert _own_validation_folder(data("imagefolder", tmp_path / "b")) is None
    assert _own_validation_folder(data("imagenet", tmp_path / "a")) is None


def test_bad_folders_are_one_line_errors_naming_what_to_fix(tmp_path):
    make_shape_folders(tmp_path / "empty", {"circle": 4}, formats=False)
    (tmp_path / "empty" / "square").mkdir()
    (tmp_path / "empty" / "square" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*empty/square holds no images"):
        scan_folders(str(tmp_path / "empty"), 0.1, 0.1, 0, False)
    make_shape_folders(tmp_path / "few", {"circle": 10, "square": 2}, formats=False)
    with pytest.raises(DataError, match=r"class 'square' has 1 image\(s\) left after "
                                        r"data.test_ratio=0.1 took its share to split, and "
                                        r"data.valid_ratio=0.1 takes 1"):  # fmt: skip
        scan_folders(str(tmp_path / "few"), 0.1, 0.1, 0, False)
    make_shape_folders(tmp_path / "half", {"circle": 10, "square": 10}, formats=False)
    with pytest.raises(DataError, match=r"class 'circle' has 5 image\(s\) left after "
                                        r"data.test_ratio=0.5 took its share to split, and "
                                        r"data.valid_ratio=0.5 takes 5"):  # fmt: skip
        scan_folders(str(tmp_path / "half"), 0.5, 0.5, 0, False)
    # the test split took most of each class first: both keys are named
    make_shape_folders(tmp_path / "most", {"circle": 10, "square": 10}, formats=False)
    with pytest.raises(DataError, match=r"class 'circle' has 1 image\(s\) left after "
                       r"data.test_ratio=0.9 took its share to split, and data.valid_ratio=0.1 "
                       r"takes 1 for the validation split, leaving none to train on: lower "
                       r"data.test_ratio or data.valid_ratio, add images"):  # fmt: skip
        scan_folders(str(tmp_path / "most"), 0.1, 0.9, 0, False)
    make_shape_folders(tmp_path / "one", {"circle": 10}, formats=False)
    with pytest.raises(DataError, match=r"one class folder \(circle\): a classifier needs at"):
        scan_folders(str(tmp_path / "one"), 0.1, 0.1, 0, False)
    for split in ("train", "val", "valid"):
        make_shape_folders(tmp_path / "both" / split, {"circle": 4, "bar": 4}, formats=False)
    with pytest.raises(DataError, match=r"has both val/ and valid/: keep one"):
        scan_folders(str(tmp_path / "both"), 0.1, 0.1, 0, False)
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    with pytest.raises(DataError, match=r"holds no class folders \(1 images lie in it"):
        scan_folders(str(loose), 0.1, 0.1, 0, False)
    # a class named as a split (CIFAR-100 has "train"): the error says so
    for named, message in (
        ("train", r"train holds no class folders \(4 images lie in it"),
        ("test", r"has a val/ or test/ folder but no train/ folder"),
    ):
        make_shape_folders(tmp_path / f"vehicles-{named}", {"circle": 4, "square": 4},
                           formats=False)  # fmt: skip
        (tmp_path / f"vehicles-{named}" / "square").rename(tmp_path / f"vehicles-{named}" / named)
        with pytest.raises(
            DataError,
            match=message + r".*train/, val/, valid/, test/ name the "
            r"splits: a class of one of these names needs its folder renamed",
        ):
            scan_folders(str(tmp_path / f"vehicles-{named}"), 0.1, 0.1, 0, False)
    for key, value, allowed in (
        ("data.root", None, "give data.root=DIR"),
        ("data.balance", "oversample", "allowed: none, sampler, loss"),
        ("data.mean", [0.5, 0.5], "must be three numbers"),
        ("data.std", [0.5, 0.0, 0.5], "three numbers .* > 0"),
        ("data.eval_resize", 16, "needs a resize to at least"),
        ("model.freeze", "layerX", "allowed: stem, layer1"),
        ("model.freeze", ["backbone", "fc"], "nothing would train"),
        ("optim.backbone_lr_mult", -1, "must be >= 0"),
        ("predict.top_k", 0, "must be >= 1"),
    ):
        cfg = folder_cfg(tmp_path)
        cfg.data.root = None if key == "data.root" else str(tmp_path)
        if key != "data.root":
            section, leaf = key.split(".")
            cfg[section][leaf] = value
        with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: .*{allowed}"):
            validate(cfg)
    with pytest.raises(ConfigError, match=r"data.num_classes=null is invalid: only "):
        validate(compose_config("data.num_classes=null"))
    with pytest.raises(ConfigError, match=r"predict.inputs=null is invalid: task=predict needs"):
        validate(compose_config("task=predict", f"model.weights={__file__}"))


def test_unreadable_images_stop_the_scan_naming_the_file_or_are_left_out(shapes):
    bad = shapes / "square" / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(DataError, match=rf"{bad} is not a readable image .*data.skip_bad=true"):
        scan_folders(str(shapes), 0.1, 0.1, 0, False)
    # a good header over a cut body: only decoding finds it (data.skip_bad decodes every image)
    cut = shapes / "circle" / "cut.png"
    data = (shapes / "circle" / "circle_000.png").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    found = scan_folders(str(shapes), 0.1, 0.1, 0, True)
    assert sorted(Path(p).name for p, _ in found.skipped) == ["broken.jpg", "cut.png"]
    every = [f for s in ("train", "valid", "test") for f in getattr(found, s)[0]]
    assert str(bad) not in every and str(cut) not in every
    assert len(every) == sum(COUNTS.values())


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_an_image_cut_short_is_found_before_anything_is_written(tmp_path, suffix):
    """A JPEG or PNG cut short (a download that stopped) has a good header: it was met only when
    a batch held it; in a test/ folder, after the whole training, and removing it then made the
    run's resume refused (its files changed). Its missing end marker has it decoded at the scan."""
    root = tmp_path / "split"
    for split, counts in (
        ("train", {"circle": 12, "square": 12}),
        ("test", {"circle": 4, "square": 4}),
    ):
        make_shape_folders(root / split, counts)
    picture = Image.open(root / "test" / "circle" / "circle_000.png").convert("RGB")
    picture.save(root / "test" / "circle" / f"whole{suffix}")
    data = (root / "test" / "circle" / f"whole{suffix}").read_bytes()
    cut = root / "test" / "circle" / f"cut{suffix}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    # a whole file with bytes after its end (some cameras add them) is no cut file
    (root / "test" / "square" / f"tail{suffix}").write_bytes(data + bytes(4000))
    result = run_cli(*SMALL_IMAGES, f"data.root={root}", "trainer.epochs=1", "name=r",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"resnet-train: error: {cut} is not a readable image (")
    assert result.stderr.rstrip().endswith("remove it, or set data.skip_bad=true to leave such "
                                           "files out")  # fmt: skip
    assert not (tmp_path / "outputs").exists()
    found = scan_folders(str(root), 0.1, 0.1, 0, True)
    assert [Path(p).name for p, _ in found.skipped] == [cut.name]
    assert str(root / "test" / "square" / f"tail{suffix}") in found.test[0]
    if suffix == ".jpg":  # a JPEG's trailer (a motion photo's video) is read past, not decoded
        from resnet_train.data.folders import check_image

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Image.Image, "convert", None)  # (a decode would fail here)
            assert check_image(root / "test" / "square" / f"tail{suffix}", decode=False) is None


def test_data_decoder_pil_reads_ones_own_folder_with_pil(shapes, monkeypatch):
    """data.decoder=pil was ignored for data=imagefolder: torchvision.io read it all the same."""
    from resnet_train.data import folders

    batches = {}
    for decoder in ("torchvision", "pil"):
        cfg = settle_data(folder_cfg(shapes, f"data.decoder={decoder}", "data.mean=[0.5,0.5,0.5]",
                                     "data.std=[0.25,0.25,0.25]"))  # fmt: skip
        batches[decoder] = next(iter(build_loaders(cfg.data, 0, torch.device("cpu")).test))[0]
        monkeypatch.setattr(folders, "read_image", None)  # (torchvision's reader, gone)
    # the same pictures, up to the JPEG decoders' rounding
    assert (batches["pil"] - batches["torchvision"]).abs().mean() * 0.25 * 255 < 1


def test_grayscale_palette_and_rgba_images_are_read_as_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    files = []
    for mode in ("RGB", "L", "P", "RGBA", "LA"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(rgb).convert(mode).save(path)
        files.append(str(path))
    images = FolderImages(files, np.zeros(len(files), dtype=np.int64), ["a"])
    for i, path in enumerate(files):
        image, _ = images[i]
        want = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        assert image.dtype == torch.uint8 and image.shape == (3, 9, 11)
        assert np.array_equal(image.numpy(), want), path


# --- settled keys: classes, mean and std ----------------------------------------------------------


def test_classes_come_from_the_folders_and_mean_auto_is_the_training_pixels_mean(shapes):
    cfg = folder_cfg(shapes, "data.mean=auto", "data.std=auto")
    validate(cfg)
    settle_data(cfg)
    assert cfg.data.num_classes == 3 and cfg.data.eval_resize == 32
    splits = read_splits(cfg.data, cfg.seed)
    pixels = np.stack([
        np.asarray(Image.open(splits.train_base.files[i]).convert("RGB"), dtype=np.float64)
        for i in splits.fit
    ]) / 255  # fmt: skip
    np.testing.assert_allclose(cfg.data.mean, pixels.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(cfg.data.std, pixels.std((0, 1, 2)), rtol=1e-6)
    with pytest.raises(DataError, match="data.num_classes=4 but .* has 3 class folders"):
        read_splits(folder_cfg(shapes, "data.num_classes=4").data, 0)
    # a classifier smaller than the folders' classes: refused once they are counted (it used to
    # fail at the first batch, "Target 2 is out of bounds")
    cfg = folder_cfg(shapes, "model.num_classes=2")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"model.num_classes=2 is invalid: the data has 3 "):
        settle_data(cfg)


def test_mean_null_is_that_of_the_weights_training(shapes, tmp_path):
    bare = tmp_path / "bare.pth"  # a torchvision-style file: a state dict alone
    torch.save(create_model("resnet20", num_classes=5).state_dict(), bare)
    cfg = settle_data(folder_cfg(shapes, f"model.weights={bare}"))
    assert list(cfg.data.mean) == [0.485, 0.456, 0.406]
    assert list(cfg.data.std) == [0.229, 0.224, 0.225]
    ours = tmp_path / "ours.pt"
    torch.save({"model": create_model("resnet20").state_dict(),
                "config": {"data": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}},
               ours)  # fmt: skip
    cfg = settle_data(folder_cfg(shapes, f"model.weights={ours}", "data.std=[1,1,1]"))
    assert list(cfg.data.mean) == [0.1, 0.2, 0.3] and list(cfg.data.std) == [1, 1, 1]
    cfg = settle_data(folder_cfg(shapes))  # no weights: computed
    assert 0.2 < cfg.data.mean[0] < 0.5


# --- imbalance ------------------------------------------------------------------------------------


def test_the_balanced_sampler_draws_every_class_alike_from_seed_and_epoch_alone():
    labels = np.array([0] * 300 + [1] * 60 + [2] * 15)
    weights = torch.from_numpy(1.0 / np.bincount(labels)[labels])
    sampler = EpochSampler(len(labels), seed=3, weights=weights)
    drawn = np.concatenate([labels[sampler.order(e)[0].numpy()] for e in range(40)])
    shares = np.bincount(drawn) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.02), shares
    again = EpochSampler(len(labels), seed=3, weights=weights)
    assert torch.equal(again.order(7)[0], sampler.order(7)[0])
    assert not torch.equal(sampler.order(7)[0], sampler.order(8)[0])
    sampler.set_epoch(7, start=100)  # entered mid-epoch: the rest of the same epoch
    assert [i for i, _ in sampler] == sampler.order(7)[0][100:].tolist()
    shards = [EpochSampler(len(labels), 3, rank=r, world=2, weights=weights) for r in (0, 1)]
    together = torch.stack([s.order(7)[0] for s in shards], 1).flatten()[: len(labels)]
    assert torch.equal(together, sampler.order(7)[0])


def test_class_weights_even_out_the_classes_in_the_loss():
    counts = np.array([60, 30, 10])
    weights = class_weights(counts)
    assert torch.allclose(weights, torch.tensor([100 / 180, 100 / 90, 100 / 30]))
    assert torch.allclose((weights * torch.from_numpy(counts)).float(), torch.full((3,), 100 / 3))


def test_evaluation_reports_per_class_recall_and_balanced_accuracy():
    class Fixed(torch.nn.Module):  # predicts class 0 for every image
        def forward(self, x):
            return torch.tensor([[5.0, 0.0, 0.0]]).repeat(len(x), 1)

    labels = torch.tensor([0] * 8 + [1] * 3 + [2] * 1)
    loader = [(torch.zeros(5, 3, 4, 4), labels[:5]), (torch.zeros(7, 3, 4, 4), labels[5:])]

    class Loader(list):
        dataset = range(12)

    stats = evaluate(Fixed(), Loader(loader), torch.device("cpu"), progress=False)
    assert stats.acc == pytest.approx(100 * 8 / 12)
    assert stats.class_total == [8, 3, 1] and stats.recall == [100.0, 0.0, 0.0]
    assert stats.balanced_acc == pytest.approx(100 / 3) and stats.imbalanced
    assert stats.per_class(["a", "b", "c"]) == {"a": 100.0, "b": 0.0, "c": 0.0}
    assert EpochStats(0, 0, 0, 0, class_total=[4, 0], class_correct=[2, 0]).balanced_acc == 50


# --- fine-tuning ----------------------------------------------------------------------------------


def test_freezing_takes_the_parts_out_of_training():
    model = create_model("resnet20", num_classes=3)
    names, held = freeze(model, ["stem", "layer1"], freeze_bn=False)
    assert names == ["stem", "layer1"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    parts = ("conv1", "bn1", "layer1.")
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(parts)}
    assert len(held) == 1 + 2 * 3  # the stem's BN and layer1's six
    model = create_model("resnet20", num_classes=3)
    _, held = freeze(model, "backbone", freeze_bn=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    assert len(held) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(
        ConfigError,
        match=r"model.freeze=layer4 is invalid: this model's parts "
        r"are stem, layer1, layer2, layer3, fc, backbone",
    ):
        freeze(create_model("resnet20"), ["layer4"], False)  # fmt: skip
    with pytest.raises(ConfigError, match="freezes every parameter"):
        freeze(create_model("resnet20"), ["stem", "layer1", "layer2", "layer3", "fc"], False)


def test_the_backbone_rate_multiplier_holds_through_the_schedule():
    cfg = compose_config("optim.backbone_lr_mult=0.1", "optim.lr=0.2", "schedule=cosine")
    model = create_model("resnet20")
    optimizer = build_optimizer(cfg.optim, model, 0.2)
    names = [(g["name"], g["weight_decay"]) for g in optimizer.param_groups]
    assert names == [("backbone", cfg.optim.weight_decay), ("backbone", 0.0),
                     ("head", cfg.optim.weight_decay), ("head", 0.0)]  # fmt: skip
    head = {id(p) for g in optimizer.param_groups if g["name"] == "head" for p in g["params"]}
    assert head == {id(model.fc.weight), id(model.fc.bias)}
    scheduler = build_scheduler(cfg.schedule, optimizer, 10, 5)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates = group_lrs(optimizer)
        assert rates["backbone"] == pytest.approx(0.1 * rates["head"])
        assert main_lr(optimizer) == rates["head"] < 0.2


# --- end to end -----------------------------------------------------------------------------------


def _folder_run(root: Path, run: Path, *overrides: str, expect_stop: bool = False) -> dict:
    cfg = folder_cfg(root, *overrides)
    if expect_stop:
        with pytest.raises(Preempted):
            fit(cfg, run)
        return {}
    return fit(cfg, run)


def test_frozen_parts_and_their_statistics_stay_as_loaded(shapes, tmp_path):
    start = tmp_path / "start.pt"
    torch.save(create_model("resnet20", num_classes=3).state_dict(), start)
    metrics = _folder_run(shapes, tmp_path / "run", f"model.weights={start}",
                          "model.freeze=[stem,layer1]", "optim.backbone_lr_mult=0.5",
                          "trainer.epochs=2", "trainer.log_every_steps=1")  # fmt: skip
    before, after = torch.load(start), load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    for key, value in before.items():
        same = torch.equal(after[key], value)
        kept = key.startswith(("conv1.", "bn1.", "layer1."))
        assert same == kept or key.endswith("num_batches_tracked"), key
    logged = scalars(tmp_path / "run")
    assert [v for _, v in logged["lr/backbone"]] == pytest.approx(
        [0.5 * v for _, v in logged["lr/head"]]
    )
    assert metrics["classes"] == ["circle", "square", "triangle"]
    # (statistics of a random start: an unnormalised net, trained gently)
    run = _folder_run(shapes, tmp_path / "probe", f"model.weights={start}", "model.freeze_bn=true",
                      "trainer.epochs=1", "optim.lr=0.001")  # fmt: skip
    after = load_checkpoint(tmp_path / "probe" / "last.pt")["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(after[k], before[k]) for k in stats) and run["epochs_run"] == 1


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_a_balanced_run_stopped_mid_epoch_resumes_bit_identical(
    balance, shapes, tmp_path, monkeypatch
):
    common = [f"data.balance={balance}", "trainer.epochs=2", "trainer.log_every_steps=1",
              "trainer.early_stopping.monitor=valid/balanced_acc"]  # fmt: skip
    reference = _folder_run(shapes, tmp_path / "reference", *common)
    faults.reset()
    monkeypatch.setenv(faults.ENV, "step:6:USR1")  # inside epoch 2 (4 steps an epoch)
    _folder_run(shapes, tmp_path / "run", *common, expect_stop=True)
    monkeypatch.delenv(faults.ENV)
    resumed = _folder_run(shapes, tmp_path / "run", *common, "resume=auto")
    ours = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    theirs = load_checkpoint(tmp_path / "reference" / "last.pt")["model"]
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert resumed["test"] == reference["test"] and resumed["valid"] == reference["valid"]
    assert set(resumed["valid"]["per_class_recall"]) == set(COUNTS)
    assert (
        resumed["history"][-1]["valid_balanced_acc"]
        == reference["history"][-1]["valid_balanced_acc"]
    )


def test_balance_sampler_draws_the_classes_evenly_in_training(shapes):
    cfg = settle_data(folder_cfg(shapes, "data.balance=sampler"))
    loaders = build_loaders(cfg.data, cfg.seed, torch.device("cpu"))
    drawn = []
    for epoch in range(12):
        loaders.train.sampler.set_epoch(epoch)
        drawn += [int(y) for _, labels in loaders.train for y in labels]
    shares = np.bincount(drawn) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.05), shares  # the folder holds 47%, 38%, 16%
    assert list(loaders.train_counts) == [24, 20, 8]


@pytest.mark.slow
def test_train_eval_and_predict_on_ones_own_folder_through_the_cli(shapes, tmp_path):
    """The whole path a user takes, each step as a command (a CI test of under a minute)."""
    bad = shapes / "triangle" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    args = [*SMALL_IMAGES, f"data.root={shapes}", "trainer.epochs=2", "name=own"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "outputs").exists()
    assert result.stderr.strip().splitlines() == [
        f"resnet-train: error: {bad} is not a readable image (UnidentifiedImageError: cannot "
        f"identify image file '{bad}'); remove it, or set data.skip_bad=true to leave such "
        "files out"
    ]
    result = run_cli(*args, "data.skip_bad=true", "data.balance=sampler", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{bad} (UnidentifiedImageError" in result.stdout  # listed in the log
    run = tmp_path / "outputs" / "own"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["circle", "square", "triangle"]
    recall = metrics["test"]["per_class_recall"]
    assert metrics["test"]["balanced_acc"] == pytest.approx(sum(recall.values()) / 3)
    assert load_checkpoint(run / "best.pt")["classes"] == metrics["classes"]

    result = run_cli("task=eval", f"model.weights={run}/best.pt", "name=eval", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == (
        "resnet-train: error: task=eval reads the images of the run's data=imagefolder: give its "
        "folder, data.root=DIR\n"
    )
    result = run_cli("task=eval", f"model.weights={run}/best.pt", f"data.root={shapes}",
                     "name=eval", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "outputs" / "eval" / "eval.json").read_text())
    assert evaluated["top1"] == metrics["test"]["acc"]
    assert evaluated["balanced_acc"] == pytest.approx(metrics["test"]["balanced_acc"])

    # predict the test split's images, listed in a text file (relative paths), by class name
    splits = read_splits(settle_data(folder_cfg(shapes, "data.skip_bad=true")).data, 0)
    listed = tmp_path / "list" / "test.txt"
    listed.parent.mkdir()
    test_files = splits.test_base.files
    listed.write_text("# the test split\n\n" + "\n".join(
        str(Path("..") / Path(f).relative_to(tmp_path)) for f in test_files) + "\n")  # fmt: skip
    result = run_cli("task=predict", f"model.weights={run}/best.pt", f"predict.inputs={listed}",
                     "predict.top_k=5", "name=predict", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "outputs" / "predict" / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3"]
    assert len(rows) - 1 == len(test_files)
    names = metrics["classes"]
    hits = [names.index(row[1]) == label for row, label in zip(rows[1:], splits.test_base.targets,
                                                               strict=True)]  # fmt: skip
    assert 100 * sum(hits) / len(hits) == pytest.approx(evaluated["top1"])
    for row in rows[1:]:
        probs = [float(p) for p in row[2::2]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    assert "predicted" in result.stdout and "top-1" in result.stdout

    result = run_cli("task=predict", f"model.weights={run}/best.pt", f"predict.inputs={bad}",
                     "name=predict_bad", cwd=tmp_path)  # fmt: skip
    # (the run's data.skip_bad=true holds for its predictions too: the one file is left out)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"resnet-train: error: predict.inputs: none of the 1 file(s) is a "
                             f"readable image ({bad}: UnidentifiedImageError: cannot identify "
                             f"image file '{bad}')\n")  # fmt: skip
    assert not (tmp_path / "outputs" / "predict_bad").exists()

    # keys given are checked against the checkpoint's data (they were against data=cifar10's)
    result = run_cli("task=eval", f"model.weights={run}/best.pt", f"data.root={shapes}",
                     "data.image_size=48", "name=eval48", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "outputs" / "eval48" / "eval.json").read_text())["images"] > 0
    # a key the task does not read, a name that is a file, a folder of one's own: one line
    (tmp_path / "outputs" / "afile").write_text("")
    (tmp_path / "outputs" / "mine").mkdir()
    (tmp_path / "outputs" / "mine" / "predictions.csv").write_text("my own\n")
    for extra, message in (
        ("resume=auto", "resume='auto' is invalid: it continues a training run; task=predict"),
        ("name=afile", "outputs/afile is a file, not a folder to write the run into"),
        ("name=mine", "outputs/mine holds files that no task wrote there (predictions.csv)"),
    ):
        result = run_cli(
            "task=predict",
            f"model.weights={run}/best.pt",
            f"predict.inputs={shapes / 'circle'}",
            "name=p",
            extra,
            cwd=tmp_path,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "outputs" / "mine" / "predictions.csv").read_text() == "my own\n"
    # a link to an image that is gone: said, not dropped without a word
    (shapes / "circle" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    result = run_cli(
        "task=predict",
        f"model.weights={run}/best.pt",
        f"predict.inputs={shapes / 'circle'}",
        "name=links",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "left out " + str(shapes / "circle" / "gone.png") + ", a link" in result.stdout
    # fine-tuning onto other classes: the new classifier cannot be frozen
    two = make_shape_folders(tmp_path / "two", {"ring": 6, "bar": 6}, formats=False)
    result = run_cli(*SMALL_IMAGES, f"data.root={two}", f"model.weights={run}/best.pt",
                     "model.freeze=[fc]", "name=frozen", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "it freezes fc, but the classifier" in result.stderr
    assert not (tmp_path / "outputs" / "frozen").exists()


@pytest.mark.slow
def test_fine_tuning_from_a_checkpoint_beats_training_from_scratch(tmp_path):
    """Pretrained on four shapes, then given eight pictures of each of four classes (two of them
    new shapes) for four epochs: the fine-tuned model beats the one trained from scratch on the
    same images for the same epochs, for two seeds."""
    pre = make_shape_folders(tmp_path / "pre", {k: 60 for k in ("circle", "square", "triangle",
                                                                  "cross")}, seed=1)  # fmt: skip
    own = tmp_path / "own"
    for split, n, seed in (("train", 8, 2), ("val", 4, 3), ("test", 25, 4)):
        make_shape_folders(own / split, {k: n for k in ("ring", "bar", "square", "triangle")},
                           seed=seed)  # fmt: skip
    _folder_run(pre, tmp_path / "pretrained", "trainer.epochs=6", "optim.lr=0.05")
    for seed in (0, 1):
        common = ["trainer.epochs=4", "optim.lr=0.02", f"seed={seed}"]
        scratch = _folder_run(own, tmp_path / f"scratch{seed}", *common)
        tuned = _folder_run(own, tmp_path / f"tuned{seed}", *common,
                            f"model.weights={tmp_path}/pretrained/best.pt")  # fmt: skip
        assert tuned["test"]["acc"] > scratch["test"]["acc"] + 10, (tuned["test"], scratch["test"])


def test_the_tensor_loader_draws_balanced_epochs_too():
    from resnet_train.config import AugmentConfig
    from resnet_train.data.loaders import balanced_weights
    from resnet_train.data.tensor_loader import TensorLoader

    labels = np.array([0] * 90 + [1] * 30)
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    loader = TensorLoader(images, torch.from_numpy(labels), 16, 0, True, AugmentConfig(),
                          [0.5] * 3, [0.5] * 3, weights=balanced_weights(labels))  # fmt: skip
    drawn = []
    for epoch in range(10):
        loader.set_epoch(epoch)
        drawn += [int(y) for _, batch in loader for y in batch]
    assert abs(np.mean(drawn) - 0.5) < 0.05  # class 1 is a quarter of the images


def test_an_error_in_a_data_worker_is_one_line_on_the_command_line():
    from torch.utils.data import DataLoader

    from resnet_train.cli import one_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DataError("/data/x.png is not a readable image (OSError: truncated)")

    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert one_line(str(caught.value)) == "/data/x.png is not a readable image (OSError: truncated)"
    assert one_line("plain message") == "plain message"


def test_the_fine_tuning_recipe_runs_from_torchvision_weights(shapes, tmp_path):
    """experiment=finetune_resnet50 from a torchvision-layout ResNet-50 file (1000 classes): a
    new classifier for the folder's classes, ImageNet's mean and std, the backbone at a tenth
    of the classifier's rate."""
    import torchvision

    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    cfg = compose_config("experiment=finetune_resnet50", f"data.root={shapes}",
                         f"model.weights={weights}", "data.image_size=32", "trainer.epochs=2",
                         "data.train_size=16", "data.num_workers=0", "trainer.device=cpu",
                         "trainer.log_every_steps=1")  # fmt: skip
    validate(cfg)
    metrics = fit(cfg, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "best.pt")
    assert saved["model"]["fc.weight"].shape == (3, 2048)
    assert saved["config"]["data"]["mean"] == [0.485, 0.456, 0.406]
    assert saved["config"]["data"]["eval_resize"] == round(32 / 0.875)
    logged = scalars(tmp_path / "run")
    backbone, head = logged["lr/backbone"][0][1], logged["lr/head"][0][1]
    assert backbone == pytest.approx(0.1 * head) and metrics["epochs_run"] == 2


def test_a_part_the_model_lacks_is_refused_before_anything_is_read_or_written(shapes, tmp_path):
    result = run_cli(*SMALL_IMAGES, f"data.root={shapes}", "model.freeze=[stem,layer4]",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""  # no mean computed, nothing logged
    assert result.stderr == ("resnet-train: error: model.freeze=layer4 is invalid: this model's "
                             "parts are stem, layer1, layer2, layer3, fc, backbone\n")  # fmt: skip
    assert not (tmp_path / "outputs").exists()


def test_a_floor_above_the_backbone_rate_is_refused(shapes):
    from resnet_train.engine.plan import plan_steps

    cfg = settle_data(folder_cfg(shapes, "optim.lr=0.01", "optim.backbone_lr_mult=0.1",
                                 "schedule.min_lr=0.005"))  # fmt: skip
    validate(cfg)
    with pytest.raises(ConfigError, match=r"^schedule.min_lr=0.005 is invalid: the floor must be "
                       r"below the backbone's learning rate 0.001 \(optim.backbone_lr_mult=0.1 "
                       r"x 0.01\), or schedule=cosine would raise that rate to it$"):  # fmt: skip
        plan_steps(cfg, 50, 1)


def test_the_model_and_the_folder_must_agree_on_the_classes(shapes, tmp_path, caplog):
    """A resumed run on a changed folder, an evaluation on a changed folder or on other classes,
    and a fine-tuning start from other classes of the same count are each caught."""
    run = tmp_path / "run"
    _folder_run(shapes, run, "trainer.epochs=1")
    saved = load_checkpoint(run / "last.pt")
    assert saved["data_files"]["images"] == {"train": 52, "valid": 6, "test": 6}
    from resnet_train.deploy.evaluate import split_changes
    from resnet_train.deploy.source import load_trained

    evaluated = ["task=eval", f"model.weights={run}/best.pt", f"data.root={shapes}"]
    assert load_trained(compose_config(*evaluated), evaluated).files_changed is None
    # an image added: the splits would move; refused in one line before the config's diff
    (shapes / "square" / "new.png").write_bytes((shapes / "square" / "square_000.png").read_bytes())
    from resnet_train.data.folders import scan_files

    scan_files.cache_clear()
    # evaluated there, the model meets images it trained on: warned, and not "the same" figures
    changed = load_trained(compose_config(*evaluated), evaluated)
    now = "train/valid/test images 52/6/6 then, 51/7/7 now"
    assert changed.files_changed == now
    assert split_changes(changed) == [f"data.root's files: {now}"]
    with caplog.at_level("WARNING", logger="resnet_train"):
        changed.check_data_classes()
    assert f"does not hold the files best.pt was trained on ({now}): images added" in caplog.text
    with pytest.raises(
        CheckpointError,
        match=r"was trained on other images: data.root's folders "
        r"changed since \(train/valid/test images 52/6/6 then, 51/7/7 now\)",
    ):
        _folder_run(shapes, run, "trainer.epochs=2", "resume=auto")  # fmt: skip
    # the same classes in other folders (renamed): a fine-tuning start replaces the classifier
    other = make_shape_folders(tmp_path / "other", {"bar": 10, "cross": 10, "ring": 10})
    tuned = tmp_path / "tuned"
    _folder_run(other, tuned, f"model.weights={run}/best.pt", "trainer.epochs=1", "optim.lr=1e-9")
    start, after = load_checkpoint(run / "best.pt")["model"], load_checkpoint(tuned / "last.pt")
    assert not torch.allclose(start["fc.weight"], after["model"]["fc.weight"])  # re-initialised
    assert torch.allclose(start["layer3.2.conv2.weight"], after["model"]["layer3.2.conv2.weight"])
    # ... and evaluating the first model on them is refused, naming both
    args = ["task=eval", f"model.weights={run}/best.pt", f"data.root={other}"]
    trained = load_trained(compose_config(*args), args)
    with pytest.raises(DataError, match=r"has the classes bar, cross, ring but best.pt was trained "
                                        r"on circle, square, triangle"):  # fmt: skip
        trained.check_data_classes()


def test_predict_reads_a_folder_as_training_does_and_keeps_the_checkpoints_settings(
    shapes, tmp_path
):
    """predict.inputs=FOLDER follows links and leaves out hidden folders, as a class folder is
    read; `data=imagefolder` named again keeps the run's 32-px preprocessing (it took the
    config file's 224 px, and the model's stem then failed to load)."""
    from resnet_train.deploy.predict import list_inputs
    from resnet_train.deploy.source import load_trained

    make_shape_folders(tmp_path / "elsewhere", {"ring": 3})
    inbox = tmp_path / "inbox"
    (inbox / ".ipynb_checkpoints").mkdir(parents=True)
    image = (shapes / "circle" / "circle_000.png").read_bytes()
    (inbox / "a.png").write_bytes(image)
    (inbox / ".ipynb_checkpoints" / "a-checkpoint.png").write_bytes(image)
    (inbox / "more").symlink_to(tmp_path / "elsewhere" / "ring", target_is_directory=True)
    assert [p.relative_to(inbox).with_suffix("").as_posix() for p in list_inputs(str(inbox))
            ] == ["a", "more/ring_000", "more/ring_001", "more/ring_002"]  # fmt: skip
    run = tmp_path / "run"
    _folder_run(shapes, run, "trainer.epochs=1")
    args = ["task=predict", "data=imagefolder", f"model.weights={run}/best.pt",
            f"predict.inputs={inbox}"]  # fmt: skip
    trained = load_trained(compose_config(*args), args)
    assert (trained.cfg.data.image_size, trained.cfg.data.augment.crop) == (32, "pad")
    # another key given still wins over the checkpoint's
    args = [*args, "data.eval_resize=40"]
    assert load_trained(compose_config(*args), args).cfg.data.eval_resize == 40


def test_predict_with_a_torchvision_file_needs_no_folder(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    make_shape_folders(tmp_path / "new", {"ring": 3})
    result = run_cli("task=predict", "model=resnet18", f"model.weights={weights}",
                     "data=imagefolder", "data.image_size=64", "model.stem=imagenet",
                     f"predict.inputs={tmp_path / 'new'}", "predict.show=0", "name=p",
                     "trainer.device=cpu", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "outputs" / "p" / "predict.json").read_text())
    assert record["classes"] == [f"class{i}" for i in range(7)] and record["images"] == 3
    assert record["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert record["preprocessing"]["resize"] == round(64 / 0.875)
    assert "(the first 0 above)" not in result.stdout


def test_shape_folders_script_replaces_only_a_data_set_it_made(tmp_path):
    """`make_shape_folders.py .` deleted everything in the current folder, then failed."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for target in (".", str(mine / "notes.txt")):
        result = run_program(str(REPO / "scripts" / "make_shape_folders.py"), target, cwd=mine)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    for _ in range(2):  # a new folder, then the same one again: made, then replaced
        result = run_program(str(REPO / "scripts" / "make_shape_folders.py"), "demo", cwd=mine)
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (mine / "demo").iterdir()) == ["new", "own", "pretrain"]
        assert len(list((mine / "demo" / "new").iterdir())) == 12
