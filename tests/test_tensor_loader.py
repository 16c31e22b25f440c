"""The tensor data path: batched crops, flips and Cutout equal the per-image reference; every
image once per epoch; the same seed gives the same batches; an epoch can be entered anywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnet_train.config import AugmentConfig, validate
from resnet_train.data.tensor_loader import TensorLoader, crop_flip, cutout_mask, draw_epoch
from resnet_train.engine.trainer import fit
from resnet_train.errors import ConfigError
from tests.conftest import compose_config

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def images(n: int = 64, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def loader(n: int = 64, batch: int = 16, seed: int = 0, **augment) -> TensorLoader:
    labels = torch.arange(n)  # each image's label is its index
    cfg = AugmentConfig(**augment)
    return TensorLoader(images(n), labels, batch, seed, True, cfg, MEAN, STD)


def test_batched_crop_and_flip_equal_the_per_image_reference():
    x = images(12)
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 9, (12,), generator=g), torch.randint(0, 9, (12,), generator=g)
    flip = torch.rand(12, generator=g) < 0.5
    out = crop_flip(x, dy, dx, flip, pad=4)
    for i in range(12):
        ref = F.pad(x[i], (4, 4, 4, 4))[:, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref), i
    assert flip.any() and not flip.all()


def test_cutout_mask_zeroes_the_square_the_per_image_cutout_would():
    cy, cx = torch.tensor([0, 10, 31, 16]), torch.tensor([0, 20, 5, 16])
    mask = cutout_mask(cy, cx, 8, 32, 32)
    for i in range(4):
        expected = torch.ones(32, 32, dtype=torch.bool)
        top, left = max(int(cy[i]) - 4, 0), max(int(cx[i]) - 4, 0)
        expected[top : int(cy[i]) + 4, left : int(cx[i]) + 4] = False
        assert torch.equal(mask[i, 0], expected), i
    assert (~mask[1]).sum() == 64 and (~mask[0]).sum() == 16  # whole, and clipped at the corner


def test_every_image_once_per_epoch_normalised_and_shuffled():
    data = loader(n=70, batch=16)  # a last, smaller batch of 6
    data.set_epoch(0)
    batches = list(data)
    assert len(batches) == len(data) == 5 and batches[-1][0].shape == (6, 3, 32, 32)
    labels = torch.cat([labels for _, labels in batches])
    assert sorted(labels.tolist()) == list(range(70))
    assert labels.tolist() != list(range(70))
    first = batches[0][0]
    assert first.dtype == torch.float32 and -2.5 < first.mean() < 2.5


def test_the_same_seed_gives_the_same_batches_and_epochs_differ():
    def epoch(seed: int, e: int) -> list:
        data = loader(seed=seed, cutout=8)
        data.set_epoch(e)
        return list(data)

    a, b, c, other = epoch(0, 0), epoch(0, 0), epoch(0, 1), epoch(1, 0)
    assert all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )
    assert not torch.equal(a[0][1], c[0][1]) and not torch.equal(a[0][1], other[0][1])


def test_an_epoch_entered_at_a_batch_gives_the_rest_of_the_same_epoch():
    data = loader(cutout=8)
    data.set_epoch(3)
    whole = list(data)
    data.set_epoch(3, start=2 * 16)
    assert len(data) == 2
    rest = list(data)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(whole[2:], rest, strict=True))


def test_crops_use_the_configured_padding_and_flip_switch():
    draws = draw_epoch(500, 0, 0, 32, 32, AugmentConfig(padding=2), shuffle=True)
    assert int(draws.dy.max()) == 4 and int(draws.dx.min()) == 0
    data = loader(n=16, batch=16, crop="none", hflip=False)
    data.set_epoch(0)
    (batch, labels), = list(data)  # fmt: skip
    reference = (
        images(16)[labels].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch, reference)


def test_cifar_trains_on_the_tensor_path_and_refuses_what_it_lacks(cifar10_root, tmp_path):
    root, _ = cifar10_root
    cfg = compose_config(
        "data=cifar10",
        f"data.root={root}",
        "model=resnet20",
        "trainer.epochs=2",
        "trainer.device=cpu",
        "data.batch_size=32",
        "data.augment.cutout=8",
    )
    assert cfg.data.loader == "tensor"
    metrics = fit(cfg, tmp_path)
    assert metrics["epochs_done"] == 2 and metrics["train"]["images"] == 180
    bad = compose_config("data=cifar10", "data.augment.autoaugment=cifar10")
    with pytest.raises(
        ConfigError, match=r"data.augment.autoaugment=cifar10 needs data.loader=torch"
    ):
        validate(bad)
    validate(
        compose_config("data=cifar10", "data.augment.autoaugment=cifar10", "data.loader=torch")
    )
