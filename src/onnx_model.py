"""The shippable model: one ONNX file that takes what a deployer has and says what it is.

Input `image`: uint8 RGB, N x H x W x 3 (NHWC, as PIL, numpy and OpenCV hold pictures), already
resized (shorter side to 256/224 of the size) and center-cropped to the model's size, as
`src.inference.ImageFiles` does. Normalisation is inside the graph; output `probabilities`
(N x classes, softmax). The metadata says all of it: class names, size, layout, mean/std, arch,
and the sha256 of the checkpoint it was exported from (so a stale file is noticed).
"""
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from src.common import UserError, atomic_path, first_line
from src.images import file_digest
from src.runtime import cpu_count

LAYOUT = "NHWC"
OPSET = 17


class ShippedModel(torch.nn.Module):
    """uint8 NHWC pixels -> softmax probabilities, normalisation included (fp32 throughout)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", 1 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255))

    def forward(self, image):
        x = image.permute(0, 3, 1, 2).float()
        return torch.softmax(self.model((x - self.shift) * self.scale), 1)


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
    """Write `model` (fp32, eval mode, on the CPU) as the ONNX file described above, dynamic batch.

    The TorchScript exporter (dynamo=False): it handles every torchvision classifier here and
    needs no onnxscript; it warns that it is deprecated, which says nothing about this graph."""
    shipped = ShippedModel(model.float().eval(), ckpt["mean"], ckpt["std"]).eval()
    size = ckpt["image_size"]
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(shipped, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
        tmp.chmod(0o644)
    set_metadata(path, metadata(ckpt, checkpoint_path))


class Batches:
    """onnxruntime's CalibrationDataReader protocol (get_next) over a list of NHWC uint8 batches."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}


def quantize_int8(fp32_path, int8_path, calibration_batches):
    """Static int8 quantisation (QDQ, per-channel weights, uint8 activations) of the fp32 model,
    its activation ranges calibrated on `calibration_batches` (NHWC uint8 training images).
    The softmax stays fp32 (only convs and the classifier are quantised): probabilities keep
    their resolution."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch, atomic_path(int8_path) as tmp:
        pre = Path(scratch) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))  # shapes and folded constants, as the quantiser wants
        quantize_static(str(pre), str(tmp), Batches(calibration_batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool",
                                              "GlobalAveragePool", "Flatten"])
        tmp.chmod(0o644)
    # quantize_static drops the fp32 model's metadata; the int8 file carries the same.
    set_metadata(int8_path, {p.key: p.value for p in onnx.load(str(fp32_path)).metadata_props})


class OnnxClassifier:
    """An exported model under onnxruntime on the CPU, with its metadata read back."""

    def __init__(self, path, threads=None):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} not found: export the model first (`dvc repro export`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_count()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"{path} is not a loadable ONNX model: {first_line(e)}") from None
        self.meta = self.session.get_modelmeta().custom_metadata_map
        if self.meta.get("layout") != LAYOUT or "class_names" not in self.meta:
            raise UserError(f"{path} was not exported by `src.export` (no class names or {LAYOUT} layout "
                            f"in its metadata); export it with `dvc repro export`")
        self.path = path
        self.class_names = json.loads(self.meta["class_names"])
        self.image_size = int(self.meta["image_size"])

    def matches(self, checkpoint_path):
        """Whether this file was exported from exactly that checkpoint."""
        return self.meta.get("checkpoint_sha256") == file_digest(checkpoint_path)

    def probabilities(self, images):
        """N x classes float32 probabilities of an N x H x W x 3 uint8 batch."""
        return self.session.run(None, {"image": np.ascontiguousarray(images, dtype=np.uint8)})[0]


def classify_files_onnx(classifier, paths, batch_size, workers="auto", desc="predict"):
    """Probabilities (one row per file, in order) and per-file errors ("" when fine), as
    `src.inference.classify_files` gives logits: the same decoding, resizing and cropping."""
    from src.inference import ImageFiles, image_batches

    files = paths if isinstance(paths, ImageFiles) else ImageFiles(paths, classifier.image_size)
    probs, errors = [np.empty((0, len(classifier.class_names)), np.float32)], []
    for images, batch_errors in image_batches(files, batch_size, workers, desc=desc):
        # The decoders fill N x H x W x C and hand it over permuted to N x C x H x W: permuted
        # back it is the NHWC the model takes, with no copy.
        probs.append(classifier.probabilities(images.permute(0, 2, 3, 1).numpy()))
        errors += batch_errors
    return np.concatenate(probs), errors
