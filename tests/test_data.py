"""Data: the CIFAR reader, ImageFolder, synthetic data, the validation split, transforms."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from resnet_train.config import validate
from resnet_train.data import build_loaders
from resnet_train.data import cifar as cifar_module
from resnet_train.data.cifar import load_cifar
from resnet_train.data.split import stratified_split, stratified_subset
from resnet_train.data.synthetic import make_synthetic
from resnet_train.data.transforms import build_transform
from resnet_train.errors import ConfigError, DataError
from tests.conftest import SHARED_DATA, compose_config, make_cifar, make_image_folders

CPU = torch.device("cpu")


def test_cifar10_reader_returns_the_written_images_and_labels(cifar10_root):
    root, written = cifar10_root
    for split in ("train", "test"):
        images, labels = load_cifar("cifar10", root, train=split == "train", download=False)
        assert images.dtype == np.uint8 and images.shape == (len(written[split][0]), 32, 32, 3)
        assert np.array_equal(images, written[split][0])
        assert np.array_equal(labels, written[split][1])


def test_cifar100_reader_uses_fine_labels(tmp_path):
    written = make_cifar(tmp_path, "cifar100", per_file=120)
    images, labels = load_cifar("cifar100", tmp_path, train=True, download=False)
    assert np.array_equal(images, written["train"][0])
    assert np.array_equal(labels, written["train"][1]) and labels.max() == 99


@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="no real CIFAR-10")
def test_cifar10_reader_agrees_with_torchvision_on_the_real_files():
    import torchvision

    images, labels = load_cifar("cifar10", SHARED_DATA, train=False, download=False)
    reference = torchvision.datasets.CIFAR10(str(SHARED_DATA), train=False, download=False)
    assert np.array_equal(images, reference.data)
    assert np.array_equal(labels, np.asarray(reference.targets))


def test_missing_cifar_without_download_names_the_path(tmp_path):
    with pytest.raises(DataError) as error:
        load_cifar("cifar10", tmp_path / "nowhere", train=True, download=False)
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "data.root" in message and "\n" not in message


def test_failed_download_says_where_it_looked_and_what_to_set(tmp_path, monkeypatch):
    def offline(name, root):
        (root / "cifar-10-batches-py").mkdir(parents=True)  # as torchvision's download does
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar_module, "_download", offline)
    with pytest.raises(DataError) as error:
        load_cifar("cifar10", tmp_path / "new" / "data", train=True, download=True)
    assert not (tmp_path / "new").exists()  # no empty folders left behind
    with pytest.raises(DataError) as error:
        load_cifar("cifar10", tmp_path, train=True, download=True)
    assert tmp_path.is_dir()  # (a folder that was there stays)
    message = str(error.value)
    assert f"not found in {tmp_path / 'cifar-10-batches-py'} and the download failed" in message
    assert "set data.root to the folder that contains cifar-10-batches-py/" in message
    assert "\n" not in message


def test_imagenet_evaluates_at_its_image_size_over_0875_and_the_tensor_path_takes_no_resize():
    """data=imagenet data.image_size=128 evaluated with a resize to 256 (the centre half of the
    picture, at twice the training scale); the tensor path ignored data.eval_resize while the
    DataLoader path applied it (two test figures for one config)."""
    from resnet_train.data.settle import settle_data
    from tests.conftest import run_dir_name

    # a run begun when imagenet.yaml said 256 keeps its folder: null is named as what it means
    assert run_dir_name("data=imagenet") == run_dir_name("data=imagenet", "data.eval_resize=256")
    assert run_dir_name("data=imagenet", "data.image_size=128") == run_dir_name(
        "data=imagenet", "data.image_size=128", "data.eval_resize=146"
    )
    for size, resize in ((224, 256), (128, 146), (160, 183)):
        cfg = settle_data(compose_config("data=imagenet", f"data.image_size={size}"))
        assert cfg.data.eval_resize == resize
        steps = [type(t).__name__ for t in build_transform(cfg.data, train=False).transforms]
        assert steps[:2] == ["Resize", "CenterCrop"]
    with pytest.raises(ConfigError, match=r"data.eval_resize=64 is invalid: it needs "
                       r"data.loader=torch"):  # fmt: skip
        validate(compose_config("data=cifar10", "data.eval_resize=64"))
    validate(compose_config("data=cifar10", "data.eval_resize=64", "data.loader=torch"))
    validate(compose_config("data=cifar10", "data.eval_resize=32"))  # (no resize at 32 px)


def test_corrupt_cifar_file_is_named(tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR batch file"):
        load_cifar("cifar10", tmp_path, train=True, download=False)


def test_split_is_stratified_disjoint_covering_and_seed_stable():
    labels = np.repeat(np.arange(10), [100, 90, 80, 70, 60, 50, 40, 30, 20, 10])
    train, valid = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, valid)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, valid])), np.arange(len(labels)))
    for c, count in enumerate([100, 90, 80, 70, 60, 50, 40, 30, 20, 10]):
        assert (labels[valid] == c).sum() == round(0.1 * count)
    again_train, again_valid = stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(valid, again_valid) and np.array_equal(train, again_train)
    _, other_valid = stratified_split(labels, 0.1, seed=4)
    assert not np.array_equal(valid, other_valid)


def test_split_with_zero_ratio_keeps_everything_for_training():
    labels = np.arange(50) % 5
    train, valid = stratified_split(labels, 0.0, seed=0)
    assert len(valid) == 0 and np.array_equal(train, np.arange(50))


def test_subset_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    chosen = stratified_subset(labels, 100, seed=0)
    assert len(chosen) == 100
    assert np.bincount(labels[chosen]).tolist() == [40, 30, 20, 10]


def test_synthetic_data_is_made_from_the_seed():
    a_images, a_labels = make_synthetic(64, 10, 32, seed=1)
    b_images, b_labels = make_synthetic(64, 10, 32, seed=1)
    c_images, _ = make_synthetic(64, 10, 32, seed=2)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (64, 32, 32, 3) and np.bincount(a_labels).tolist() == [7] * 4 + [6] * 6
    # made a chunk at a time, a set is what it was made at once (each chunk's noise follows)
    images, labels = make_synthetic(2500, 3, 8, seed=5)
    rng = np.random.default_rng(5)
    templates = rng.uniform(0, 255, size=(3, 4, 4, 3)).repeat(2, axis=1).repeat(2, axis=2)
    expected_labels = rng.permutation(np.arange(2500) % 3)
    noise = rng.normal(0, 48, size=(2500, 8, 8, 3))
    expected = np.clip(templates[expected_labels] + noise, 0, 255).astype(np.uint8)
    assert np.array_equal(labels, expected_labels) and np.array_equal(images, expected)
    # a set too large to make in memory is refused, naming the key (it was numpy's MemoryError)
    with pytest.raises(ConfigError, match=r"data.train_size=100000000 is invalid: data=synthetic "
                       r"makes its images in memory: at most 699,050 of 32x32 px"):  # fmt: skip
        validate(compose_config("data=synthetic", "data.train_size=100000000"))


@pytest.mark.parametrize("loader", ["torch", "tensor"])
def test_cifar_loaders_split_valid_from_train_and_keep_test_whole(cifar10_root, loader):
    root, written = cifar10_root
    cfg = compose_config("data=cifar10", f"data.root={root}", "data.num_workers=0",
                         "data.batch_size=16", f"data.loader={loader}")  # fmt: skip
    loaders = build_loaders(cfg.data, seed=0, device=CPU)
    n_train = len(written["train"][1])
    assert len(loaders.train.dataset) + len(loaders.valid.dataset) == n_train
    assert len(loaders.valid.dataset) == 20  # 10% of 200, 2 per class
    assert len(loaders.test.dataset) == len(written["test"][1])
    if loader == "torch":
        train_idx = set(loaders.train.dataset.indices.tolist())
        assert not train_idx & set(loaders.valid.dataset.indices.tolist())
    # Together, one epoch of training and the validation set hold every training label once.
    seen = torch.cat([y for _, y in loaders.train] + [y for _, y in loaders.valid])
    assert np.bincount(seen.numpy()).tolist() == np.bincount(written["train"][1]).tolist()
    images, labels = next(iter(loaders.train))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    # Test images are normalised with the data set's mean and std and not augmented.
    test_images, _ = next(iter(loaders.test))
    expected = (
        torch.from_numpy(written["test"][0][:16]).permute(0, 3, 1, 2).float() / 255
        - torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    ) / torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    assert torch.allclose(test_images, expected, atol=1e-5)


def test_train_size_takes_a_stratified_subset(cifar10_root):
    root, _ = cifar10_root
    cfg = compose_config(
        "data=cifar10",
        f"data.root={root}",
        "data.num_workers=0",
        "data.train_size=100",
        "data.test_size=20",
    )
    loaders = build_loaders(cfg.data, seed=0, device=CPU)
    assert len(loaders.train.dataset) + len(loaders.valid.dataset) == 100
    assert len(loaders.test.dataset) == 20


def test_image_folders_are_read_with_imagenet_transforms(tmp_path):
    root = make_image_folders(tmp_path, classes=3, per_class=10)
    cfg = compose_config(
        "data=imagenet",
        f"data.root={root}",
        "data.num_classes=3",
        "data.image_size=32",
        "data.eval_resize=36",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.valid_ratio=0.2",
    )
    loaders = build_loaders(cfg.data, seed=0, device=CPU)
    assert (len(loaders.train.dataset), len(loaders.valid.dataset), len(loaders.test.dataset)) == (
        24,
        6,
        30,
    )
    for loader in (loaders.train, loaders.valid, loaders.test):
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("crop", ["random_resized", "none"])
def test_image_files_of_any_size_come_out_at_image_size_without_an_eval_resize(crop, tmp_path):
    """data.eval_resize=0 turns the resize off, not the crop: images of several sizes (40 px
    high, 40 to 80 wide) are center-cropped to image_size (they failed to stack)."""
    root = make_image_folders(tmp_path, classes=2, per_class=6)
    cfg = compose_config("data=imagenet", f"data.root={root}", "data.num_classes=2",
                         "data.image_size=32", "data.eval_resize=0", "data.num_workers=0",
                         "data.batch_size=4", "data.valid_ratio=0.25", "data.mean=[0.5,0.5,0.5]",
                         "data.std=[0.25,0.25,0.25]", f"data.augment.crop={crop}")  # fmt: skip
    loaders = build_loaders(cfg.data, seed=0, device=CPU)
    for loader in (loaders.train, loaders.valid, loaders.test):
        for images, _ in loader:
            assert images.shape[1:] == (3, 32, 32)


def test_torchvision_decoder_gives_the_pixels_pil_gives(tmp_path):
    root = make_image_folders(tmp_path, classes=2, per_class=3)
    from PIL import Image

    from resnet_train.data.folders import read_image

    for path in sorted((root / "val").rglob("*.png")):
        with Image.open(path) as image:
            expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(read_image(str(path)), expected)
    common = ["data=imagenet", f"data.root={root}", "data.num_classes=2", "data.image_size=32",
              "data.eval_resize=36", "data.num_workers=0", "data.batch_size=3",
              "data.valid_ratio=0"]  # fmt: skip
    tests = [
        next(iter(build_loaders(compose_config(*common, f"data.decoder={d}").data, 0, CPU).test))
        for d in ("torchvision", "pil")
    ]
    # The same evaluation images, up to one level of 255 where the tensor and PIL resizes round
    # differently.
    one_level = 1.01 / (255 * min(compose_config(*common).data.std))
    torch.testing.assert_close(tests[0][0], tests[1][0], rtol=0, atol=one_level)
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not_an_image.png is not a readable image .*cannot "
                       "identify image file"):  # fmt: skip
        read_image(str(bad))  # torchvision fails, PIL says what is wrong


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_decoder_turns_a_photo_upright_as_its_exif_orientation_says(tmp_path, orientation):
    """A phone stores a portrait photo sideways with an EXIF orientation tag that viewers follow;
    the decoders fed it to the model sideways. Each (torchvision, PIL, and the device decoder's
    own reading of the tag, run here on the CPU) now gives the upright image PIL's exif_transpose
    gives: the same pixels as torchvision (the same libjpeg), within JPEG's rounding of PIL's."""
    from PIL import Image, ImageOps

    from resnet_train.data.device_decode import collate_files, decode_batch, read_file_bytes
    from resnet_train.data.folders import read_image, read_pil_image
    from tests.conftest import EXIF_ORIENTATION

    # smooth, and unlike itself under any turn or flip: a wrong orientation is far off
    y, x = np.mgrid[0:24, 0:40]
    pixels = np.stack([x * 6, y * 10, (x + y) * 3], axis=-1).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, quality=95, subsampling=0, exif=exif.tobytes())
    stored = Image.fromarray(pixels)
    stored.info["exif"] = exif.tobytes()
    upright = np.array(ImageOps.exif_transpose(stored))
    expected = torch.from_numpy(upright).permute(2, 0, 1)

    torchvision_image = read_image(str(path))
    pil_image = torch.from_numpy(np.array(read_pil_image(str(path)))).permute(2, 0, 1)
    data, lengths, _, _, orientations, _ = collate_files([(read_file_bytes(str(path)), 0, -1, 0)])
    assert orientations.tolist() == [orientation]
    (device_image,) = decode_batch([data], torch.device("cpu"), orientations.tolist())
    assert torch.equal(device_image, torchvision_image)
    for image in (torchvision_image, pil_image):
        assert image.shape == expected.shape == ((3, 24, 40) if orientation < 5 else (3, 40, 24))
        assert (image.int() - expected.int()).abs().float().mean() < 2


def test_an_exif_tag_after_an_xmp_and_large_segments_turns_the_photo_alike_everywhere(tmp_path):
    """torchvision's own reading missed an EXIF segment after an XMP one, and the device
    decoder's stopped at 128 KiB of segments (an ICC profile can be larger): both turn it now,
    as PIL does."""
    import struct

    from PIL import Image

    from resnet_train.data.device_decode import collate_files, decode_batch, read_file_bytes
    from resnet_train.data.folders import read_image, read_pil_image
    from tests.conftest import EXIF_ORIENTATION

    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    y, x = np.mgrid[0:24, 0:40]
    pixels = np.stack([x * 6, y * 10, (x + y) * 3], axis=-1).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95, subsampling=0, exif=exif.tobytes())
    data = path.read_bytes()

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    xmp = segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>")
    large = b"".join(segment(0xED, bytes(60000)) for _ in range(4))  # 240 KB before the EXIF
    path.write_bytes(data[:2] + xmp + large + data[2:])
    files, _, _, _, orientations, _ = collate_files([(read_file_bytes(str(path)), 0, -1, 0)])
    assert orientations.tolist() == [6]
    (device,) = decode_batch([files], torch.device("cpu"), orientations.tolist())
    pil = torch.from_numpy(np.array(read_pil_image(str(path)))).permute(2, 0, 1)
    torchvision_image = read_image(str(path))
    assert torch.equal(device, torchvision_image)
    for image in (torchvision_image, pil):
        assert image.shape == (3, 40, 24)
        assert (image.int() - pil.int()).abs().float().mean() < 2


def test_a_webp_photo_is_turned_upright_by_the_default_decoder_too(tmp_path):
    """torchvision decodes a WebP but leaves its EXIF tag unread: it went in sideways."""
    from PIL import Image, features

    from resnet_train.data.folders import read_image
    from tests.conftest import EXIF_ORIENTATION

    if not features.check("webp"):
        pytest.skip("PIL without WebP")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "p.webp", exif=exif.tobytes())
    assert read_image(str(tmp_path / "p.webp")).shape == (3, 40, 24)


def test_the_exif_reader_takes_odd_files_as_upright():
    from resnet_train.data.device_decode import jpeg_orientation

    odd = [b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n" + bytes(100), b"\xff\xd8\xff\xe1\x00\x08Exif",
           b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff"]  # fmt: skip
    for data in odd:  # empty, cut short, not a JPEG, a short EXIF segment, an IFD past the end
        assert jpeg_orientation(torch.tensor(list(data), dtype=torch.uint8)) == 1


def test_device_decoder_gives_the_batches_the_worker_decoder_gives(tmp_path):
    # data.decoder=gpu decodes in the main process on the training device; here the device is
    # the CPU, where nvJPEG's place is taken by the same libjpeg-turbo the workers use, so the
    # batches (seeded random-resized crops, flips, JPEGs and PNGs) must be equal exactly.
    root = make_image_folders(tmp_path, classes=2, per_class=4, jpeg_every=2,
                              exif_orientations=True)  # fmt: skip
    assert len(list(root.rglob("*.jpg"))) == len(list(root.rglob("*.png"))) == 8
    common = ["data=imagenet", f"data.root={root}", "data.num_classes=2", "data.image_size=24",
              "data.eval_resize=28", "data.batch_size=3", "data.valid_ratio=0.25"]  # fmt: skip
    batches = {}
    for decoder, workers in (("torchvision", 2), ("gpu", 0), ("gpu", 2)):
        cfg = compose_config(*common, f"data.decoder={decoder}", f"data.num_workers={workers}")
        loaders = build_loaders(cfg.data, seed=3, device=CPU)
        loaders.train.sampler.set_epoch(1)
        batches[decoder, workers] = [
            list(loader) for loader in (loaders.train, loaders.valid, loaders.test)
        ]
        assert len(loaders.train.dataset) == 6 and len(loaders.train) == 2
    reference = batches["torchvision", 2]
    for key in (("gpu", 0), ("gpu", 2)):
        for got, expected in zip(batches[key], reference, strict=True):
            assert len(got) == len(expected) > 0
            for (images, labels), (ref_images, ref_labels) in zip(got, expected, strict=True):
                assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32
                assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


def test_an_unreadable_file_is_one_line_naming_it_with_every_decoder(tmp_path):
    """data=imagenet reads its files as it trains: a file cut short stopped the run with a
    traceback (PIL's decoder, the device decoder) that did not name it."""
    root = make_image_folders(tmp_path, classes=2, per_class=4, jpeg_every=2)
    bad = root / "val" / "n00000001" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    common = ["data=imagenet", f"data.root={root}", "data.num_classes=2", "data.image_size=24",
              "data.eval_resize=28", "data.batch_size=8", "data.valid_ratio=0.25",
              "data.num_workers=0"]  # fmt: skip
    for decoder in ("torchvision", "pil", "gpu"):  # (gpu: the device decoder, on the CPU here)
        loaders = build_loaders(compose_config(*common, f"data.decoder={decoder}").data, 0, CPU)
        with pytest.raises(DataError, match=rf"^{bad} is not a readable image \(.*\); remove it "
                           r"\(data=imagenet reads its files as it trains"):  # fmt: skip
            list(loaders.test)


def test_device_decoder_needs_image_files_and_a_cuda_device():
    with pytest.raises(ConfigError, match=r"data.decoder='gpu' is invalid: .*CUDA"):
        validate(compose_config("data=imagenet", "data.decoder=gpu", "trainer.device=cpu"))
    with pytest.raises(ConfigError, match=r"data.decoder='gpu' is invalid"):
        validate(compose_config("data=cifar10", "data.decoder=gpu", "trainer.device=cpu"))


def test_null_workers_means_one_per_usable_cpu():
    from resnet_train.data.loaders import worker_count

    cfg = compose_config("data=imagenet", "data.num_workers=null").data
    assert worker_count(cfg) == min(len(os.sched_getaffinity(0)), 16)
    assert worker_count(compose_config("data=imagenet", "data.num_workers=3").data) == 3


def test_image_folders_with_the_wrong_class_count_say_so(tmp_path):
    root = make_image_folders(tmp_path, classes=3, per_class=2)
    cfg = compose_config("data=imagenet", f"data.root={root}")
    with pytest.raises(DataError, match="data.num_classes=1000 but .* has 3 class folders"):
        build_loaders(cfg.data, seed=0, device=CPU)


def test_missing_image_folders_name_the_path(tmp_path):
    cfg = compose_config("data=imagenet", f"data.root={tmp_path}")
    with pytest.raises(DataError, match=f"{tmp_path / 'train'} is missing"):
        build_loaders(cfg.data, seed=0, device=CPU)


def test_cifar_augmentation_is_a_padded_crop_and_a_flip():
    cfg = compose_config("data=cifar10").data
    transform = build_transform(cfg, train=True)
    image = (
        torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 32)
    )
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    torch.manual_seed(0)
    for _ in range(20):
        out = transform(image)
        pixels = (out * std + mean) * 255
        restored = pixels.round().clamp(0, 255).to(torch.uint8)
        # The output is some 32x32 window of the zero-padded image, maybe mirrored.
        windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(restored, w) or torch.equal(restored, w.flip(-1)) for w in windows)


@pytest.mark.parametrize("classes", [3, 10, 100])
def test_subset_sizes_are_exact_for_every_size(classes):
    # Rounding each class's quota alone gave 0 of 5 (10 classes of 4 images each: round(0.5)
    # is 0) and 10 of 15; the largest-remainder shares add up to the size asked for.
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(4 * classes + 7) % classes)
    for size in range(1, len(labels) + 1):
        chosen = stratified_subset(labels, size, seed=1)
        assert len(chosen) == size == len(np.unique(chosen))
        counts = np.bincount(labels[chosen], minlength=classes)
        quotas = np.bincount(labels, minlength=classes) * size / len(labels)
        assert np.all(np.abs(counts - quotas) < 1)  # each class within one of its share


def test_valid_split_takes_the_rounded_share_of_the_whole_set():
    labels = np.arange(15) % 10  # 5 classes of 2 images, 5 of 1
    for ratio, expected in ((0.1, 2), (0.2, 3), (0.5, 8), (0.999, 15), (0.01, 0)):
        train, valid = stratified_split(labels, ratio, seed=0)
        assert len(valid) == expected and len(train) == 15 - expected


def test_cifar_subsets_of_five_are_five_images(cifar10_root):
    from resnet_train.data.loaders import read_splits

    root, _ = cifar10_root
    cfg = compose_config("data=cifar10", f"data.root={root}", "data.train_size=5",
                         "data.test_size=5", "data.valid_ratio=0.2").data  # fmt: skip
    splits = read_splits(cfg, seed=0)
    assert (len(splits.fit), len(splits.valid), len(splits.test)) == (4, 1, 5)


@pytest.mark.parametrize("loader", ["torch", "tensor"])
def test_a_last_batch_of_one_image_is_left_out_of_each_epoch(loader, tmp_path):
    """129 training images in batches of 32: the last batch would hold one image, which
    BatchNorm cannot normalise where ResNet-18's map has shrunk to 1x1 (it crashed at the end
    of the epoch); the epoch trains on 128, a different one left out each time."""
    from resnet_train.engine.trainer import fit

    cfg = compose_config("model=resnet18", "model.stem=imagenet", "data=synthetic",
                         "data.train_size=143", "trainer.device=cpu", "trainer.epochs=2",
                         f"data.loader={loader}")  # fmt: skip
    metrics = fit(cfg, tmp_path)
    assert metrics["train"]["images"] == 128 and metrics["global_step"] == 2 * 4
    loaders = build_loaders(cfg.data, 0, CPU)
    seen = []
    for epoch in (0, 1):
        loaders.train.sampler.set_epoch(epoch)
        seen.append([len(y) for _, y in loaders.train])
    assert seen == [[32, 32, 32, 32]] * 2


@pytest.mark.parametrize(
    "augment",
    [{}, {"padding": 0}, {"hflip": False}, {"crop": "none"}, {"cutout": 8}, {"padding": 2}],
)
def test_the_plain_torch_cifar_pipeline_gives_torchvisions_images_bit_for_bit(augment):
    """The CIFAR pipeline is plain torch (no torchvision import at start-up); it must give the
    images and draw the random numbers that torchvision's v2 pipeline does."""
    from torchvision.transforms import v2

    from resnet_train.config import AugmentConfig, DataConfig
    from resnet_train.data.transforms import Cutout

    cfg = DataConfig(augment=AugmentConfig(**augment))
    a = cfg.augment
    for train in (True, False):
        ours = build_transform(cfg, train=train)
        steps = []
        if train and a.crop == "pad":
            steps.append(v2.RandomCrop(cfg.image_size, padding=a.padding or None))
        if train and a.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                  v2.Normalize(mean=list(cfg.mean), std=list(cfg.std))]  # fmt: skip
        if train and a.cutout:
            steps.append(Cutout(a.cutout))
        theirs = v2.Compose(steps)
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        torch.manual_seed(3)
        mine = [ours(image) for image in images]
        after_mine = torch.rand(1)
        torch.manual_seed(3)
        reference = [theirs(image) for image in images]
        assert torch.rand(1) == after_mine  # the same number of draws
        for x, y in zip(mine, reference, strict=True):
            assert x.dtype == y.dtype == torch.float32 and torch.equal(
                x, y.as_subclass(torch.Tensor)
            )


def test_a_cifar_run_starts_without_importing_torchvision(tmp_path):
    code = (
        "import sys; sys.argv = ['resnet-train', 'model=resnet20', 'data=synthetic', "
        "'data.train_size=64', 'data.test_size=32', 'trainer.epochs=1', 'trainer.device=cpu', "
        "'hydra.run.dir=run']\n"
        "from resnet_train.cli import main\n"
        "try:\n    main()\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCHVISION' if 'torchvision' in sys.modules else 'NO TORCHVISION')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "NO TORCHVISION"
    assert (tmp_path / "run" / "metrics.json").is_file()
