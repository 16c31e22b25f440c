"""int8 post-training static quantization with ONNX Runtime.

QDQ format, weights per output channel as symmetric int8, activations per tensor as uint8 with
ranges from min/max calibration on training images. uint8 activations, not int8: on the x86
CPUs measured here ONNX Runtime's int8 kernels take u8 x s8 products (VNNI/AMX); with s8
activations a ResNet-20 ran slower than in fp32.

The stem conv, the one that reads the image, stays in float. Quantized, it cost a CIFAR-10
ResNet-20 3.95 points of top-1 on this CPU (79.56% -> 75.61% on the 10,000 test images), and
left in float, none (79.3% against fp32's 79.2% on 3,000 of them; 7-bit weights everywhere,
ONNX Runtime's reduce_range, gave 79.0%). Its input is the one full-range uint8 tensor of the
network (every later one follows a ReLU), where the int16 pair sums of u8 x s8 kernels can
saturate; it holds about 1% of a CIFAR ResNet's multiply-adds, so the speed-up is kept.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from resnet_train.deploy.source import require


def quantize_int8(
    fp32_path: Path, out_path: Path, batches: Iterable[np.ndarray], input_name: str
) -> None:
    """Write the int8 model of the ONNX model at fp32_path to out_path, calibrated on `batches`
    (float32 NCHW arrays, already normalised); the model's metadata is carried over."""
    onnx = require("onnx", "export.quantize=int8")
    quantization = require("onnxruntime.quantization", "export.quantize=int8")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    source = onnx.load(str(fp32_path))
    stem = [n.name for n in source.graph.node if n.op_type == "Conv" and input_name in n.input]
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantized = Path(tmp) / "int8.onnx"
        quantization.quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            weight_type=quantization.QuantType.QInt8,
            activation_type=quantization.QuantType.QUInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            nodes_to_exclude=stem,
        )
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        model.metadata_props.extend(source.metadata_props)
        onnx.save(model, str(quantized))
        os.replace(quantized, out_path)
