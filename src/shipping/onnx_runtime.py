"""Running an exported model (`src.shipping.onnx_export` writes it) under onnxruntime on the CPU: no torch,
so the served model (`src.shipping.serving`) and `predict --backend onnx|int8` start in a fraction of a
second and need no torch in their environment."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from src.core.errors import UserError, first_line
from src.core.process import cpu_count, decoding_workers
from src.data.image_files import EvalPixels, pixel_batches, progress
from src.data.images import PILLOW_BUDGET, file_digest

LAYOUT = "NHWC"


class OnnxClassifier:
    """An exported model under onnxruntime on the CPU, with its metadata read back."""

    def __init__(self, path, threads=None):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path} not found: export the model first (`dvc repro export`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_count()
        # Idle onnxruntime threads spin after each run, taking the cores from the threads that
        # decode the next batch (as libgomp's do: src/core/process.py); asleep, they leave them free.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def classify_files_onnx(classifier, paths, *, batch_size, workers="auto", desc="predict", budget=PILLOW_BUDGET):
    """Probabilities (one row per file, in order) and per-file errors ("" when fine), as
    `src.inference.classify.classify_files` gives logits: the same decoding, resizing and cropping.
    Decoded by threads; by torch's DataLoader processes only where `src.core.process.decoding_workers` asks for them."""
    if decoding_workers(workers, len(paths), batch_size):
        from src.data.loaders import ImageFiles, image_batches
        files = paths if isinstance(paths, ImageFiles) else ImageFiles(paths, classifier.image_size, budget)
        # The decoders fill N x H x W x C and hand it over permuted to N x C x H x W: permuted
        # back it is the NHWC the model takes, with no copy.
        batches = ((images.permute(0, 2, 3, 1).numpy(), errors)
                   for images, errors in image_batches(files, batch_size, workers, desc=desc))
    else:
        files = paths if isinstance(paths, EvalPixels) else EvalPixels(paths, classifier.image_size, budget)
        batches = progress(pixel_batches(files, batch_size, cpu_count()), files, batch_size, desc)
    probs, errors = [np.empty((0, len(classifier.class_names)), np.float32)], []
    for images, batch_errors in batches:
        probs.append(classifier.probabilities(images))
        errors += batch_errors
    return np.concatenate(probs), errors
