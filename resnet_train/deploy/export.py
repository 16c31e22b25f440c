"""task=export: a trained model as a file that runs without resnet-train.

BN folded first (deploy.fold), then ONNX (torch's exporter, a dynamic batch size) or a
torch.export program (.pt2). The file carries what a user needs to feed it: class names, image
size, eval resize, mean and std (ONNX metadata_props; the .pt2's extra file
"resnet_train.json"). Nothing is reported done before it is checked: the written file, loaded
back (ONNX Runtime; torch.export.load), must give PyTorch's logits of the unfolded model on test
images within export.check_tolerance, at the check batch and at batch 1. With
export.quantize=int8 an int8 ONNX model is written too (deploy.quantize), calibrated on training
images, and its top-1 on eval.split is compared with the fp32 model's.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from resnet_train.data.loaders import build_eval_loader
from resnet_train.deploy.fold import fold_batchnorm, pad_shortcuts_as_convs
from resnet_train.deploy.quantize import quantize_int8
from resnet_train.deploy.source import Trained, load_trained, require
from resnet_train.deploy.staging import Staging
from resnet_train.errors import UserError
from resnet_train.logging import write_json
from resnet_train.models.weights import file_sha256

log = logging.getLogger("resnet_train")
INPUT, OUTPUT = "images", "logits"


class ExportCheckError(UserError):
    """An exported file whose outputs differ from PyTorch's."""


def relative_error(got: torch.Tensor | np.ndarray, want: torch.Tensor) -> float:
    got = torch.as_tensor(got, dtype=torch.float64)
    want = want.to(torch.float64)
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def metadata(trained: Trained, names: list[str]) -> dict[str, Any]:
    d = trained.cfg.data
    outputs = [m for m in trained.model.modules() if isinstance(m, nn.Linear)][-1].out_features
    # (model.num_classes above the data's: the logits past the names belong to no class)
    unnamed = (f"; the last {outputs - len(names)} belong to no class of the data"
               if outputs > len(names) else "")  # fmt: skip
    return {
        "model": trained.cfg.model.name,
        "data": d.name,
        "class_names": names,
        "image_size": int(d.image_size),
        "eval_resize": int(d.eval_resize),
        "mean": [float(v) for v in d.mean],
        "std": [float(v) for v in d.std],
        "input": f"{INPUT}: float32 N x 3 x {d.image_size} x {d.image_size}, RGB scaled to [0, 1], "
        "then (x - mean) / std per channel",
        "output": f"{OUTPUT}: float32 N x {outputs}, one logit per class of class_names, in "
        f"its order (softmax for probabilities){unnamed}",
        "source": str(trained.weights.path),
        "source_sha256": trained.sha256,
    }


def _images(trained: Trained, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images of a split (a seeded random choice), as one CPU batch, and their labels."""
    cfg = trained.cfg
    loader = build_eval_loader(cfg.data, cfg.seed, torch.device("cpu"), split, sample=count)
    images, labels = zip(*[(x.cpu(), y.cpu()) for x, y in loader], strict=True)
    return torch.cat(images).contiguous(), torch.cat(labels)


def _batches(trained: Trained, split: str, count: int | None) -> Any:
    cfg = trained.cfg
    loader = build_eval_loader(cfg.data, cfg.seed, torch.device("cpu"), split, sample=count)
    for images, labels in loader:
        yield images.cpu().contiguous().numpy(), labels.cpu().numpy()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> int:
    """torch.export-based ONNX export where this torch has it (2.5+), else the TorchScript one;
    the batch dimension dynamic, the weights inside the one file. Option-A shortcuts are
    written as the 1x1 convs they equal (deploy.fold.pad_shortcuts_as_convs): returns how many."""
    model, shortcuts = pad_shortcuts_as_convs(model, example)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        from torch.export import Dim

        torch.onnx.export(
            model, (example,), str(path), dynamo=True, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_shapes=({0: Dim("batch")},), external_data=False,
            verbose=False,
        )  # fmt: skip
        return shortcuts
    torch.onnx.export(
        model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=17,
    )  # fmt: skip
    return shortcuts


def onnx_session(path: Path, spin: bool = True, optimized: Path | None = None) -> Any:
    """An ONNX Runtime CPU session; with `optimized`, the graph after ONNX Runtime's
    device-independent fusions (Conv+BN, Conv+ReLU -> FusedConv, ...) is written there.
    spin=False stops its threads from busy-waiting between runs (they would take the CPU from
    anything running beside them, such as PyTorch in a side-by-side benchmark)."""
    ort = require("onnxruntime", "export.format=onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """The exporters and ONNX Runtime's quantization log every pass at INFO (a line per
    de-duplicated initializer): warnings and errors only."""
    names = ("onnx_ir", "onnxscript", "onnxruntime", "torch.onnx", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    # ONNX Runtime's quantization also warns through the root logger, once per BatchNorm left in
    # a pre-activation net ("Axis 1 is out-of-range for weight ..."): it keeps those layers in
    # float, as it should.
    root = logging.getLogger()
    root.addFilter(_drop_batchnorm_axis_warnings)
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(_drop_batchnorm_axis_warnings)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _drop_batchnorm_axis_warnings(record: logging.LogRecord) -> bool:
    return not ("is out-of-range for weight" in record.getMessage() and "onnxruntime"
                in record.pathname)  # fmt: skip


def _write_onnx(folded, meta, example, tmp: Path) -> dict[str, Any]:
    onnx = require("onnx", "export.format=onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on their own internals
        shortcuts = export_onnx(folded, example, tmp)
    model = onnx.load(str(tmp))
    model.metadata_props.add(key="resnet_train", value=json.dumps(meta))
    for key in ("class_names", "mean", "std", "image_size"):
        model.metadata_props.add(key=key, value=json.dumps(meta[key]))
    onnx.save(model, str(tmp))
    # What ONNX Runtime makes of it: the Conv+ReLU pairs it fuses.
    optimized = tmp.with_name(tmp.name + ".optimized")
    try:
        onnx_session(tmp, optimized=optimized)
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    finally:
        optimized.unlink(missing_ok=True)
    return {"onnx_runtime_nodes": len(ops), "fused_conv": ops.count("FusedConv"),
            "conv": ops.count("Conv"), "shortcuts_as_convs": shortcuts}  # fmt: skip


def _run_file(fmt: str, path: Path, images: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        return onnx_session(path).run(None, {INPUT: images.numpy()})[0]
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return program(images).numpy()


def _write_pt2(folded, meta, example, tmp: Path) -> dict[str, Any]:
    from torch.export import Dim

    batch = Dim("batch")
    with torch.no_grad():
        program = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp), extra_files={"resnet_train.json": json.dumps(meta)})
    return {}


def onnx_accuracies(paths: list[Path], trained: Trained, split: str) -> tuple[list[float], int]:
    """The top-1 (%) of each ONNX model on a split, read once for all of them; and its size."""
    sessions = [onnx_session(path) for path in paths]
    correct, seen = [0] * len(paths), 0
    for images, labels in _batches(trained, split, None):
        for i, session in enumerate(sessions):
            correct[i] += int((session.run(None, {INPUT: images})[0].argmax(1) == labels).sum())
        seen += len(labels)
    return [100 * c / seen for c in correct], seen


def run_export(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Fold, export, check (and with export.quantize=int8, quantize and compare); write the
    files and export.json into run_dir."""
    with quiet_exporters():
        return _export(cfg, run_dir, overrides)


def _export(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    ex = cfg.export
    if ex.format == "onnx":
        require("onnx", "export.format=onnx")
        require("onnxruntime", "export.format=onnx")
    trained = load_trained(cfg, overrides, fake_quant=False)
    trained.check_data_classes()
    cfg = trained.cfg
    model = trained.model.to("cpu", memory_format=torch.contiguous_format).float().eval()
    folded, report = fold_batchnorm(model)
    log.info("%s", report.describe())
    names = trained.class_names()
    meta = metadata(trained, names)
    images, labels = _images(trained, "test", ex.check_images)
    if len(images) == 1:  # the example fixes no batch size: give it two
        images, labels = images.repeat(2, 1, 1, 1), labels.repeat(2)
    with torch.no_grad():
        want = model(images)
        fold_error = relative_error(folded(images), want)

    if len(images) < ex.check_images:
        log.info("export.check_images=%d: the test split has %d images; all are used",
                 ex.check_images, len(images))  # fmt: skip

    # Every file is written under a temporary name and put in place only when all of them are
    # written and checked (export.json last): a failed or interrupted export leaves none.
    final = run_dir / f"model.{ex.format}"
    with Staging(run_dir) as stage:
        tmp = stage.file(final.name)
        if ex.format == "onnx":
            graph = _write_onnx(folded, meta, images[:2], tmp)
        else:
            graph = _write_pt2(folded, meta, images[:2], tmp)
        errors = {
            len(images): relative_error(_run_file(ex.format, tmp, images), want),
            1: relative_error(_run_file(ex.format, tmp, images[:1]), want[:1]),
        }
        worst = max(errors.values())
        if not worst <= ex.check_tolerance:
            raise ExportCheckError(
                f"the exported {ex.format} model's logits differ from PyTorch's on "
                f"{len(images)} test images: relative error {worst:.2e} > "
                f"export.check_tolerance={ex.check_tolerance:g}; nothing written"
            )
        runtime = "ONNX Runtime" if ex.format == "onnx" else "torch.export.load"
        log.info(
            "%s: %s gives PyTorch's logits on %d test images within a relative error of %.1e "
            "(batch %d) and %.1e (batch 1), tolerance %.0e",
            final.name, runtime, len(images), errors[len(images)], len(images), errors[1],
            ex.check_tolerance,
        )  # fmt: skip
        if graph.get("shortcuts_as_convs"):
            log.info("%s writes the %d zero-padding shortcuts (option A) that subsample as the "
                     "1x1 convs with fixed 0/1 weights they equal", final.name,
                     graph["shortcuts_as_convs"])  # fmt: skip
        if graph.get("fused_conv"):
            log.info("ONNX Runtime fuses %d Conv+ReLU pairs into FusedConv (%d nodes after its "
                     "optimisation)", graph["fused_conv"], graph["onnx_runtime_nodes"])  # fmt: skip
        result: dict[str, Any] = {
            "format": ex.format,
            "file": str(final),
            "bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
            "fold": {**report.__dict__, "relative_error": fold_error},
            "check": {
                "images": len(images),
                "relative_error": {str(k): v for k, v in errors.items()},
                "tolerance": ex.check_tolerance,
                "runtime": runtime,
            },
            "graph": graph,
            "metadata": meta,
        }
        if ex.quantize == "int8":
            int8 = stage.file("model.int8.onnx")
            result["int8"] = _export_int8(trained, tmp, int8, images)
            result["int8"]["file"] = str(run_dir / "model.int8.onnx")
        write_json(stage.file("export.json"), result)
        written = stage.commit()  # export.json last: the record of a whole export
    log.info("wrote %s", ", ".join(f"{p} ({p.stat().st_size / 1e6:.2f} MB)" for p in written))
    return result


def _export_int8(trained: Trained, fp32: Path, out: Path, images: torch.Tensor) -> dict:
    ex, split = trained.cfg.export, trained.cfg.eval.split
    calibrated = 0

    def calibration() -> Iterator[np.ndarray]:
        nonlocal calibrated
        for x, _ in _batches(trained, "train", ex.calibration_images):
            calibrated += len(x)
            yield x

    quantize_int8(fp32, out, calibration(), INPUT)
    if calibrated < ex.calibration_images:
        log.info("export.calibration_images=%d: the training split has %d images; all are used",
                 ex.calibration_images, calibrated)  # fmt: skip
    fp32_logits = onnx_session(fp32).run(None, {INPUT: images.numpy()})[0]
    int8_logits = onnx_session(out).run(None, {INPUT: images.numpy()})[0]
    agreement = 100 * float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean())
    (fp32_top1, int8_top1), n = onnx_accuracies([fp32, out], trained, split)
    log.info(
        "model.int8.onnx (%.2f MB): int8 weights and activations, calibrated on %d training "
        "images; on %s (%d images) top-1 %.2f%% against fp32's %.2f%% (%+.2f points); on the %d "
        "check images it predicts fp32's class for %.1f%%",
        out.stat().st_size / 1e6, calibrated, split, n, int8_top1, fp32_top1,
        int8_top1 - fp32_top1, len(images), agreement,
    )  # fmt: skip
    if fp32_top1 - int8_top1 > 1.0:
        log.warning(
            "int8 loses %.2f points of top-1: fine-tune with quantization-aware training "
            "(trainer.qat=true model.weights=%s, a few epochs at a low rate) and export that",
            fp32_top1 - int8_top1, trained.weights.path,
        )  # fmt: skip
    return {
        "bytes": out.stat().st_size,
        "sha256": file_sha256(out),
        "calibration_images": calibrated,
        "split": split,
        "images": n,
        "fp32_top1": fp32_top1,
        "int8_top1": int8_top1,
        "top1_change": int8_top1 - fp32_top1,
        "check_agreement": agreement,
    }
