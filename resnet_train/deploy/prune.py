"""task=prune: structured channel pruning of a trained model into a smaller one.

Two ways, chosen by prune.method (auto picks by the shortcut):
  blocks  inside each residual block, the lowest-ranked filters of the block's inner convs
          (their outputs, the BN that follows, the next conv's inputs), as Li et al. 2017
          ("Pruning Filters for Efficient ConvNets") do for ResNet-56/110. The block's output
          width stays: the zero-padding shortcut (option A) ties it across the network in a way
          a dependency tracer does not see. The choice for option A (the CIFAR ResNets).
  groups  whole dependency groups found by Torch-Pruning (DepGraph, Fang et al. 2023): residual
          streams included, for 1x1-projection shortcuts (option B), bottlenecks, plain nets.

The filters are ranked by their weights' L1 norm (Li et al.), L2 norm, or at random (a baseline).
The pruned model is written as pruned.pt: its weights and its channel widths as data (the
"channels" record; no pickled modules), so that it rebuilds from this package's model code and
loads with weights_only=True. Fine-tuning it is an ordinary run:
    resnet-train model=resnet56 model.weights=outputs/RUN/pruned.pt ...
prune.json records parameters, MACs and accuracy on eval.split before and after.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from resnet_train.config import to_dict
from resnet_train.data.loaders import build_eval_loader
from resnet_train.deploy.evaluate import collect_logits
from resnet_train.deploy.source import Trained, load_trained, require
from resnet_train.deploy.staging import Staging
from resnet_train.errors import ConfigError
from resnet_train.logging import write_json
from resnet_train.models.build import build_model, without_weights
from resnet_train.models.channels import apply_channels, channel_record
from resnet_train.models.resnet import BasicBlock, Bottleneck, PreActBlock, PreActBottleneck
from resnet_train.models.summary import summarize
from resnet_train.models.weights import PREACT_KEY, PREACT_REVISION

log = logging.getLogger("resnet_train")

# Per block type: the (conv, bn, next conv) chains whose middle width is the block's own.
INNER = {
    BasicBlock: [("conv1", "bn1", "conv2")],
    Bottleneck: [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")],
    PreActBlock: [("conv1", "bn2", "conv2")],
    PreActBottleneck: [("conv1", "bn2", "conv2"), ("conv2", "bn3", "conv3")],
}


def filter_scores(conv: nn.Conv2d, importance: str, generator: torch.Generator) -> torch.Tensor:
    weight = conv.weight.detach().flatten(1)
    if importance == "l1":
        return weight.abs().sum(1)
    if importance == "l2":
        return weight.pow(2).sum(1).sqrt()
    return torch.rand(weight.shape[0], generator=generator)


def _keep(conv: nn.Conv2d, n: int, index: torch.Tensor, dim: int) -> nn.Conv2d:
    """conv with only the output (dim 0) or input (dim 1) channels in index, n of them."""
    out_channels, in_channels = (n, conv.in_channels) if dim == 0 else (conv.out_channels, n)
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=conv.bias is not None)  # fmt: skip
    new.weight.data = conv.weight.data.index_select(dim, index).clone()
    if conv.bias is not None:
        new.bias.data = conv.bias.data[index].clone() if dim == 0 else conv.bias.data.clone()
    return new.train(conv.training)


def _keep_bn(bn: nn.BatchNorm2d, index: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(index), bn.eps, bn.momentum, bn.affine)
    for name in ("weight", "bias"):
        getattr(new, name).data = getattr(bn, name).data[index].clone()
    new.running_mean = bn.running_mean[index].clone()
    new.running_var = bn.running_var[index].clone()
    new.num_batches_tracked = bn.num_batches_tracked.clone()
    return new.train(bn.training)


def kept(width: int, ratio: float, round_to: int = 1) -> int:
    """How many of `width` channels stay: width less round(ratio x width), to the nearest
    multiple of round_to, at least round_to (and one), at most width."""
    keep = width - round(ratio * width)
    keep = round_to * round(keep / round_to)
    return min(width, max(keep, round_to, 1))


def prune_blocks(
    model: nn.Module, ratio: float, importance: str, seed: int, round_to: int = 1
) -> int:
    """Remove about ratio x width filters from each inner conv of each block (see kept());
    returns the number of chains pruned."""
    generator = torch.Generator().manual_seed(seed)
    chains = 0
    for block in model.modules():
        for first, bn_name, second in INNER.get(type(block), []):
            conv, bn, after = (getattr(block, n) for n in (first, bn_name, second))
            if conv.groups != 1 or after.groups != 1:
                continue  # grouped convs (ResNeXt): their width is tied to the groups
            width = conv.out_channels
            keep = kept(width, ratio, round_to)
            if keep == width:
                continue
            scores = filter_scores(conv, importance, generator)
            index = scores.topk(keep).indices.sort().values
            setattr(block, first, _keep(conv, keep, index, dim=0))
            setattr(block, bn_name, _keep_bn(bn, index))
            setattr(block, second, _keep(after, keep, index, dim=1))
            chains += 1
    return chains


def prune_groups(
    model: nn.Module, ratio: float, importance: str, image_size: int, round_to: int = 1,
    seed: int = 0,
) -> None:  # fmt: skip
    """Torch-Pruning's dependency groups (the classifier's outputs kept), each keeping kept()
    of its channels, as prune_blocks' layers do; random importance drawn from `seed`."""
    tp = require("torch_pruning", "prune.method=groups")
    scorer = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
    }[importance]()
    # Each group's ratio, by the width of the conv that leads it (every conv of a group has that
    # width): Torch-Pruning keeps int(width x (1 - ratio)) channels, rounded *down* to its
    # round_to (0.3 of 64 kept 40, not 48), so it is given the ratio that keeps kept()'s count
    # (the half channel keeps int() off a float error below it).
    # A grouped conv (ResNeXt's) and the conv that feeds it keep a multiple of its groups too,
    # the nearest (Torch-Pruning rounds down to it: 128 channels in 32 groups kept 64).
    units = {m: round_to for m in model.modules() if isinstance(m, nn.Conv2d)}
    for block in model.modules():
        grouped = getattr(block, "conv2", None)
        if isinstance(grouped, nn.Conv2d) and grouped.groups > 1:
            for conv in (block.conv1, grouped):
                units[conv] = math.lcm(round_to, grouped.groups)
    ratios = {m: 1 - (kept(m.out_channels, ratio, unit) + 0.5) / m.out_channels
              for m, unit in units.items()}  # fmt: skip
    example = torch.randn(1, 3, image_size, image_size)
    pruner = tp.pruner.MetaPruner(model, example, importance=scorer, pruning_ratio=ratio,
                                  pruning_ratio_dict=ratios, ignored_layers=[model.fc])  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # (RandomImportance draws from torch's generator)
        torch.manual_seed(seed)
        pruner.step()


def method_for(cfg: DictConfig, model: nn.Module) -> str:
    """prune.method, with auto resolved by the model's shortcut."""
    method, shortcut = cfg.prune.method, model.shortcut
    if method == "auto":
        return "blocks" if shortcut == "A" else "groups"
    if method == "groups" and shortcut == "A":
        raise ConfigError(
            "prune.method='groups' is invalid for shortcut A: the zero-padding shortcut ties "
            "channels across blocks that the dependency graph does not see; use prune.method="
            "blocks (auto picks it)"
        )
    return method


@torch.no_grad()
def accuracy(model: nn.Module, trained: Trained, loader: Any, desc: str) -> float:
    cfg = trained.cfg
    logits, labels = collect_logits(model, loader, trained.device, cfg.trainer.precision,
                                    desc=desc, progress=cfg.trainer.progress)  # fmt: skip
    return 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)


def figures(model: nn.Module, image_size: int) -> dict[str, int]:
    s = summarize(model.cpu(), image_size)
    return {"parameters": s.parameters, "macs": s.macs}


def run_prune(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Prune model.weights; write pruned.pt and prune.json into run_dir; return the record."""
    trained = load_trained(cfg, overrides, fake_quant=False)
    trained.check_data_classes()
    cfg, p = trained.cfg, cfg.prune
    method = method_for(cfg, trained.model)
    size, split = cfg.data.image_size, cfg.eval.split
    loader = build_eval_loader(cfg.data, cfg.seed, trained.device, split, trained.channels_last)
    model = trained.model
    before = {"acc": accuracy(model, trained, loader, f"{split}, before")}
    before.update(figures(model, size))  # (on the CPU, where the model is pruned)
    model = model.float().eval()
    record, reference = _prune(model, cfg, method)
    _check_rebuild(model, reference, record, size)
    after = {**figures(model, size), "acc": accuracy(model.to(trained.device), trained, loader,
                                                      f"{split}, after")}  # fmt: skip
    saved_cfg = to_dict(cfg)
    saved_cfg["model"]["weights"] = None
    # a float model (a QAT source is pruned and measured without fake quantization)
    saved_cfg["trainer"]["qat"] = False
    state = {
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        PREACT_KEY: PREACT_REVISION,  # (its source was checked as it was read)
        "channels": record,
        "config": saved_cfg,
        "classes": trained.saved_classes,  # what predict names and eval checks the data against
        "pruned_from": {"path": str(trained.weights.path), "sha256": trained.sha256},
    }
    result = {
        **trained.record(split),
        "method": method,
        "importance": p.importance,
        "ratio": p.ratio,
        "round_to": p.round_to,
        "before": before,
        "after": after,
        "macs_removed": 1 - after["macs"] / before["macs"],
        "parameters_removed": 1 - after["parameters"] / before["parameters"],
        "pruned": str(run_dir / "pruned.pt"),
        "pruned_layers": len(record),
    }
    with Staging(run_dir) as stage:  # put in place together, prune.json last
        torch.save(state, stage.file("pruned.pt"))
        write_json(stage.file("prune.json"), result)
        stage.commit()
    log.info(
        "%s pruned (%s, %s, ratio %g): parameters %s -> %s (-%.1f%%), MACs %s -> %s (-%.1f%%), "
        "%s accuracy %.2f%% -> %.2f%% before fine-tuning",
        cfg.model.name, method, p.importance, p.ratio, f"{before['parameters']:,}",
        f"{after['parameters']:,}", 100 * result["parameters_removed"], f"{before['macs']:,}",
        f"{after['macs']:,}", 100 * result["macs_removed"], split, before["acc"], after["acc"],
    )  # fmt: skip
    log.info("fine-tune it: resnet-train %s", " ".join(
        [*model_overrides(cfg, run_dir / "pruned.pt"), *data_overrides(cfg)]))  # fmt: skip
    return result


def model_overrides(cfg: DictConfig, weights: Path) -> list[str]:
    """The command line's model keys that build the pruned model's architecture."""
    from resnet_train.config import ModelConfig

    default = ModelConfig()
    keys = [f"model={cfg.model.name}"]
    for key, value in cfg.model.items():
        if key not in ("name", "weights") and value != getattr(default, key):
            keys.append(f"model.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return [*keys, f"model.weights={weights}"]


# The data keys that decide a model's input and which images are held out: a fine-tuning run
# of the pruned model needs the values the pruned one was trained with.
DATA_KEYS = ("num_classes", "image_size", "eval_resize", "valid_ratio", "test_ratio",
             "train_size", "test_size", "augment.crop", "augment.padding")  # fmt: skip


def data_overrides(cfg: DictConfig) -> list[str]:
    """The command line's data keys (and seed) for a run on the data the model was trained on:
    data=NAME, its root, and the DATA_KEYS where they differ from data=NAME's config file."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from resnet_train.config import DataConfig

    d = cfg.data
    group = files("resnet_train.configs") / "data" / f"{d.name}.yaml"
    default = OmegaConf.merge(OmegaConf.structured(DataConfig),
                              OmegaConf.create(group.read_text()))  # fmt: skip
    reads_files = d.root is not None and d.name != "synthetic"
    keys = [f"data={d.name}"] + ([f"data.root={d.root}"] if reads_files else [])
    for key in DATA_KEYS:
        if key == "num_classes" and d.name != "synthetic":  # (counted, or the data set's own)
            continue
        value = OmegaConf.select(d, key)
        if value != OmegaConf.select(default, key):
            keys.append(f"data.{key}={'null' if value is None else value}")
    return keys + ([f"seed={cfg.seed}"] if cfg.seed != 0 else [])


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _prune(model: nn.Module, cfg: DictConfig, method: str) -> tuple[dict, nn.Module]:
    """Prune `model` (a float CPU model, in place) as cfg.prune says; return its channel record
    and the unpruned architecture as configured. A ratio that removes nothing is refused."""
    p = cfg.prune
    parameters = sum(t.numel() for t in model.parameters())
    reference = build_model(without_weights(cfg))
    if method == "blocks":
        prune_blocks(model, p.ratio, p.importance, cfg.seed, p.round_to)
    else:
        prune_groups(model, p.ratio, p.importance, cfg.data.image_size, p.round_to, cfg.seed)
    if not sum(t.numel() for t in model.parameters()) < parameters:
        why = (
            "its blocks' convs are grouped (ResNeXt): use prune.method=groups"
            if method == "blocks" and any(c.groups > 1 for c in _convs(model))
            else f"the ratio is too small for prune.round_to={p.round_to} (each pruned layer "
            f"keeps a multiple of {p.round_to} channels)"
        )
        raise ConfigError(f"prune.ratio={p.ratio} is invalid: it removes no channel: {why}")
    return channel_record(model, reference), reference


def check_prune(trained: Trained) -> None:
    """Before the run starts: prune a copy of the model, so that a ratio that removes nothing
    is refused before any evaluation and before the run directory is made."""
    import copy

    model = copy.deepcopy(trained.model).to("cpu").float().eval()
    _prune(model, trained.cfg, method_for(trained.cfg, trained.model))


def _check_rebuild(model: nn.Module, reference: nn.Module, record: dict, size: int) -> None:
    """The record rebuilds the pruned model from our own code: same weights, same outputs."""
    import copy

    rebuilt = apply_channels(copy.deepcopy(reference), record)
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(rebuilt.eval()(images), model.eval()(images), atol=1e-5):
            raise RuntimeError("the pruned model does not rebuild from its channel record")
