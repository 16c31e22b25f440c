"""A model's size and cost without training: parameters, multiply-accumulates, stage shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Summary:
    parameters: int
    trainable: int
    macs: int  # multiply-accumulates for one image
    image_size: int
    shapes: list[tuple[str, tuple[int, ...]]]  # output shape after each part, batch of one


@torch.no_grad()
def summarize(model: nn.Module, image_size: int) -> Summary:
    parts = [("stem", model.maxpool)]
    parts += [(f"layer{i + 1}", stage) for i, stage in enumerate(model.stages())]
    parts += [("pool", model.avgpool), ("fc", model.fc)]
    shapes: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.append((name, tuple(out.shape)))
        )
        for name, module in parts
    ]
    was_training = model.training
    model.eval()
    try:
        # torch's counter reports FLOPs as 2 per multiply-add of convs and matmuls.
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return Summary(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=counter.get_total_flops() // 2,
        image_size=image_size,
        shapes=shapes,
    )


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def format_summary(name: str, summary: Summary) -> str:
    lines = [
        f"model        {name}",
        f"parameters   {summary.parameters:,} ({_si(summary.parameters)})",
        f"trainable    {summary.trainable:,}",
        f"MACs/image   {summary.macs:,} ({_si(summary.macs)}) at "
        f"{summary.image_size}x{summary.image_size}",
        "output shapes (batch of 1):",
    ]
    lines += [f"  {part:<8} {tuple(shape)}" for part, shape in summary.shapes]
    return "\n".join(lines)
