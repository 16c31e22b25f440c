"""int8 post-training static quantization with ONNX Runtime.

QDQ format, weights per output channel as symmetric int8, activations per tensor as uint8 with
ranges from min/max calibration on training images. uint8 activations, not int8: on the x86
CPUs measured here ONNX Runtime's int8 kernels take u8 x s8 products (VNNI/AMX); with s8
activations a ResNet-20 ran slower than in fp32.

The stem conv, the one that reads the image, gets 7-bit weights ([-64, 64], ONNX Runtime's
reduce_range) and the other layers 8-bit. Its input is the one full-range uint8 tensor of the
network (every later one follows a ReLU), and CPUs without VNNI (AVX2) multiply u8 x s8 in pairs
summed to int16, which saturate at 2 x 255 x 127 > 32767; with 7-bit weights they cannot
(2 x 255 x 64 <= 32767). A CIFAR-10 ResNet-20 on its 10,000 test images on an AVX2 CPU: fp32
79.56%, stem at 8 bits 75.71%, stem left in float 79.64%, stem at 7 bits 79.66%. Left in float,
the stem also cut the int8 graph's NHWC chain (a Transpose on either side of each block of the
first stage): quantized, the int8 ResNet-20 ran in 21.2 ms per batch of 64 against 23.8 ms.
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
    # named so that a killed export's leftover is recognised (deploy.staging.remove_leftovers)
    scratch_name = f".quantize.{os.getpid()}.tmp"
    scratch = tempfile.TemporaryDirectory(prefix=scratch_name, dir=out_path.parent)
    with scratch as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        graph = onnx.load(str(prepared)).graph
        stem_weights = {node.input[1] for node in graph.node
                        if node.op_type == "Conv" and input_name in node.input}  # fmt: skip
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
            extra_options={
                "TensorQuantOverrides": {
                    name: [{"axis": 0, "reduce_range": True}] for name in stem_weights
                }
            },
        )
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        model.metadata_props.extend(source.metadata_props)
        onnx.save(model, str(quantized))
        os.replace(quantized, out_path)
