"""The MLflow model that takes images: `image_model` in each training's run, logged by `export`.

Input: a DataFrame column `image` of base64-encoded image files (JPEG, PNG, WEBP, BMP, GIF, TIFF,
PPM), or raw image bytes where the caller passes bytes. Output, one row per input: class,
probability, top_k_classes, top_k_probabilities, error. An input that can't be used gets an
error row (class "", probability 0, the reason in `error`), never an exception, so one bad image
in a request does not fail the others.

Limits, from the server's environment when it starts (README: Serving):
- RESNET_TL_SERVE_MAX_ROWS: rows per request (more: the request is refused, HTTP 400);
- RESNET_TL_SERVE_MAX_BYTES: bytes per image (more: an error row, nothing decoded);
- RESNET_TL_SERVE_MAX_PIXELS: pixels per image, read from its header (more: an error row);
- RESNET_TL_SERVE_FILES: folders (separated by `os.pathsep`) whose image files rows may name by
  path. Unset (the default), no row makes the server touch its disk. Set, a path is resolved
  inside them (links leaving them refused) and anything else, missing, outside or unreadable,
  gets one and the same error.
Rows are decoded and classified CHUNK at a time, never as one batch of the whole request.

Inside: the ONNX model under onnxruntime on the CPU (`src.shipping.onnx_runtime`), so it loads
anywhere, GPU or not, with no device flag; decoding, resizing and cropping are this project's
own (`src.data.image_files`), packaged with the model as code, so it needs no checkout. Neither imports
torch: the model's environment (`requirements`) has none.
"""
import base64
import binascii
import io
import logging
import os
import shutil
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from src.core.errors import UserError
from src.core.process import cpu_count
from src.data.image_files import EvalPixels
from src.data.images import PixelBudget

TOP_K = 5
NAME = "image_model"
COLUMNS = ["class", "probability", "top_k_classes", "top_k_probabilities", "error"]
CHUNK = 16  # rows decoded and run through the model at a time: memory stays flat whatever the request
MAX_ROWS, MAX_BYTES, MAX_PIXELS, FILES = ("RESNET_TL_SERVE_MAX_ROWS", "RESNET_TL_SERVE_MAX_BYTES",
                                          "RESNET_TL_SERVE_MAX_PIXELS", "RESNET_TL_SERVE_FILES")
# 64 rows a request; 20 MB an image (a 50 Mpx phone JPEG); 50 Mpx an image: a 48 or 50 MP phone's
# full-resolution photo (phones with bigger sensors save 12-16 Mpx unless told otherwise).
DEFAULTS = {MAX_ROWS: 64, MAX_BYTES: 20_000_000, MAX_PIXELS: 50_000_000}
NOT_BASE64 = "not base64-encoded image bytes (this server reads no files: send each image's bytes, base64-encoded)"
# One message for a path that is missing, outside the allowed folders, a link out of them, not a
# regular file or unreadable: the answer tells a client nothing about the server's disk.
NOT_BASE64_OR_ALLOWED_FILE = "neither base64-encoded image bytes nor an image file this server may read"
# Models-from-code: the logged model is this file plus the packaged src/, no pickled object.
MODEL_CODE = """import mlflow
from src.shipping.serving import ImageClassifier
mlflow.models.set_model(ImageClassifier())
"""
log = logging.getLogger(__name__)


def limit(name, environ=os.environ):
    """An integer limit from the environment (or its default); a bad value stops the server at start."""
    value = environ.get(name, "").strip()
    if not value:
        return DEFAULTS[name]
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{name}={value!r} is not allowed; use a whole number >= 1 (default {DEFAULTS[name]})")
    return int(value)


def allowed_folders(environ=os.environ):
    """The folders rows may name files in, resolved (links followed once, here); none when unset."""
    folders = []
    for entry in filter(None, (e.strip() for e in environ.get(FILES, "").split(os.pathsep))):
        folder = os.path.realpath(entry)
        if not os.path.isdir(folder):
            raise UserError(f"{FILES}: {entry} is not a folder; give existing folders separated by {os.pathsep!r}")
        folders.append(folder)
    return folders


def inside(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_allowed_file(value, folders, max_bytes):
    """(bytes, "") of the regular file `value` names inside one of `folders`, (None, why) for one
    over max_bytes, or (None, None) for anything else. A path that leaves the folders as written
    (`../`, another absolute path) is never looked up; one that leaves them through a link is
    resolved but never opened; nothing but a regular file is opened, and without blocking."""
    if "\0" in value or len(value) > 4096:
        return None, None
    for folder in folders:
        candidate = os.path.normpath(os.path.join(folder, value))  # an absolute value replaces the folder
        if not inside(candidate, folder):
            continue
        real = os.path.realpath(candidate)
        if not inside(real, folder):
            continue
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                continue
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the check
                continue
            if size > max_bytes:
                return None, too_big(size, max_bytes)
            return f.read(max_bytes + 1), ""
    return None, None


def b64decode(value):
    """Strict base64, also as wrapped in lines (`base64 photo.jpg`, MIME, Spark's base64())."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        newlines = b"\r\n" if isinstance(value, (bytes, bytearray)) else "\r\n"
        if newlines[-1:] not in value:
            raise
        stripped = bytes(value).translate(None, b"\r\n") if isinstance(value, (bytes, bytearray)) \
            else value.translate({13: None, 10: None})
        return base64.b64decode(stripped, validate=True)


def too_big(size, max_bytes):
    return (f"image of {size:,} bytes is over this server's limit of {max_bytes:,} bytes per image "
            f"(raise it with {MAX_BYTES} where the server starts)")


def base64_length(n_bytes):
    return 4 * ((n_bytes + 2) // 3)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def __init__(self, environ=os.environ):
        self.configure(environ)

    def load_context(self, context):
        from src.shipping.onnx_runtime import OnnxClassifier
        self.configure()
        self.model = OnnxClassifier(context.artifacts["onnx"])

    def configure(self, environ=os.environ):
        """The limits and allowed folders, read once, when the server starts."""
        self.max_rows, self.max_bytes = limit(MAX_ROWS, environ), limit(MAX_BYTES, environ)
        self.budget = PixelBudget(limit(MAX_PIXELS, environ), f"raise it with {MAX_PIXELS} where the server starts")
        self.folders = allowed_folders(environ)

    def image_bytes(self, value):
        """(the image's bytes, "") for one input value, or (None, why it is not an image)."""
        if isinstance(value, (bytes, bytearray)):  # raw bytes, or base64 of them as bytes
            if len(value) > base64_length(self.max_bytes):
                return None, too_big(len(value), self.max_bytes)
            try:
                data = b64decode(value)
            except (binascii.Error, ValueError):
                data = bytes(value)  # any real image has bytes outside base64's alphabet
        elif isinstance(value, str) and value.strip():
            value = value.strip()
            if len(value) > base64_length(self.max_bytes):
                return None, too_big(len(value) * 3 // 4, self.max_bytes)
            if self.folders:
                data, error = read_allowed_file(value, self.folders, self.max_bytes)
                if data is not None or error:
                    return data, error
            try:
                data = b64decode(value)
            except (binascii.Error, ValueError):
                return None, NOT_BASE64_OR_ALLOWED_FILE if self.folders else NOT_BASE64
        else:
            return None, "empty input: give base64-encoded image bytes"
        if len(data) > self.max_bytes:
            return None, too_big(len(data), self.max_bytes)
        return data, ""

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """One row per input; a request over the row limit is refused whole (HTTP 400, no traceback).
        (The hint tells MLflow there is no schema to infer from it: the logged example gives the signature.)"""
        column = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
        if len(column) > self.max_rows:
            raise MlflowException(
                f"{len(column)} rows in one request; this server takes at most {self.max_rows}: send them in "
                f"several requests (or raise {MAX_ROWS} where the server starts)", INVALID_PARAMETER_VALUE)
        try:
            values = column.tolist()
            return pd.DataFrame([row for start in range(0, len(values), CHUNK)
                                 for row in self.classify(values[start:start + CHUNK])], columns=COLUMNS)
        except Exception:  # a bug of ours, not the client's input: the trace goes to the server's log only
            log.exception("image_model failed")
            raise MlflowException("internal error while classifying the request (see the server's log)",
                                  INTERNAL_ERROR) from None

    def classify(self, values):
        """Output rows of one chunk of input values: decoded by threads, then one model run."""
        inputs = [self.image_bytes(v) for v in values]
        files = EvalPixels([data for data, _ in inputs], self.model.image_size, self.budget)
        todo = [i for i, (_, error) in enumerate(inputs) if not error]
        with ThreadPoolExecutor(min(cpu_count(), CHUNK)) as pool:
            decoded = dict(zip(todo, pool.map(files.pixels, todo)))
        errors = [decoded[i][1] if i in decoded else error for i, (_, error) in enumerate(inputs)]
        good = [i for i, error in enumerate(errors) if not error]
        probs = dict(zip(good, self.model.probabilities(np.stack([decoded[i][0] for i in good])))) if good else {}
        names, k = self.model.class_names, min(TOP_K, len(self.model.class_names))
        rows = []
        for i, error in enumerate(errors):
            if error:
                rows.append(["", 0.0, [], [], error])
                continue
            top = np.argsort(-probs[i], kind="stable")[:k]
            p = [float(probs[i][j]) for j in top]
            rows.append([names[top[0]], p[0], [names[j] for j in top], p, ""])
        return rows


def example_input(path, image_size):
    """One held-out image as the model takes it over REST: a small base64 JPEG of its crop."""
    from PIL import Image

    pixels, _ = EvalPixels([path], image_size).pixels(0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def requirements():
    """What the served model runs: no torch, no torchvision (src.data.image_files and
    src.shipping.onnx_runtime need neither)."""
    from importlib.metadata import version
    return [f"{name}=={version(name).split('+')[0]}" for name in
            ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", "simplejpeg")]


def log_image_model(params, run_id, onnx_path, example_image):
    """Log the pyfunc into the training's run (tagged `image_model_uri`) and, with
    `mlflow.register_model: NAME`, register it as NAME's next version; returns its URI, or None
    when the run is not in this store (weights fetched with `dvc pull` into a fresh clone)."""
    from mlflow.models import infer_signature

    from src.core import tracking
    from src.shipping.onnx_runtime import OnnxClassifier

    tracking.setup(params["mlflow"]["experiment"])
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        print(f"export: MLflow run {run_id} is not in {tracking.tracking_uri()}; image model not logged")
        return None
    model = ImageClassifier({})
    model.model = OnnxClassifier(onnx_path)
    example = example_input(example_image, model.model.image_size)
    signature = infer_signature(example, model.predict(None, example))
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        code = Path(tmp) / "src"  # the package, without caches, travels inside the model
        shutil.copytree(Path(__file__).parents[1], code, ignore=shutil.ignore_patterns("__pycache__"))
        (Path(tmp) / "image_model.py").write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(name=NAME, python_model=str(Path(tmp) / "image_model.py"),
                                       artifacts={"onnx": str(onnx_path)}, code_paths=[str(code)],
                                       signature=signature, input_example=example, pip_requirements=requirements(),
                                       registered_model_name=params["mlflow"]["register_model"])
        mlflow.set_tag("image_model_uri", info.model_uri)
    return info.model_uri
