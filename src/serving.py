"""The MLflow model that takes images: `image_model` in each training's run, logged by `export`.

Input: a DataFrame column `image` of base64-encoded image files (JPEG, PNG, ...) or of paths
the server can read. Output, one row per input: class, probability, top_k_classes,
top_k_probabilities, error. An input that is neither a readable path nor base64 image bytes gets
an error row (class "", probability 0, the reason in `error`), never an exception, so one bad
image in a request does not fail the others.

Inside: the ONNX model (`src.onnx_model`) under onnxruntime on the CPU, so it loads anywhere,
GPU or not, with no device flag; decoding, resizing and cropping are this project's own
(`src.inference.classify.ImageFiles`), packaged with the model as code, so it needs no checkout.
"""
import base64
import binascii
import io
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

TOP_K = 5
NAME = "image_model"
COLUMNS = ["class", "probability", "top_k_classes", "top_k_probabilities", "error"]
# Models-from-code: the logged model is this file plus the packaged src/, no pickled object.
MODEL_CODE = """import mlflow
from src.serving import ImageClassifier
mlflow.models.set_model(ImageClassifier())
"""


def image_file(value, folder, i):
    """(a path to decode, "") for one input value, or (None, why it is not an image)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not value.strip():
        return None, "empty input: give base64-encoded image bytes or a file path"
    value = value.strip()
    if len(value) < 4096 and Path(value).is_file():
        return Path(value), ""
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None, "neither a readable file path nor valid base64 (give base64-encoded image bytes)"
    path = Path(folder) / f"{i}.img"
    path.write_bytes(data)
    return path, ""


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from src.onnx_model import OnnxClassifier
        self.model = OnnxClassifier(context.artifacts["onnx"])

    def predict(self, context, model_input, params=None):
        from src.inference.classify import ImageFiles

        column = model_input["image"] if "image" in model_input else model_input.iloc[:, 0]
        names = self.model.class_names
        k = min(TOP_K, len(names))
        rows = []
        with tempfile.TemporaryDirectory() as folder:
            inputs = [image_file(v, folder, i) for i, v in enumerate(column.tolist())]
            files = ImageFiles([p or Path(folder) / "missing" for p, _ in inputs], self.model.image_size)
            decoded = [(files.pixels(i) if not err else (None, err)) for i, (_, err) in enumerate(inputs)]
        good = [i for i, (_, err) in enumerate(decoded) if not err]
        probs = self.model.probabilities(np.stack([decoded[i][0] for i in good])) if good else []
        by_input = dict(zip(good, probs))
        for i, (_, err) in enumerate(decoded):
            if err:
                rows.append(["", 0.0, [], [], err])
                continue
            top = np.argsort(-by_input[i], kind="stable")[:k]
            p = [float(by_input[i][j]) for j in top]
            rows.append([names[top[0]], p[0], [names[j] for j in top], p, ""])
        return pd.DataFrame(rows, columns=COLUMNS)


def example_input(path, image_size):
    """One held-out image as the model takes it over REST: a small base64 JPEG of its crop."""
    from PIL import Image
    from src.inference.classify import ImageFiles

    pixels, _ = ImageFiles([path], image_size).pixels(0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})


def requirements():
    from importlib.metadata import version
    return [f"{name}=={version(name).split('+')[0]}" for name in
            ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", "simplejpeg", "torch", "torchvision")]


def log_image_model(params, run_id, onnx_path, example_image):
    """Log the pyfunc into the training's run (tagged `image_model_uri`) and, with
    `mlflow.register_model: NAME`, register it as NAME's next version; returns its URI, or None
    when the run is not in this store (weights fetched with `dvc pull` into a fresh clone)."""
    from mlflow.models import infer_signature
    from src import tracking
    from src.onnx_model import OnnxClassifier

    tracking.setup(params["mlflow"]["experiment"])
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        print(f"export: MLflow run {run_id} is not in {tracking.tracking_uri()}; image model not logged")
        return None
    model = ImageClassifier()
    model.model = OnnxClassifier(onnx_path)
    example = example_input(example_image, model.model.image_size)
    signature = infer_signature(example, model.predict(None, example))
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        code = Path(tmp) / "src"  # the package, without caches, travels inside the model
        shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
        (Path(tmp) / "image_model.py").write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(name=NAME, python_model=str(Path(tmp) / "image_model.py"),
                                       artifacts={"onnx": str(onnx_path)}, code_paths=[str(code)],
                                       signature=signature, input_example=example, pip_requirements=requirements(),
                                       registered_model_name=params["mlflow"]["register_model"])
        mlflow.set_tag("image_model_uri", info.model_uri)
    return info.model_uri
