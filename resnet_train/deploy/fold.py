"""Batch norm folded into the convolution before it, for inference.

In eval mode a BatchNorm2d is a per-channel affine map, y = (x - mean) / sqrt(var + eps) * gamma +
beta; after a convolution it folds into that convolution's weights and bias, and the network
computes the same function with one operation less per pair. Which BN follows which conv is read
from the traced graph (torch.fx), not assumed from names, so every model of the zoo is covered:
post-activation blocks fold every BN (and the projection shortcut's), pre-activation blocks fold
the BN that sits between two of their convs, and leave the BN that normalises the block's input
(it is applied to the sum of the shortcut and the residual, after no conv of its own). The ReLU
after each folded pair is fused into it by the runtimes that execute the model (ONNX Runtime's
FusedConv, inductor), not by this module.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from resnet_train.models.resnet import PadShortcut


@dataclass
class FoldReport:
    folded: int  # conv+BN pairs folded
    batchnorms: int  # BatchNorm2d modules before folding
    modules_before: int
    modules_after: int
    parameters_before: int
    parameters_after: int

    def describe(self) -> str:
        return (
            f"folded {self.folded} of {self.batchnorms} BatchNorm layers into the conv before "
            f"them: {self.modules_before} -> {self.modules_after} modules, "
            f"{self.parameters_before:,} -> {self.parameters_after:,} parameters"
        )


class _Tracer(fx.Tracer):
    # Option A's shortcut pads by a channel count read from the tensor's shape: kept whole.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PadShortcut) or super().is_leaf_module(m, qualname)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for each BatchNorm2d whose input is a Conv2d's output and nothing
    else reads that output; modules called more than once are left alone."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias computing bn(conv(x)) of eval mode (the arithmetic in float64)."""
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - mean) * scale + beta)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        fused = fused.to(memory_format=torch.channels_last)
    return fused


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _count(model: nn.Module) -> tuple[int, int]:
    modules = sum(1 for m in model.modules() if not isinstance(m, nn.Identity))
    return modules, sum(p.numel() for p in model.parameters())


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """An eval-mode copy of `model` with every foldable BN folded into its conv (and replaced by
    an Identity, so the model's code and its other names stay as they were)."""
    model = copy.deepcopy(model).eval()
    modules_before, parameters_before = _count(model)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    pairs = foldable_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set(model, conv_name, fold_conv_bn(conv, bn))
        _set(model, bn_name, nn.Identity())
    modules_after, parameters_after = _count(model)
    report = FoldReport(
        len(pairs), batchnorms, modules_before, modules_after, parameters_before, parameters_after
    )
    return model, report


def pad_shortcuts_as_convs(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of `model` whose option-A shortcuts that subsample or pad (PadShortcut) are 1x1
    convs with fixed 0/1 weights computing exactly the same (each output channel copies one
    input channel or is zero; the stride subsamples), and how many were replaced.

    For the ONNX file: the shortcut exports as two Slices and a Pad, which ONNX Runtime's
    int8 graph runs in NCHW between NHWC QLinearConvs, with a Transpose on either side of every
    block up to the last such shortcut. As a conv it is one more QLinearConv in the NHWC chain.
    ResNet-20 at batch 64 on a 2-core AVX2 CPU (ONNX Runtime 1.32's profiler): the Slices, Pads
    and Transposes took 4.5 of 27 ms per int8 batch. The channel counts are read from one
    forward pass of `example` (a pruned model's widths are its own)."""
    model = copy.deepcopy(model).eval()
    shortcuts = {name: m for name, m in model.named_modules() if isinstance(m, PadShortcut)}
    channels: dict[str, int] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_: nn.Module, args: tuple) -> None:  # None: the input is left as it is
            channels[name] = args[0].shape[1]

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in shortcuts.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for name, shortcut in shortcuts.items():
        if name not in channels:  # not on the forward path
            continue
        cin, cout = channels[name], shortcut.out_planes
        if cout < cin or (shortcut.stride == 1 and cout == cin):
            continue  # the identity (fewer channels out than in: not a shortcut of the zoo)
        conv = nn.Conv2d(cin, cout, 1, stride=shortcut.stride, bias=False)
        conv = conv.to(device=example.device, dtype=example.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            first = max(cout - cin, 0) // 2  # F.pad puts the lower half of the extra first
            for c in range(min(cin, cout)):
                conv.weight[first + c, c, 0, 0] = 1.0
        conv.requires_grad_(False)
        _set(model, name, conv)
        replaced += 1
    return model, replaced
