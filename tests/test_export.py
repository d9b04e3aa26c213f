"""The export stage through real dvc, and what it ships: the ONNX files agree with PyTorch, the
MLflow image model classifies base64 JPEGs (and paths where allowed), and `mlflow models serve`
answers over REST (attacks on the server: test_serving.py)."""
import base64
import io
import json
import subprocess
import sys
import urllib.request

import mlflow
import onnx
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import env, free_port, run, stop_server, store_uri, wait_until_answers

CLASSES = ["circle", "cross", "square"]  # the exported project's, sorted


def jpeg_base64(path):
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.mark.slow
def test_export_json_onnx_metadata_and_the_registry_artifact(exported_project, tmp_path):
    project, test, _ = exported_project
    metrics = json.loads((project / "metrics/export.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == len(test) == 12
    assert metrics["onnx"]["top1_agreement"] == 1.0 and metrics["onnx"]["max_prob_diff"] <= 1e-4
    assert metrics["int8"]["top1_agreement"] >= 0.99
    meta = {p.key: p.value for p in onnx.load(str(project / "models/model.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES
    assert (meta["layout"], meta["image_size"], meta["arch"]) == ("NHWC", "40", "resnet18")  # the evaluation size
    ckpt = torch.load(project / "models/model.pt", weights_only=True)  # what export's agreement was measured on:
    assert (ckpt["image_size"], ckpt["train_image_size"]) == (40, 32) and ckpt["temperature"] != 1.0  # calibrated
    int8 = {p.key: p.value for p in onnx.load(str(project / "models/model.int8.onnx")).metadata_props}
    assert float(int8["top1_agreement_vs_fp32"]) == metrics["int8"]["top1_agreement"]
    run(["dvc", "artifacts", "get", str(project), "resnet-classifier", "-o", str(tmp_path / "got.onnx")], tmp_path)
    assert (tmp_path / "got.onnx").read_bytes() == (project / "models/model.onnx").read_bytes()


@pytest.mark.slow
def test_registered_image_model_classifies_base64_jpegs_and_allowed_paths_and_reports_bad_inputs(exported_project,
                                                                                                   monkeypatch):
    project, test, run_id = exported_project
    (version,) = mlflow.MlflowClient().search_model_versions("name='shapes'")
    assert version.run_id == run_id  # the image model (it answers base64 JPEGs below), not the raw graph
    monkeypatch.setenv("RESNET_TL_SERVE_FILES", str(project / "data"))  # read when the model loads
    model = mlflow.pyfunc.load_model("models:/shapes/1")  # with pickle refused (conftest): none needed
    images = [jpeg_base64(project / r["path"]) for r in test] + [str(project / r["path"]) for r in test]
    bad = ["not base64 at all!", base64.b64encode(b"plain text, not an image").decode(), str(project / "params.yaml")]
    out = model.predict(pd.DataFrame({"image": images + bad}))
    assert list(out.columns) == ["class", "probability", "top_k_classes", "top_k_probabilities", "error"]
    assert list(out["class"][:-3]) == [r["label"] for r in test] * 2
    assert (out["error"][:-3] == "").all() and all(len(k) == 3 for k in out["top_k_classes"][:-3])
    assert list(out["class"][-3:]) == ["", "", ""]
    assert "base64" in out["error"].iloc[-3] and "not an image" in out["error"].iloc[-2]
    assert out["error"].iloc[-1] == out["error"].iloc[-3]  # outside the allowed folder: as if no file were there
    raw = model.predict(pd.DataFrame({"image": [(project / test[0]["path"]).read_bytes()]}))  # raw bytes
    assert list(raw["class"]) == [test[0]["label"]] and list(raw["error"]) == [""]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_base64_jpeg_with_its_class(exported_project, tmp_path):
    project, test, run_id = exported_project
    port = free_port()
    # From an empty folder: the served model must not need this checkout's src/.
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/image_model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env={**env(), "MLFLOW_TRACKING_URI": store_uri(project)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until_answers(server, f"http://127.0.0.1:{port}/ping", "mlflow models serve")
        body = {"dataframe_split": {"columns": ["image"], "data": [[jpeg_base64(project / test[-1]["path"])],
                                                                   ["%%% not base64 %%%"]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            good, bad = json.load(r)["predictions"]
        assert good["class"] == test[-1]["label"] and good["error"] == ""
        assert bad["class"] == "" and "base64" in bad["error"]
    finally:
        stop_server(server)
