"""Quantization-aware training (trainer.qat=true): fake int8 quantization in the forward pass.

The scheme is the one `task=export export.quantize=int8` deploys with ONNX Runtime: weights
per output channel, symmetric int8 in [-127, 127]; the input activations of every conv and
linear layer per tensor, asymmetric uint8 over [min, max] (zero included). The rounding passes
its gradient straight through (Bengio et al. 2013), so the weights learn to sit where rounding
hurts least. Per-channel symmetric weight quantization commutes with the BN folding the export
does (folding scales each output channel), so training the unfolded network sees the weights
the int8 model gets. The activation ranges are each training batch's own: no observer state,
so a resumed run stays bit-identical; in evaluation (eval mode) each image's own, so that an
image's logits do not depend on the other images of its batch (task=predict, task=eval at any
data.batch_size). The int8 export calibrates its ranges on training images as post-training
quantization does.

The stem conv (`conv1`, the one that reads the image) gets 7-bit weights in [-64, 64], as the
int8 export gives it (see resnet_train/deploy/quantize.py for why). The layers keep their class's
parameters and state-dict names (only their forward changes), so a QAT checkpoint loads into
the plain model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_RANGE = (-127, 127)
ACTIVATION_RANGE = (0, 255)
# The conv that reads the image: 7-bit weights in the int8 export, and so here.
STEM_CONV = "conv1"
STEM_WEIGHT_RANGE = (-64, 64)


def fake_quantize_weight(
    weight: torch.Tensor, bounds: tuple[int, int] = WEIGHT_RANGE
) -> torch.Tensor:
    """Per output channel, symmetric int8 (or the narrower symmetric `bounds`)."""
    low, high = bounds
    dims = tuple(range(1, weight.dim()))
    scale = (weight.detach().abs().amax(dim=dims) / high).clamp(min=1e-12).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, low, high)


def fake_quantize_activation(x: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Per tensor, asymmetric uint8 over the batch's [min, max] extended to include zero; with
    per_image, over each image's own (an image's result then does not depend on the others in
    its batch)."""
    low, high = ACTIVATION_RANGE
    if per_image:
        flat = x.detach().flatten(1)
        lo, hi = flat.amin(1).clamp(max=0).float(), flat.amax(1).clamp(min=0).float()
    else:
        lo = x.detach().min().clamp(max=0).float().reshape(1)
        hi = x.detach().max().clamp(min=0).float().reshape(1)
    scale = ((hi - lo) / (high - low)).clamp(min=1e-8)
    zero = (low - torch.round(lo / scale)).clamp(low, high).to(torch.int32)
    if per_image:
        return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, low, high)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, low, high)


class FakeQuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight)
        x = fake_quantize_activation(x, per_image=not self.training)
        return self._conv_forward(x, weight, self.bias)


class FakeQuantStemConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight, STEM_WEIGHT_RANGE)
        x = fake_quantize_activation(x, per_image=not self.training)
        return self._conv_forward(x, weight, self.bias)


class FakeQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight)
        return F.linear(fake_quantize_activation(x, per_image=not self.training), weight, self.bias)


def prepare_qat(model: nn.Module) -> int:
    """Switch every nn.Conv2d and nn.Linear of `model` to fake quantization (the stem conv to
    7-bit weights), in place (same parameters, same names); returns how many layers were
    switched."""
    switched = 0
    for name, module in model.named_modules():
        if name == STEM_CONV and type(module) is nn.Conv2d:
            module.__class__ = FakeQuantStemConv2d
            switched += 1
        elif type(module) is nn.Conv2d:
            module.__class__ = FakeQuantConv2d
            switched += 1
        elif type(module) is nn.Linear:
            module.__class__ = FakeQuantLinear
            switched += 1
    return switched
