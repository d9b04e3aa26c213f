"""The shippable model: one ONNX file that takes what a deployer has and says what it is.

Input `image`: uint8 RGB, N x H x W x 3 (NHWC, as PIL, numpy and OpenCV hold pictures), already
resized (shorter side to 256/224 of the size) and center-cropped to the model's size, as
`src.data.image_files.EvalPixels` does. Normalisation is inside the graph; output `probabilities`
(N x classes, softmax). The metadata says all of it: class names, size, layout, mean/std, arch,
and the sha256 of the checkpoint it was exported from (so a stale file is noticed). Running it is
`src.shipping.onnx_runtime`'s (no torch there).
"""
import json
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.fx.experimental.optimization import fuse

from src.core.device import pixel_normalization
from src.core.files import atomic_path
from src.data.images import file_digest
from src.inference.rewrites import fold_normalization_for_uint8
from src.shipping.onnx_runtime import LAYOUT

OPSET = 17


class ShippedModel(torch.nn.Module):
    """uint8 NHWC pixels -> softmax probabilities. normalize=True: normalised in fp32 first, then
    `model` (the fp32 export); False: `model` takes the uint8 pixels itself (the int8 export's
    source, `pixel_model`)."""

    def __init__(self, model, mean, std, normalize=True):
        super().__init__()
        self.model, self.normalize = model, normalize
        scale, shift = pixel_normalization(mean, std)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, image):
        x = image.permute(0, 3, 1, 2)
        if self.normalize:
            x = x.float() * self.scale + self.shift
        return torch.softmax(self.model(x), 1)


def pixel_model(model, mean, std):
    """A copy of `model` that takes uint8 N x 3 x H x W pixels (BatchNorm folded, Normalize folded
    into a mean-padding first conv: `src.inference.rewrites.MeanPaddedPixelConv`), or None where the
    first layer is not a plain conv or torch.fx cannot trace the network."""
    try:
        graph = fuse(model)  # a traced copy; the caller's model keeps its layers
    except Exception:
        return None
    return graph if fold_normalization_for_uint8(graph, mean, std) else None


def metadata(ckpt, checkpoint_path):
    return {"class_names": json.dumps(ckpt["class_names"], ensure_ascii=False), "arch": ckpt["arch"],
            "image_size": str(ckpt["image_size"]), "layout": LAYOUT, "input": "uint8 RGB, resized and center-cropped",
            "mean": json.dumps(list(ckpt["mean"])), "std": json.dumps(list(ckpt["std"])),
            "output": "softmax probabilities", "checkpoint_sha256": file_digest(checkpoint_path)}


def set_metadata(path, props):
    """Add (or replace) metadata_props of an ONNX file, rewriting it atomically."""
    proto = onnx.load(str(path))
    kept = {p.key: p.value for p in proto.metadata_props}
    kept.update(props)
    del proto.metadata_props[:]
    for key, value in kept.items():
        proto.metadata_props.add(key=key, value=value)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def export_onnx(model, ckpt, checkpoint_path, path):
    """Write `model` (fp32, eval mode, on the CPU) as the ONNX file described above, dynamic batch."""
    write_onnx(ShippedModel(model.float().eval(), ckpt["mean"], ckpt["std"]), ckpt["image_size"], path)
    set_metadata(path, metadata(ckpt, checkpoint_path))


def write_onnx(shipped, size, path):
    """A ShippedModel as ONNX, dynamic batch. The TorchScript exporter (dynamo=False): it handles
    every torchvision classifier here and needs no onnxscript; it warns that it is deprecated,
    which says nothing about this graph."""
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(shipped.eval(), (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
        tmp.chmod(0o644)


class Batches:
    """onnxruntime's CalibrationDataReader protocol (get_next) over a list of NHWC uint8 batches."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}


def quantize_int8(model, ckpt, checkpoint_path, int8_path, calibration_batches):
    """Static int8 quantisation (QDQ, per-channel weights, uint8 activations) of `model`, its
    activation ranges calibrated on `calibration_batches` (NHWC uint8 training images); the same
    input, output and metadata as export_onnx's file. The softmax stays fp32 (only convs and the
    classifier are quantised): probabilities keep their resolution.

    Quantised is `pixel_model`'s graph, where the uint8 pixels go straight into the first conv
    (normalising in fp32 first was a large share of the int8 model's time: benchmarks/README.md);
    a network it cannot rewrite is quantised with the normalisation in the graph."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = model.float().eval()
    pixels_in = pixel_model(model, ckpt["mean"], ckpt["std"])
    shipped = ShippedModel(pixels_in or model, ckpt["mean"], ckpt["std"], normalize=pixels_in is None)
    with tempfile.TemporaryDirectory() as scratch, atomic_path(int8_path) as tmp:
        fp32, pre = Path(scratch) / "fp32.onnx", Path(scratch) / "pre.onnx"
        write_onnx(shipped, ckpt["image_size"], fp32)
        quant_pre_process(str(fp32), str(pre))  # shapes and folded constants, as the quantiser wants
        overrides = {}
        if pixels_in is not None:  # the first conv's input: the pixels, cast to float; their own int8 values
            first_conv = next(node for node in onnx.load(str(pre)).graph.node if node.op_type == "Conv")
            overrides[first_conv.input[0]] = [{"scale": np.array(1, np.float32), "zero_point": np.array(0, np.uint8)}]
        # 7-bit weights (reduce_range): without VNNI (AVX2-only CPUs) onnxruntime adds uint8 x int8
        # products in pairs in 16 bits, which 0-255 pixels times 8-bit weights overflow (2 * 255 *
        # 127 > 32767); with 7 bits the file gives the same numbers on every CPU it may be served on.
        quantize_static(str(pre), str(tmp), Batches(calibration_batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool",
                                              "GlobalAveragePool", "Flatten"],
                        extra_options={"TensorQuantOverrides": overrides})
        graph = onnx.load(str(tmp))
        drop_uint8_round_trips(graph.graph)
        onnx.save(graph, str(tmp))
        tmp.chmod(0o644)
    set_metadata(int8_path, metadata(ckpt, checkpoint_path))


def drop_uint8_round_trips(graph):
    """Remove each Cast(uint8 -> float) followed by QuantizeLinear(scale 1, zero point 0 as uint8):
    together they give back the same uint8 values, so the next node reads the Cast's input. Returns
    how many pairs went."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    users = Counter(name for node in graph.node for name in node.input)
    dropped = []
    for node in graph.node:
        cast = producer.get(node.input[0])
        if (node.op_type != "QuantizeLinear" or cast is None or cast.op_type != "Cast" or len(node.input) < 3
                or users[cast.output[0]] != 1
                or constants.get(node.input[1]) != 1 or constants.get(node.input[2]) != 0
                or constants[node.input[2]].dtype != np.uint8 or not casts_from_uint8(graph, cast)):
            continue
        for user in graph.node:
            user.input[:] = [cast.input[0] if name == node.output[0] else name for name in user.input]
        dropped += [node, cast]
    for node in dropped:
        graph.node.remove(node)
    return len(dropped) // 2


def casts_from_uint8(graph, cast):
    """Whether the Cast's input is a uint8 tensor (by the shapes and types recorded in the graph)."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info)}
    return types.get(cast.input[0]) == onnx.TensorProto.UINT8
