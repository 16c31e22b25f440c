"""Config schemas and checks.

The dataclasses below are registered in Hydra's ConfigStore as the base of ``configs/train.yaml``,
so composition already rejects unknown keys (``model.depht=18``) and wrong types (``optim.lr=abc``)
with the key's name. ``validate`` adds the checks a type cannot express (ranges, known names) and
runs before any data is touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from resnet_train.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "resnet20"
    # "cifar" (3x3 conv, stride 1, no max-pool) or "imagenet" (7x7/2 conv + max-pool);
    # null chooses from the data: cifar for images of 64 px or less, imagenet above.
    stem: str | None = None
    # null takes the data set's number of classes.
    num_classes: int | None = None
    # "A" (zero-padding identity), "B" (1x1 projection where the shape changes), "none" (a
    # plain network); null keeps the model's own (A for the CIFAR ResNets, B for the rest).
    shortcut: str | None = None
    # Goyal et al. 2017: zero gamma in the last BN of each residual branch.
    zero_init_residual: bool = False
    # Bottlenecks: false puts the stride on the 3x3 conv (ResNet v1.5, torchvision), true on the
    # first 1x1 (v1, the 2015 paper).
    stride_in_1x1: bool = False
    # Dropout between the convs of each block (wide ResNets use 0.3); 0 = none.
    dropout: float = 0.0
    # A weights file to start from: torchvision's .pth or a resnet-train checkpoint. A classifier
    # of another number of classes is replaced (fine-tuning).
    weights: str | None = None
    # Parts kept as loaded (weights and BN statistics): a list of stem, layer1 ... layer4, fc,
    # or backbone (all but the classifier fc: a linear probe); null = none.
    freeze: Any = None
    # Every BatchNorm layer keeps its running statistics (normalises with them, never updates
    # them); its scale and shift still train unless frozen.
    freeze_bn: bool = False


@dataclass
class AugmentConfig:
    # "pad": random crop of image_size after zero-padding by `padding` (CIFAR baseline);
    # "random_resized": RandomResizedCrop(image_size) (ImageNet baseline); "none".
    crop: str = "pad"
    padding: int = 4
    hflip: bool = True
    # Policies of torchvision's transforms v2, each off by default (at most one of the three):
    # AutoAugment (Cubuk et al. 2019) with the "cifar10", "imagenet" or "svhn" policy;
    # RandAugment (Cubuk et al. 2020); TrivialAugmentWide (Muller & Hutter 2021).
    autoaugment: str | None = None
    randaugment: bool = False
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9
    trivialaugment: bool = False
    # Random erasing (Zhong et al. 2020): probability per image; 0 = off.
    random_erasing: float = 0.0
    # Cutout (DeVries & Taylor 2017): a square of this many pixels set to zero after
    # normalisation (the data set's mean), centred anywhere in the image; 0 = off.
    cutout: int = 0
    # MixUp (Zhang et al. 2018) and CutMix (Yun et al. 2019) on each batch, with mixed labels;
    # alpha of the Beta distribution, 0 = off. With both on, each batch uses one at random.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class DataConfig:
    name: str = "cifar10"
    # The folder that holds the data set's files (for CIFAR-10, the one containing
    # cifar-10-batches-py/). Relative paths are taken from the directory the command runs in.
    root: str | None = "~/data"
    download: bool = True
    # null (data=imagefolder): the number of class folders.
    num_classes: int | None = 10
    image_size: int = 32
    # Evaluation: resize the short side to this, then center-crop image_size; 0 = no resize
    # (image files are still center-cropped to image_size); null: image_size / 0.875 (256 for
    # 224) with crop=random_resized, else image_size.
    eval_resize: int | None = 0
    # Per-channel mean and std (R, G, B) of the normalisation. "auto": computed once on the
    # training split; null: those of the model.weights' training (ImageNet's for a torchvision
    # .pth), or computed like auto when training from scratch.
    mean: Any = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: Any = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])
    batch_size: int = 128
    # "tensor": the whole set as one uint8 tensor on the training device, augmented a batch at a
    # time (crop, flip, Cutout; CIFAR's default); "torch": a DataLoader with per-image
    # torchvision transforms and worker processes (needed for the policies, random erasing,
    # RandomResizedCrop and ImageFolder data).
    loader: str = "torch"
    # DataLoader worker processes (data.loader=torch); null: one per CPU this process may use,
    # at most 16.
    num_workers: int | None = 2
    # Image files: "torchvision" decodes with torchvision.io in the workers (faster than "pil");
    # "gpu" (data=imagenet): the workers only read files, the main process decodes each batch
    # on the CUDA device (nvJPEG) and transforms it there.
    decoder: str = "torchvision"
    # Share of the training set held out (stratified per class) for validation and model selection.
    valid_ratio: float = 0.1
    # data=imagefolder without a test/ folder: the share of each class held out for the test
    # split (the same images for every seed).
    test_ratio: float = 0.1
    # data=imagefolder: leave out files that are not readable images (listed in the log) instead
    # of stopping at the first.
    skip_bad: bool = False
    # Class imbalance: "none"; "sampler": each epoch draws its images with replacement, each
    # class equally often (seeded per epoch: exact resume holds); "loss": cross-entropy weighted
    # by n / (classes x class count) of the training split.
    balance: str = "none"
    # Synthetic data: how many images to make. Real data: null = all, or a seeded, stratified
    # subset of this many images (for quick runs).
    train_size: int | None = None
    test_size: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    # "sgd" (momentum, Nesterov) or "adamw" (Loshchilov & Hutter 2019).
    name: str = "sgd"
    # The learning rate; with lr_scaling=linear, the rate for reference_batch images per step.
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 5e-4
    # Decay BatchNorm weights and all biases too; off by default (they have no scale to shrink).
    decay_norm_and_bias: bool = False
    # "none", or "linear": lr * global batch / reference_batch (Goyal et al. 2017).
    lr_scaling: str = "none"
    reference_batch: int = 256
    # The learning rate of the pretrained part (all but the classifier fc) is lr x this; the
    # schedule scales both alike. 1 = one rate for all.
    backbone_lr_mult: float = 1.0


@dataclass
class ScheduleConfig:
    # constant | step | multistep | cosine | cosine_restarts | onecycle (torch's schedulers).
    name: str = "cosine"
    # "epoch": step the schedule once per epoch; "step": once per optimizer step. Every length
    # below (step_size, milestones, restart_period, warmup) counts these units.
    interval: str = "epoch"
    # step: multiply by gamma every step_size; multistep: at each milestone.
    step_size: int = 30
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)
    # cosine, cosine_restarts: the floor of the learning rate.
    min_lr: float = 0.0
    # cosine_restarts (SGDR, Loshchilov & Hutter 2017): first period, and its growth per restart.
    restart_period: int = 10
    restart_mult: int = 1
    # onecycle (Smith & Topin 2019): the share of the run spent rising to optim.lr, which is
    # reached from optim.lr / div_factor and left for optim.lr / div_factor / final_div_factor.
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    # onecycle: false keeps the optimizer's momentum (SGD's momentum, AdamW's first beta) as
    # configured; true cycles it inversely to the rate, from the configured value down by 0.1.
    cycle_momentum: bool = False
    # Linear warm-up in front of any schedule but onecycle: this many units, from
    # warmup_start_factor * lr to lr (Goyal et al. 2017 use 5 epochs).
    warmup: int = 0
    warmup_start_factor: float = 0.1


@dataclass
class EarlyStoppingConfig:
    # The validation metric that picks best.pt and, with patience set, stops the run.
    monitor: str = "valid/acc"
    # "max" or "min"; null follows the metric (max for valid/acc, min for valid/loss).
    mode: str | None = None
    # Stop after this many epochs without an improvement larger than min_delta; null = never.
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class EmaConfig:
    # Exponential moving average of the weights (and BN buffers), updated every optimizer step;
    # null = off. 0.999 to 0.9999 are common.
    decay: float | None = None
    # Which weights best.pt (and the test) use: "best" (the better of raw and EMA on the
    # validation set), "ema" or "raw".
    select: str = "best"


@dataclass
class DistillConfig:
    # Knowledge distillation (Hinton et al. 2015): the teacher's weights, a resnet-train
    # checkpoint (its own architecture) or a torchvision .pth (architecture: teacher_model, else
    # the student's); null = no distillation. Its path and sha256 go into the checkpoints, its
    # weights do not.
    teacher: str | None = None
    # The teacher's architecture when teacher is a bare .pth of another model than the student.
    teacher_model: str | None = None
    # Softmax temperature of both sides' soft targets; the soft loss is scaled by T^2.
    temperature: float = 4.0
    # Weight of the soft (teacher) loss; the label loss gets 1 - alpha.
    alpha: float = 0.9


@dataclass
class TrainerConfig:
    epochs: int = 30
    # "auto" picks CUDA when present, else the CPU; or any torch device string ("cpu", "cuda:1").
    device: str = "auto"
    # fp32 | fp16 (autocast + gradient scaler) | bf16 (autocast, no scaler; works on the CPU too).
    precision: str = "fp32"
    label_smoothing: float = 0.0
    # Clip gradients by global L2 norm or by value, both null = off (after unscaling under fp16).
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    # Sum gradients over this many micro-batches per optimizer step (the loss is divided by it).
    accumulate_steps: int = 1
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Deterministic algorithms (bit-identical reruns on the CPU), at some cost in speed.
    deterministic: bool = False
    # Train loss, lr and gradient norm to TensorBoard every this many optimizer steps.
    log_every_steps: int = 50
    # Per-layer gradient norms to TensorBoard every this many optimizer steps; 0 = off.
    grad_norm_every_steps: int = 0
    # torch.compile the training forward pass; its first step (the compilation) is left out of
    # the epoch time and images/s.
    compile: bool = False
    # torch.compile's mode (with compile=true): default, reduce-overhead (CUDA graphs: one
    # launch per pass instead of one per kernel), max-autotune, max-autotune-no-cudagraphs.
    compile_mode: str = "default"
    # Channels-last memory format for the model and the images; null = on for the CPU and CUDA.
    channels_last: bool | None = None
    # Under torchrun: batch-norm statistics over the global batch (SyncBatchNorm; CUDA only).
    sync_batchnorm: bool = False
    # Also save last.pt every this many optimizer steps, mid-epoch (0 = at epoch ends only).
    checkpoint_every_steps: int = 0
    # After a stop signal under SLURM (SLURM_JOB_ID set), put the job back in the queue.
    requeue: bool = True
    # tqdm bars: null shows them only on a terminal.
    progress: bool | None = None
    # Also evaluate the test set after every epoch: logged (test_by_epoch/ in TensorBoard, the
    # history of metrics.json) for speed runs that report accuracy by epoch, and never used to
    # choose best.pt or to stop.
    test_every_epoch: bool = False
    # Quantization-aware training: fake-quantize every conv and linear layer as the int8 export
    # does (per-channel symmetric int8 weights, uint8 input activations over each batch's range),
    # so that the weights learn to survive it; usually a short fine-tune from model.weights.
    qat: bool = False


@dataclass
class PruneConfig:
    # task=prune: the fraction of each pruned layer's channels to remove, in (0, 1).
    ratio: float = 0.3
    # How filters are ranked: l1 (Li et al. 2017) or l2 norm of their weights, or random.
    importance: str = "l1"
    # blocks: inside each residual block only (the block's output width stays; for the
    # zero-padding shortcut A); groups: Torch-Pruning's dependency groups, residual streams
    # included (shortcut B, bottlenecks, plain nets); auto: blocks for shortcut A, else groups.
    method: str = "auto"
    # Keep a multiple of this many channels in each pruned layer: vector kernels run odd widths
    # slowly (ResNet-56 on this project's CPU: 31% fewer MACs at exact widths ran no faster;
    # 33% fewer at multiples of 8, 1.10x eager and 1.19x ONNX Runtime); 1 = exactly the ratio.
    round_to: int = 8


@dataclass
class EvalConfig:
    # task=eval: the part of the data to evaluate: train (the images trained on, without
    # augmentation), valid (the data.valid_ratio hold-out) or test.
    split: str = "test"
    # Test-time augmentation: average the logits of each image and of its mirror image.
    tta: bool = False
    # Expected calibration error over this many equal-width confidence bins (Guo et al. 2017).
    calibration_bins: int = 15


@dataclass
class ExportConfig:
    # task=export: "onnx" (ONNX Runtime and friends; dynamic batch size) or "pt2" (a
    # torch.export program, loaded with torch.export.load).
    format: str = "onnx"
    # null, or "int8": also write an ONNX Runtime static int8 model (QDQ, per-channel int8
    # weights, uint8 activations) calibrated on images of the training split.
    quantize: str | None = None
    # How many training-split images calibrate the int8 activation ranges (never test images).
    calibration_images: int = 512
    # How many test-split images the exported file is checked on against PyTorch.
    check_images: int = 64
    # Largest relative error (L2 norm of the difference over that of PyTorch's logits) that the
    # fp32 export may show on those images.
    check_tolerance: float = 1.0e-4


@dataclass
class PredictConfig:
    # task=predict: an image file, a folder of images (searched recursively), or a text file
    # with one image path per line (relative paths from the text file's folder).
    inputs: str | None = None
    # How many classes (with their probabilities) each image's row lists.
    top_k: int = 5
    # How many rows the console table shows (all are in predictions.csv).
    show: int = 10


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    seed: int = 0
    # "train"; "summary": print the model's parameters, MACs and stage shapes, and stop;
    # "eval": evaluate model.weights on eval.split; "export": write model.weights as ONNX or a
    # torch.export program (export.*); "prune": write a smaller model.weights (prune.*);
    # "predict": the classes of new images (predict.inputs) by model.weights.
    task: str = "train"
    # The run's directory is outputs/<name>; null: outputs/<model>-<data>-<config digest>.
    name: str | None = None
    # "auto": continue the run in this run's directory from its newest readable checkpoint (or
    # start it when it has none); or a checkpoint file (last.pt of an earlier run); null: a new
    # run, refused if the directory already holds one.
    resume: str | None = None


# Keys that may differ between a checkpoint and the run that continues it: where the data is, the
# device, what is logged and when, how long to train. Any other difference is refused on resume,
# and every other key names the run's directory (run_name).
MAY_CHANGE = (
    "resume",
    "name",
    "task",
    "data.root",
    "data.download",
    "data.num_workers",
    "trainer.epochs",
    "trainer.device",
    "trainer.progress",
    "trainer.log_every_steps",
    "trainer.grad_norm_every_steps",
    "trainer.checkpoint_every_steps",
    "trainer.requeue",
    "trainer.early_stopping.patience",
    "trainer.test_every_epoch",
    # the teacher's file may move: its contents are compared (its sha256) instead
    "trainer.distill.teacher",
)
# Of those, the keys a sweep may vary on purpose (resnet-train-report shows them as swept).
SWEEPABLE_MAY_CHANGE = (
    "trainer.epochs",
    "trainer.early_stopping.patience",
    "trainer.distill.teacher",
)
# The keys of MAY_CHANGE that say nothing of how a job runs: a sweep's jobs are never named by
# them (any other, swept, names them: data.num_workers=0,4 measures two loaders, in two folders).
UNSWEPT = ("resume", "name", "task")
TEACHER_KEY = "trainer.distill.teacher"
DIGEST_CHARS = 8


def _safe(text: str) -> str:
    """One folder-name part: letters, digits and ._+- only (nothing a shell would expand)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :DIGEST_CHARS
    ]


def training_identity(root: DictConfig, world: int | None = None) -> dict[str, Any]:
    """What makes a run train differently: every resolved key of the job's config except the
    ones that may change on resume, and the process count (`world`, or torchrun's
    WORLD_SIZE)."""
    keys = [k for k in root if k != "hydra"]
    tree = {k: OmegaConf.to_container(root[k], resolve=True) if isinstance(root[k], DictConfig)
            else root[k] for k in keys}  # fmt: skip
    flat = {k: v for k, v in flatten(tree).items() if k not in MAY_CHANGE}
    flat["world_size"] = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if flat.get("data.name") == "imagenet" and flat.get("data.eval_resize") is None:
        # (what null stands for: the number configs/data/imagenet.yaml gave before, 256 at
        # 224 px, so that a run begun then keeps its folder)
        flat["data.eval_resize"] = settled_eval_resize(flat["data.image_size"],
                                                       flat["data.augment.crop"])  # fmt: skip
    teacher = flatten(tree).get(TEACHER_KEY)
    if teacher is not None:
        # a distilled run differs from a plain one, and from one with another teacher: the
        # teacher's contents name the run (its path may change on resume)
        flat[TEACHER_KEY] = _file_identity(str(teacher))
    return flat


# The centre crop's share of the resized image in the ImageNet protocol (224 of 256).
CROP_RATIO = 0.875


def settled_eval_resize(image_size: int, crop: str) -> int:
    """What data.eval_resize=null stands for: image_size / 0.875 (256 for 224, the ImageNet
    protocol) when training crops with random_resized, else image_size (small images)."""
    return round(image_size / CROP_RATIO) if crop == "random_resized" else int(image_size)


def _file_identity(path: str) -> str:
    """sha256:<hex> of a file's contents (read once per size and mtime), or the path as given
    when it is no readable file (validate refuses it later, naming the key)."""
    try:
        p = Path(path).expanduser().resolve()
        st = p.stat()
    except (OSError, RuntimeError):
        return path
    if not p.is_file():
        return path
    return _sha256_of(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    try:
        return "sha256:" + file_sha256(Path(path))
    except OSError:
        return path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_name(name: str | None, *, _root_: DictConfig) -> str:
    """A run's directory name: `name` when given; else <model>-<data>-<8 hex digits of the
    training config> for a training run (resnet56-cifar10-3fa9c2d1), <task>-<the weights' run
    folder>-<digest> for the tasks that read a model (eval-resnet56-cifar10-3fa9c2d1-0b12c4de).
    The same config gives the same name however it is spelt on the command line, so
    resume=auto finds the run again; any config that trains differently gets another."""
    if name:
        return str(name)
    return run_names_by_world(_root_, [None])[None]


def run_names_by_world(root: DictConfig, worlds: Iterable[int | None]) -> dict[int | None, str]:
    """An unnamed run's directory name (run_name) for each number of processes in `worlds`
    (None: this process's); the config is resolved once for all of them."""
    _root_ = root
    identity = training_identity(_root_)
    # A sweep's job: the keys that may change on resume but that this sweep varies (trainer.
    # epochs=10,20) name its jobs too, or they would share one folder.
    swept = OmegaConf.get_cache(_root_).get("sweep_name", {}).get("swept", ())
    for key in swept:
        if key not in identity:
            identity[key] = OmegaConf.select(_root_, key)
    task = str(_root_.get("task", "train"))
    if task in ("train", "summary"):
        parts = [str(_root_.model.name), str(_root_.data.name)]
    else:
        weights = _root_.model.get("weights")
        parts = [task] + ([Path(str(weights)).parent.name or Path(str(weights)).stem]
                          if weights else [])  # fmt: skip
    prefix = "-".join(_safe(p) for p in parts)
    here = identity["world_size"]
    # One JSON text for all counts: each differs only in world_size's number (the same text
    # _digest would make, without dumping the whole config again for each).
    marker = -7_031_965_877
    text = json.dumps({**identity, "world_size": marker}, sort_keys=True, default=str)
    assert text.count(str(marker)) == 1
    names = {}
    for world in worlds:
        payload = text.replace(str(marker), str(here if world is None else world))
        names[world] = f"{prefix}-{hashlib.sha256(payload.encode()).hexdigest()[:DIGEST_CHARS]}"
    return names


def sweep_name(name: str | None, *, _root_: DictConfig) -> str:
    """A multirun's directory name: `name` when given; else <model>-<data>-<digest of the base
    config, the sweep's overrides and search space>, so every different sweep gets a directory
    of its own and the same command relaunched finds its own again. (A group that is swept
    shows as "models" or "data".)"""
    # Computed once, on the sweep's own config, and kept in its resolver cache, which Hydra
    # copies into every job's config (composed again with that job's overrides). OmegaConf's
    # use_cache cannot be combined with _root_, hence the cache by hand. (The swept keys are
    # kept for the jobs' names, named sweep or not: run_name.)
    cache = record_swept_keys(_root_)
    if name:
        return str(name)
    if "dir" not in cache:
        cache["dir"] = _sweep_name(_root_)
    return cache["dir"]


def record_swept_keys(_root_: DictConfig) -> dict[str, Any]:
    """Keep, in the sweep's resolver cache (copied into each job's config), the keys that may
    change on resume but that this sweep varies, itself or through a parent or a group
    (trainer.epochs=10,20; trainer.early_stopping={patience:3},{patience:5}; experiment=a,b;
    data.num_workers=0,4): they name its jobs (run_name). Return the cache."""
    cache = OmegaConf.get_cache(_root_)["sweep_name"]
    if "swept" not in cache:
        swept = _swept_keys(_root_)
        cache["swept"] = tuple(k for k in MAY_CHANGE if k not in UNSWEPT
                               if any(_names_jobs(k, s) for s in swept))  # fmt: skip
    return cache


# The config groups whose options may set a run's length.
LENGTH_GROUPS = ("experiment", "trainer")


def _names_jobs(key: str, swept: str) -> bool:
    """Whether a sweep over `swept` (a key, or a config group) varies `key`, a key that may
    change on resume: swept itself or through a parent key (data.num_workers=0,4; trainer.
    early_stopping={patience:3},{patience:5}), or, through a group's options, one of the keys a
    recipe sets (the run's length, its teacher). Through a group, a key such as data.root or
    trainer.log_every_steps given anew on a relaunch keeps the jobs' names."""
    if "." not in swept and key != swept:  # a group: data=a,b, experiment=a,b
        return key in SWEEPABLE_MAY_CHANGE and (
            key.startswith(swept + ".") or swept in LENGTH_GROUPS
        )
    return key == swept or key.startswith(swept + ".")


class RecordSweptKeys(Callback):
    """Hydra callback (configs/train.yaml): records the swept keys at a multirun's start, also
    where hydra.sweep.dir is given and the sweep_name resolver never runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        record_swept_keys(config)
        from resnet_train.cli import check_sweep_folder

        check_sweep_folder(config)  # (before the sweeper writes anything)


def _sweep_overrides(_root_: DictConfig) -> tuple[list[str], dict[str, Any] | None]:
    """A sweep's command-line overrides and its sweeper's search space (Optuna's params)."""
    hydra_node = _root_.get("hydra")
    overrides = [str(o) for o in (hydra_node.overrides.task if hydra_node is not None else [])]
    params = None
    if hydra_node is not None and isinstance(hydra_node.sweeper.get("params"), DictConfig):
        params = OmegaConf.to_container(hydra_node.sweeper.params, resolve=False)
    return overrides, params


def _swept_keys(_root_: DictConfig) -> set[str]:
    overrides, params = _sweep_overrides(_root_)
    return swept_in(overrides, params)


def swept_in(overrides: list[str], params: dict[str, Any] | None = None) -> set[str]:
    """The keys a sweep's command line varies (key=a,b; key=range(...); key=choice(...)) and
    its sweeper's search space (Optuna's params); read with Hydra's own parser, so that a quoted
    comma (name='a,b') or a list value (schedule.milestones=[30,60]) is not a sweep."""
    return {key for key, _, is_sweep in _read_overrides(overrides) if is_sweep} | set(params or {})


def _read_overrides(overrides: list[str]) -> list[tuple[str, str, bool]]:
    """(key, canonical form, whether it sweeps) for each override. The canonical form of a
    sweep over a list of values is that list in sorted order (seed=6,5, seed=5,6 and
    seed=range(5,7) run the same jobs); any other override is kept as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # (a grammar error: the command itself is refused elsewhere)
        return [(override_key(o), o, "," in o or "(" in o) for o in overrides]
    read = []
    for o in parsed:
        line = o.input_line or ""
        if (values := sweep_values(o)) is not None:
            line = line.split("=", 1)[0] + "=" + ",".join(sorted(values))
        read.append((override_key(line), line, o.is_sweep_override()))
    return read


def sweep_values(override: Any) -> list[str] | None:
    """The values of a parsed override (Hydra's Override) that sweeps over a list, a range or a
    choice, as written on a command line; None for any other (and for glob(), which needs the
    config loader)."""
    from hydra.core.override_parser.types import Override

    if not (override.is_sweep_override() and override.is_discrete_sweep()):
        return None
    try:
        return [Override._get_value_element_as_str(v) for v in override.sweep_iterator()]
    except Exception:  # glob()
        return None


# Where configs/train.yaml puts the sweeps' folders (hydra.sweep.dir), from the working folder.
SWEEPS = Path("outputs") / "multirun"


def _sweep_name(_root_: DictConfig) -> str:
    overrides, params = _sweep_overrides(_root_)
    # Values in a canonical order, but for a search (Optuna's params): its study keeps a
    # choice's values in the order given, and refuses another order in the same folder.
    read = _read_overrides(overrides) if params is None else [
        (override_key(o), o, False) for o in overrides]  # fmt: skip
    kept = sorted(line for key, line, _ in read if key not in MAY_CHANGE)
    swept = swept_in(overrides, params)
    # teachers by their contents, as a run's name has them
    teachers = sorted(_file_identity(path) for o in overrides if override_key(o) == TEACHER_KEY
                      for path in o.split("=", 1)[1].split(","))  # fmt: skip
    payload = {"base": training_identity(_root_), "overrides": kept, "params": params}
    if teachers:
        payload["teachers"] = teachers
    model = "models" if "model" in swept else str(_root_.model.name)
    data = "data" if "data" in swept else str(_root_.data.name)
    name = "-".join([_safe(model), _safe(data), _digest(payload)])
    # A sweep begun before its values were read in a canonical order was named by its overrides
    # as spelt (optim.lr=0.1,0.05): relaunched, it finds its folder under that name.
    spelt = {**payload, "overrides": sorted(o for o in overrides if override_key(o) not in
                                            MAY_CHANGE)}  # fmt: skip
    earlier = "-".join([_safe(model), _safe(data), _digest(spelt)])
    if earlier != name and (SWEEPS / earlier).is_dir() and not (SWEEPS / name).exists():
        return earlier
    return name


def override_key(override: str) -> str:
    """The key an override sets (+key=, ~key= and key= alike)."""
    return override.split("=", 1)[0].lstrip("+~")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("sweep_name"):
        OmegaConf.register_new_resolver("sweep_name", sweep_name)


DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder", "synthetic")
# The most bytes a synthetic set's images (uint8) may take.
SYNTHETIC_MAX_BYTES = 2**31
# The data sets read from image files (of any size) rather than arrays.
FILE_DATASETS = ("imagenet", "imagefolder")
BALANCE = ("none", "sampler", "loss")
# The torchvision / ImageNet normalisation, which torchvision's pretrained weights expect.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The names model.freeze accepts besides the stages (layer1, layer2, ...).
FREEZE_PARTS = ("stem", "fc", "backbone")
STEMS = ("cifar", "imagenet")
CROPS = ("pad", "random_resized", "none")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "multistep", "cosine", "cosine_restarts", "onecycle")
INTERVALS = ("epoch", "step")
PRECISIONS = ("fp32", "fp16", "bf16")
# torch.compile's modes; reduce-overhead (and max-autotune) replay each step's kernels as CUDA
# graphs, for steps the host cannot issue fast enough (small images on a fast GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
AUTOAUGMENT_POLICIES = ("cifar10", "imagenet", "svhn")
MONITORS = ("valid/acc", "valid/loss", "valid/balanced_acc")
# The direction in which each monitored metric improves.
MONITOR_MODES = {"valid/acc": "max", "valid/loss": "min", "valid/balanced_acc": "max"}
# The number of classes and the image size of the data sets whose files fix them.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}
DATASET_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32}
# numpy's legacy seeding (data workers, np.random.seed) takes 32-bit seeds.
MAX_SEED = 2**32 - 1
# Schedules whose rate has a floor (schedule.min_lr).
FLOORED_SCHEDULES = ("cosine", "cosine_restarts")
SHORTCUTS = ("A", "B", "none")
TASKS = ("train", "summary", "eval", "export", "prune", "predict")
# The tasks that read a trained model from model.weights.
WEIGHTS_TASKS = ("eval", "export", "prune", "predict")
SPLITS = ("train", "valid", "test")
EXPORT_FORMATS = ("onnx", "pt2")
PRUNE_IMPORTANCE = ("l1", "l2", "random")
PRUNE_METHODS = ("auto", "blocks", "groups")
# What a recipe puts in a path it cannot know (trainer.distill.teacher of a distillation
# recipe, model.weights of a fine-tuning one): the command line must say which.
REQUIRED = "REQUIRED"


# data=imagefolder's split folders (resnet_train.data.folders reads them).
TRAIN_FOLDER = "train"
VALID_FOLDERS = ("val", "valid")


def has_validation(d: DictConfig) -> bool:
    """Whether the data has a validation split: data.valid_ratio > 0, or data=imagefolder's
    own val/ (or valid/) folder beside train/, which is used whatever the ratio."""
    if d.valid_ratio > 0:
        return True
    if d.name != "imagefolder" or d.root is None:
        return False
    root = Path(str(d.root)).expanduser()
    return (root / TRAIN_FOLDER).is_dir() and any((root / f).is_dir() for f in VALID_FOLDERS)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        shown = (
            "null"
            if value is None
            else str(value).lower()
            if isinstance(value, bool)
            else repr(value)
        )
        raise ConfigError(f"{key}={shown} is invalid: {allowed}")


def _one_of(key: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    _check(value in choices, key, value, "allowed: " + ", ".join(choices))


def _at_least(key: str, value: Any, low: float) -> None:
    _check(value >= low, key, value, f"must be >= {low}")


# Beyond these a model or a batch cannot be built in any machine's memory (ImageNet-21k has
# 21,841 classes; 4096 px is 334 times the pixels of ImageNet's 224).
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 4096


def _count(key: str, value: Any, low: int, high: int) -> None:
    _check(low <= value <= high, key, value, f"must be in [{low}, {high:,}]")


def _within(key: str, value: Any, interval: str) -> None:
    """interval like "[0, 1)": brackets say whether each end is allowed."""
    low, high = (float(v) for v in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    _check(above and below, key, value, f"must be in {interval}")


def _positive(key: str, value: Any) -> None:
    _check(value > 0, key, value, "must be > 0")


def check_classifier(cfg: DictConfig) -> None:
    """model.num_classes covers the data's labels (checked again once an image folder's classes
    are counted, data.num_classes being null until then)."""
    m, d = cfg.model, cfg.data
    if m.num_classes is not None and d.num_classes is not None:
        _check(
            m.num_classes >= d.num_classes,
            "model.num_classes",
            m.num_classes,
            f"the data has {d.num_classes} classes (labels 0 to {d.num_classes - 1}), so the "
            f"classifier needs at least {d.num_classes} outputs; null takes data.num_classes",
        )


def _check_file(key: str, value: str, allowed: str) -> None:
    from pathlib import Path

    _check(str(value).strip() != "", key, value, f"an empty path: {allowed}")
    path = Path(value).expanduser()
    if path.is_dir():
        names = [n for n in ("best.pt", "last.pt", "pruned.pt") if (path / n).is_file()]
        hint = f" (it holds {', '.join(names)}: give one of them)" if names else ""
        _check(False, key, value, f"is a folder, not a file{hint}: {allowed}")
    _check(path.is_file(), key, value, f"no such file: {allowed}")


def _validate_distill(kd: DictConfig, models: list[str]) -> None:
    _check(kd.teacher != REQUIRED, "trainer.distill.teacher", kd.teacher,
           "this experiment distils: give the teacher's weights, trainer.distill.teacher=PATH "
           "(or null to train the student alone)")  # fmt: skip
    if kd.teacher is not None:
        _check_file("trainer.distill.teacher", kd.teacher,
                    "give a resnet-train checkpoint or a torchvision .pth")  # fmt: skip
    _optional("trainer.distill.teacher_model", kd.teacher_model, _one_of, models)
    _check(kd.teacher_model is None or kd.teacher is not None, "trainer.distill.teacher_model",
           kd.teacher_model, "names the teacher's architecture: set trainer.distill.teacher "
           "too")  # fmt: skip
    # (beyond these the soft targets' logits / T overflow or vanish: a nan loss at step 1)
    _within("trainer.distill.temperature", kd.temperature, "[0.01, 1000]")
    _within("trainer.distill.alpha", kd.alpha, "[0, 1]")


def _check_normalisation(key: str, value: Any, positive: bool, scale: bool = True) -> None:
    """data.mean / data.std: "auto", null, or three numbers (> 0 for the std)."""
    if value is None or value == "auto":
        return
    ok = OmegaConf.is_list(value) or isinstance(value, (list, tuple))
    values = list(value) if ok else []
    ok = (
        ok
        and len(values) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )
    ok = ok and (not positive or min(values) > 0)
    shown = values if values else value
    _check(ok, key, shown, "must be three numbers (R, G, B)" + (" > 0" if positive else "")
           + ", auto (computed on the training split) or null (those of model.weights' "
           "training)")  # fmt: skip
    scaled = [round(v / 255, 4) for v in values]
    _check(not scale or max(values) <= 1, key, shown, "pixels are scaled to [0, 1] before they are "
           f"normalised: give it on that scale (divided by 255: {scaled})")  # fmt: skip


def _check_freeze(m: DictConfig) -> None:
    """model.freeze: null, a part's name or a list of them (the stages are checked against the
    model when it is built)."""
    if m.freeze is None:
        return
    parts = list(m.freeze) if OmegaConf.is_list(m.freeze) else [m.freeze]
    for part in parts:
        stage = isinstance(part, str) and part.startswith("layer") and part[5:].isdigit()
        _check(stage or part in FREEZE_PARTS, "model.freeze", part,
               "allowed: stem, layer1, layer2, ... (the model's stages), fc, backbone (all "
               "but fc), or a list of them")  # fmt: skip
    _check(not ("backbone" in parts and "fc" in parts), "model.freeze", parts,
           "freezes the whole model: nothing would train")  # fmt: skip


def _optional(key: str, value: Any, check, *args) -> None:
    if value is not None:
        check(key, value, *args)


@functools.cache
def schema() -> DictConfig:
    """TrainConfig as a read-only config node (0.15 s to build: once a process)."""
    node = OmegaConf.structured(TrainConfig)
    OmegaConf.set_readonly(node, True)
    return node


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value is out of range or unknown."""
    from resnet_train.models import list_models  # models import torch; keep config light

    _reject_missing(cfg)
    _reject_unknown_keys(cfg, schema(), "")
    _reject_non_finite(cfg, "")
    _one_of("task", cfg.task, TASKS)
    _within("seed", cfg.seed, f"[0, {MAX_SEED}]")
    if cfg.resume is not None:
        _check(bool(cfg.resume), "resume", cfg.resume,
               "auto, the path of a checkpoint, or null for a new run")  # fmt: skip
        _check(cfg.task not in WEIGHTS_TASKS, "resume", cfg.resume,
               f"it continues a training run; task={cfg.task} reads the model of "
               "model.weights=PATH (and is not resumed: run it again)")  # fmt: skip
    models = list_models()
    _validate_model(cfg, models)
    _validate_data(cfg)
    _validate_optim(cfg.optim)
    _check_something_trains(cfg)
    _validate_schedule(cfg)
    _validate_trainer(cfg, models)
    _check_deploy(cfg)
    _check_decoder(cfg)


def _validate_model(cfg: DictConfig, models: list[str]) -> None:
    m = cfg.model
    _one_of("model.name", m.name, models)
    _optional("model.stem", m.stem, _one_of, STEMS)
    _optional("model.shortcut", m.shortcut, _one_of, SHORTCUTS)
    _optional("model.num_classes", m.num_classes, _count, 1, MAX_CLASSES)
    _within("model.dropout", m.dropout, "[0, 1)")
    _check(m.weights != REQUIRED, "model.weights", m.weights,
           "this experiment fine-tunes: give the pretrained weights, model.weights=PATH (a "
           "torchvision .pth such as resnet50-11ad3fa6.pth, or a resnet-train "
           "checkpoint)")  # fmt: skip
    if m.weights is not None and not (cfg.task == "train" and cfg.resume is not None):
        # (a resumed run does not read it: its checkpoint holds the weights; a new run that
        # resume=auto starts finds a missing file when it reads it)
        _check_file("model.weights", m.weights,
                    "give a torchvision .pth or a resnet-train checkpoint")  # fmt: skip


def _validate_data(cfg: DictConfig) -> None:
    d, a = cfg.data, cfg.data.augment
    _one_of("data.name", d.name, DATASETS)
    _check(d.root is not None or d.name == "synthetic" or cfg.task == "predict", "data.root",
           None, f"data={d.name} reads its images from a folder: give data.root=DIR"
           + (" (DIR/<class>/<image>, or DIR/train/<class>/<image> with optional val/ and "
              "test/)" if d.name == "imagefolder" else ""))  # fmt: skip
    if d.num_classes is None:
        _check(d.name == "imagefolder", "data.num_classes", None,
               "only data=imagefolder counts its classes (its class folders); give a number "
               "of classes")  # fmt: skip
    else:
        _count("data.num_classes", d.num_classes, 1, MAX_CLASSES)
    if d.name in DATASET_CLASSES:
        classes = DATASET_CLASSES[d.name]
        _check(d.num_classes == classes, "data.num_classes", d.num_classes,
               f"data={d.name} has {classes} classes")  # fmt: skip
        size = DATASET_IMAGE_SIZE[d.name]
        _check(d.image_size == size, "data.image_size", d.image_size,
               f"data={d.name} has images of {size}x{size} pixels")  # fmt: skip
    check_classifier(cfg)
    _check_freeze(cfg.model)
    _count("data.image_size", d.image_size, 8, MAX_IMAGE_SIZE)
    _optional("data.eval_resize", d.eval_resize, _at_least, 0)
    if d.eval_resize:
        _check(d.eval_resize >= d.image_size, "data.eval_resize", d.eval_resize,
               f"the centre crop of data.image_size={d.image_size} needs a resize to at least "
               f"that; 0 = no resize, null = image_size / 0.875")  # fmt: skip
    for key in ("mean", "std"):
        # (the pixel scale only for a run that trains: a model trained on other figures is
        # still evaluated, exported or used with its own)
        _check_normalisation(f"data.{key}", d[key], key == "std", cfg.task == "train")
    _within("data.test_ratio", d.test_ratio, "[0, 1)")
    _one_of("data.balance", d.balance, BALANCE)
    if cfg.task == "train":
        _check(
            d.batch_size >= 2,
            "data.batch_size",
            d.batch_size,
            "must be >= 2: BatchNorm cannot normalise a training batch of one image (for larger "
            "steps from small batches, raise trainer.accumulate_steps)",
        )
    else:  # evaluation only: BatchNorm uses its running statistics, one image is a batch
        _at_least("data.batch_size", d.batch_size, 1)
    _check(d.batch_size < 2**63, "data.batch_size", d.batch_size, "must be < 2**63")
    _optional("data.num_workers", d.num_workers, _at_least, 0)
    _one_of("data.decoder", d.decoder, ("torchvision", "pil", "gpu"))
    _within("data.valid_ratio", d.valid_ratio, "[0, 1)")
    _optional("data.train_size", d.train_size, _at_least, 1)
    _optional("data.test_size", d.test_size, _at_least, 1)
    if d.name == "synthetic":  # made in memory, uint8
        most = SYNTHETIC_MAX_BYTES // (3 * d.image_size**2)
        for key in ("train_size", "test_size"):
            _check(d[key] is None or d[key] <= most, f"data.{key}", d[key],
                   f"data=synthetic makes its images in memory: at most {most:,} of "
                   f"{d.image_size}x{d.image_size} px (2 GiB)")  # fmt: skip
    _one_of("data.augment.crop", a.crop, CROPS)
    _within("data.augment.padding", a.padding, f"[0, {d.image_size}]")
    _optional("data.augment.autoaugment", a.autoaugment, _one_of, AUTOAUGMENT_POLICIES)
    policies = [k for k in ("autoaugment", "randaugment", "trivialaugment") if a[k]]
    if len(policies) > 1:
        _check(False, f"data.augment.{policies[1]}", a[policies[1]],
               "only one of autoaugment, randaugment, trivialaugment at a time "
               f"({policies[0]} is on)")  # fmt: skip
    _at_least("data.augment.randaugment_num_ops", a.randaugment_num_ops, 1)
    _within("data.augment.randaugment_magnitude", a.randaugment_magnitude, "[0, 30]")
    _within("data.augment.random_erasing", a.random_erasing, "[0, 1]")
    _within("data.augment.cutout", a.cutout, f"[0, {d.image_size}]")
    _at_least("data.augment.mixup_alpha", a.mixup_alpha, 0)
    _at_least("data.augment.cutmix_alpha", a.cutmix_alpha, 0)
    _one_of("data.loader", d.loader, ("tensor", "torch"))
    if d.loader == "tensor":
        _check(
            d.name not in FILE_DATASETS,
            "data.loader",
            d.loader,
            f"data={d.name} reads image files: use data.loader=torch",
        )
        only_torch = {
            "crop": a.crop == "random_resized",
            "autoaugment": a.autoaugment is not None,
            "randaugment": a.randaugment,
            "trivialaugment": a.trivialaugment,
            "random_erasing": a.random_erasing > 0,
        }
        for key, used in only_torch.items():
            if used:
                raise ConfigError(
                    f"data.augment.{key}={a[key]} needs data.loader=torch: the tensor path "
                    "does crop with padding, flip and Cutout (MixUp and CutMix work on both)"
                )
        # (it was ignored there, while the DataLoader path resized: two test figures)
        _check(
            not d.eval_resize or d.eval_resize == d.image_size,
            "data.eval_resize",
            d.eval_resize,
            "it needs data.loader=torch: the tensor path evaluates the images at their own size "
            "(data.eval_resize=0)",
        )


def _validate_optim(o: DictConfig) -> None:
    _one_of("optim.name", o.name, OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _within("optim.momentum", o.momentum, "[0, 1)")
    _check(
        not o.nesterov or o.momentum > 0,
        "optim.nesterov",
        o.nesterov,
        "Nesterov needs optim.momentum > 0",
    )
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        list(o.betas),
        "must be two values in [0, 1)",
    )
    _positive("optim.eps", o.eps)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _one_of("optim.lr_scaling", o.lr_scaling, ("none", "linear"))
    _at_least("optim.backbone_lr_mult", o.backbone_lr_mult, 0)
    _at_least("optim.reference_batch", o.reference_batch, 1)


def frozen_parts(freeze: Any) -> list[str]:
    """model.freeze as a list of part names (null: none; one name alone: a list of it)."""
    return [] if freeze is None else [freeze] if isinstance(freeze, str) else list(freeze)


def _check_something_trains(cfg: DictConfig) -> None:
    """optim.backbone_lr_mult=0 leaves only the classifier training: with it frozen too,
    nothing would (the run went on at rate 0)."""
    if cfg.optim.backbone_lr_mult == 0 and "fc" in frozen_parts(cfg.model.freeze):
        raise ConfigError(
            f"model.freeze={frozen_parts(cfg.model.freeze)} is invalid with "
            "optim.backbone_lr_mult=0: it freezes the classifier, the one part the rate 0 of "
            "the backbone leaves to train, so nothing would train"
        )


def _validate_schedule(cfg: DictConfig) -> None:
    s, o = cfg.schedule, cfg.optim
    _one_of("schedule.name", s.name, SCHEDULES)
    _one_of("schedule.interval", s.interval, INTERVALS)
    _at_least("schedule.step_size", s.step_size, 1)
    _within("schedule.gamma", s.gamma, "(0, 1]")
    _check(
        list(s.milestones) == sorted(set(s.milestones)) and min(s.milestones, default=1) >= 1,
        "schedule.milestones",
        list(s.milestones),
        "must be increasing numbers >= 1",
    )
    _check(
        s.name != "multistep" or len(s.milestones) > 0,
        "schedule.milestones",
        list(s.milestones),
        "schedule=multistep needs at least one milestone",
    )
    _at_least("schedule.min_lr", s.min_lr, 0)
    if s.name in FLOORED_SCHEDULES and o.lr_scaling == "none":  # else checked with the batch
        _within("schedule.min_lr", s.min_lr, f"[0, {o.lr})")
    _at_least("schedule.restart_period", s.restart_period, 1)
    _at_least("schedule.restart_mult", s.restart_mult, 1)
    _within("schedule.pct_start", s.pct_start, "(0, 1)")
    _positive("schedule.div_factor", s.div_factor)
    _positive("schedule.final_div_factor", s.final_div_factor)
    _at_least("schedule.warmup", s.warmup, 0)
    _check(
        s.name != "onecycle" or s.warmup == 0,
        "schedule.warmup",
        s.warmup,
        "onecycle has its own warm-up (schedule.pct_start); set schedule.warmup=0",
    )
    _within("schedule.warmup_start_factor", s.warmup_start_factor, "(0, 1]")
    if s.cycle_momentum:
        _check(
            s.name == "onecycle",
            "schedule.cycle_momentum",
            s.cycle_momentum,
            f"only schedule=onecycle cycles the momentum (schedule={s.name})",
        )
        momentum = o.momentum if o.name == "sgd" else o.betas[0]
        _check(
            momentum > 0,
            "schedule.cycle_momentum",
            s.cycle_momentum,
            "needs a momentum to cycle: optim.momentum > 0 (SGD) or optim.betas[0] > 0 (AdamW)",
        )


def _validate_trainer(cfg: DictConfig, models: list[str]) -> None:
    s, t, es, ema = cfg.schedule, cfg.trainer, cfg.trainer.early_stopping, cfg.trainer.ema
    _at_least("trainer.epochs", t.epochs, 1)
    if s.interval == "epoch":  # in steps, checked once the steps per epoch are known
        _check(
            s.warmup < t.epochs,
            "schedule.warmup",
            s.warmup,
            f"the warm-up must end before the run does: less than trainer.epochs={t.epochs} "
            "(schedule.interval=epoch)",
        )
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    _check(t.compile or t.compile_mode == "default", "trainer.compile_mode", t.compile_mode,
           "a torch.compile mode needs trainer.compile=true (to train without compiling, "
           "also set trainer.compile_mode=default)")  # fmt: skip
    _within("trainer.label_smoothing", t.label_smoothing, "[0, 1)")
    _optional("trainer.clip_grad_norm", t.clip_grad_norm, _positive)
    _optional("trainer.clip_grad_value", t.clip_grad_value, _positive)
    _check(
        t.clip_grad_value is None or t.clip_grad_norm is None,
        "trainer.clip_grad_value",
        t.clip_grad_value,
        f"clip by the norm (trainer.clip_grad_norm={t.clip_grad_norm}) or by the value, not "
        "both: set the other to null",
    )
    _at_least("trainer.accumulate_steps", t.accumulate_steps, 1)
    _one_of("trainer.early_stopping.monitor", es.monitor, MONITORS)
    _optional("trainer.early_stopping.mode", es.mode, _one_of, ("max", "min"))
    if es.mode is not None:
        _check(
            es.mode == MONITOR_MODES[es.monitor],
            "trainer.early_stopping.mode",
            es.mode,
            f"{es.monitor} improves when it goes {'up' if es.monitor.endswith('acc') else 'down'}:"
            f" use {MONITOR_MODES[es.monitor]}, or null to follow the metric",
        )
    _optional("trainer.early_stopping.patience", es.patience, _at_least, 1)
    _at_least("trainer.early_stopping.min_delta", es.min_delta, 0)
    _check(
        es.patience is None or has_validation(cfg.data),
        "trainer.early_stopping.patience",
        es.patience,
        "early stopping watches the validation set, and data.valid_ratio=0 has none; set "
        "data.valid_ratio > 0 or patience=null",
    )
    _optional("trainer.ema.decay", ema.decay, _within, "(0, 1)")
    _one_of("trainer.ema.select", ema.select, ("best", "ema", "raw"))
    _check(
        ema.select != "ema" or ema.decay is not None,
        "trainer.ema.select",
        ema.select,
        "there are no EMA weights to select without trainer.ema.decay; set a decay (0.999)",
    )
    _validate_distill(t.distill, models)
    _at_least("trainer.log_every_steps", t.log_every_steps, 1)
    _at_least("trainer.grad_norm_every_steps", t.grad_norm_every_steps, 0)
    _at_least("trainer.checkpoint_every_steps", t.checkpoint_every_steps, 0)
    check_name(cfg.name)
    _check(
        _is_device(t.device),
        "trainer.device",
        t.device,
        "allowed: auto, cpu, or a cuda:N or mps device this machine has",
    )
    if t.sync_batchnorm:
        import torch

        on = "cuda" if t.device == "auto" and torch.cuda.is_available() else t.device
        _check(
            str(on).startswith("cuda"),
            "trainer.sync_batchnorm",
            t.sync_batchnorm,
            "SyncBatchNorm runs on CUDA devices only, and trainer.device="
            f"{t.device} is {'the CPU' if on in ('auto', 'cpu') else on} here; use false",
        )


def check_name(name: str | None) -> None:
    """name=: a run's (or a sweep's) folder under outputs/, never a path out of it."""
    if name is not None:
        _check(bool(name) and "/" not in name and name not in (".", ".."), "name", name,
               "a non-empty folder name without '/'")  # fmt: skip
        if (size := len(os.fsencode(str(name)))) > NAME_MAX:  # (it was OSError's traceback)
            raise ConfigError(
                f"name={str(name)[:40]}... is invalid: {size} bytes long, and a folder name has "
                f"at most {NAME_MAX} (the file system's limit)"
            )


NAME_MAX = 255  # bytes of one folder name (Linux, macOS)


def _check_decoder(cfg: DictConfig) -> None:
    d, t = cfg.data, cfg.trainer
    if d.decoder == "gpu":
        import torch

        device = "cuda" if t.device == "auto" and torch.cuda.is_available() else t.device
        _check(
            d.name == "imagenet" and device.startswith("cuda"),
            "data.decoder",
            d.decoder,
            "decodes image files (data=imagenet) on a CUDA trainer.device; "
            "use torchvision on the CPU",
        )


def _check_deploy(cfg: DictConfig) -> None:
    """The keys of task=eval and task=export, and QAT's."""
    ev, ex = cfg.eval, cfg.export
    _one_of("eval.split", ev.split, SPLITS)
    _within("eval.calibration_bins", ev.calibration_bins, "[1, 1000]")
    _one_of("export.format", ex.format, EXPORT_FORMATS)
    _optional("export.quantize", ex.quantize, _one_of, ("int8",))
    _check(
        ex.quantize is None or ex.format == "onnx",
        "export.quantize",
        ex.quantize,
        "int8 models are made with ONNX Runtime: use export.format=onnx",
    )
    _at_least("export.calibration_images", ex.calibration_images, 1)
    _within("prune.ratio", cfg.prune.ratio, "(0, 1)")
    _one_of("prune.importance", cfg.prune.importance, PRUNE_IMPORTANCE)
    _one_of("prune.method", cfg.prune.method, PRUNE_METHODS)
    _at_least("prune.round_to", cfg.prune.round_to, 1)
    _at_least("export.check_images", ex.check_images, 1)
    _at_least("predict.top_k", cfg.predict.top_k, 1)
    _at_least("predict.show", cfg.predict.show, 0)
    if cfg.task == "predict":
        _check(cfg.predict.inputs is not None and str(cfg.predict.inputs).strip() != "",
               "predict.inputs", cfg.predict.inputs,
               "task=predict needs the images: predict.inputs=PATH (an image, a folder of "
               "images, or a text file of image paths)")  # fmt: skip
    _positive("export.check_tolerance", ex.check_tolerance)
    if cfg.task in WEIGHTS_TASKS:
        _check(
            cfg.model.weights is not None,
            "model.weights",
            None,
            f"task={cfg.task} needs the model to {cfg.task}: model.weights=PATH (a resnet-train "
            "checkpoint such as outputs/RUN/best.pt, or a torchvision .pth)",
        )
    if cfg.trainer.qat:
        _check(
            cfg.trainer.precision == "fp32",
            "trainer.qat",
            cfg.trainer.qat,
            f"fake quantization runs in fp32: set trainer.precision=fp32 "
            f"(not {cfg.trainer.precision})",
        )


def complete(cfg: DictConfig) -> DictConfig:
    """Fill the keys whose null means "follow another key" with what they follow, so that the
    run, its checkpoints and its records say what was used: trainer.early_stopping.mode from the
    monitored metric. Returns cfg, changed in place."""
    es = cfg.trainer.early_stopping
    if es.mode is None:
        es.mode = MONITOR_MODES.get(es.monitor, "max")
    return cfg


def _reject_missing(cfg: DictConfig) -> None:
    """A key a config group leaves to the command line (data=imagefolder's data.root: ???)."""
    for key in sorted(OmegaConf.missing_keys(cfg)):
        hint = (
            ": the folder of the images (DIR/<class>/<image>, or DIR/train/<class>/<image>)"
            if key == "data.root"
            else ""
        )
        raise ConfigError(f"{key} is required: give {key}=VALUE on the command line{hint}")


def _reject_non_finite(cfg: DictConfig, prefix: str) -> None:
    """inf and nan pass the schema's float type; no key of ours means them."""
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, DictConfig):
            _reject_non_finite(value, f"{prefix}{key}.")
            continue
        values = list(value) if OmegaConf.is_list(value) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                shown = list(value) if OmegaConf.is_list(value) else value
                raise ConfigError(f"{prefix}{key}={shown!r} is invalid: must be a finite number")


def _reject_unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str) -> None:
    """Keys added with Hydra's `+key=value` get past the schema's struct flag; refuse them too."""
    for key in cfg.keys():
        if key not in schema:
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"{prefix}{key} is not a config key: allowed in {where}: "
                + ", ".join(str(k) for k in schema.keys())
            )
        if isinstance(cfg[key], DictConfig) and isinstance(schema[key], DictConfig):
            _reject_unknown_keys(cfg[key], schema[key], f"{prefix}{key}.")


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": leaf}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (what checkpoints and metrics.json store)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
