"""The predict command line: every file gets a row, bad files get error rows, the rest are right."""
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from src.networks.checkpoint import load_trained_model, save_checkpoint
from src.networks.factory import build_model

from conftest import REPO, env, make_project, python, run, set_params

CLASSES = ["ant", "bee", "cat"]
BATCH = 4  # 9 images: two full batches and a partial one, through a decoding worker


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    project = make_project(root / "project", {"predict.precision": "fp32", "predict.workers": 1,
                                                       "predict.backend": "torch"})
    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES)).eval()
    save_checkpoint(root / "model.pt", {
        "arch": "resnet18", "num_classes": len(CLASSES), "class_names": CLASSES, "image_size": 32,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "model": model.state_dict()})
    rng = np.random.default_rng(0)
    images = root / "images"
    for i in range(9):
        folder = images / ("nested/deeper" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i}.{'jpg' if i % 2 else 'png'}")
    (images / "notes.txt").write_text("not an image, and not named like one: skipped in folders")
    return project, root / "model.pt", images



def test_a_resnet_checkpoint_loads_without_torchvision_or_torchs_compiler(checkpoint_and_images):
    """So `predict --backend torch` and export start seconds sooner: neither is imported for the
    ResNet family (the registry's archs and torch.compile import them when used)."""
    _, model_path, _ = checkpoint_and_images
    code = ("import sys; from src.networks.checkpoint import load_trained_model; "
            f"load_trained_model({str(model_path)!r}); "
            "print([m for m in ('torchvision', 'torch._dynamo') if m in sys.modules])")
    assert run([python(), "-c", code], REPO).stdout.strip() == "[]"

def reference(model_path, path):
    """The tutorial's way: one image, eval transform, fp32 softmax."""
    model, ckpt = load_trained_model(model_path)
    x = eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"])(Image.open(path).convert("RGB"))
    with torch.no_grad():
        return torch.softmax(model(x[None]), 1)[0]


def predict(project, *args, **variables):
    return run([python(), "-m", "src.predict", *map(str, args)], project, check=False, env={**env(), **variables})


def test_folder_gives_one_correct_row_per_image(checkpoint_and_images):
    project, model, images = checkpoint_and_images
    result = predict(project, images, "--model", model, "--batch-size", BATCH, "--top-k", 2)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected_files = sorted(p for p in images.rglob("img_*"))
    assert [r["file"] for r in rows] == [str(p) for p in expected_files]  # 9 rows, recursive, in order
    assert list(rows[0]) == ["file", "predicted", "probability", "class_2", "probability_2", "error"]
    for row, path in zip(rows, expected_files):
        probs = reference(model, path)
        top = probs.topk(2)
        assert [row["predicted"], row["class_2"]] == [CLASSES[i] for i in top.indices]
        assert float(row["probability"]) == pytest.approx(top.values[0].item(), abs=1e-5)
        assert float(row["probability_2"]) == pytest.approx(top.values[1].item(), abs=1e-5)
        assert row["error"] == ""


def test_unreadable_files_get_error_rows_and_the_rest_continue(checkpoint_and_images):
    project, model, images = checkpoint_and_images
    bad = images.parent / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    good = sorted(images.rglob("img_*"))
    inputs = [good[0], bad / "corrupt.jpg", *good[1:], images / "missing.png"]
    out = project / "out" / "predictions.json"
    result = predict(project, *inputs, "--model", model, "--batch-size", BATCH, "--output", out)
    assert result.returncode == 1
    assert "corrupt.jpg" in result.stderr and "missing.png" in result.stderr
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == [str(p) for p in inputs]
    errors = {r["file"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {str(bad / "corrupt.jpg"), str(images / "missing.png")}
    assert "no such file" in errors[str(images / "missing.png")]
    for row in rows:
        if row["error"]:
            assert row["predicted"] is None and row["top_k"] == []
            continue
        probs = reference(model, row["file"])
        assert len(row["top_k"]) == 3
        assert row["predicted"] == CLASSES[probs.argmax()]
        assert row["probability"] == pytest.approx(probs.max().item(), abs=1e-5)


def test_glob_and_picture(checkpoint_and_images):
    project, model, images = checkpoint_and_images
    picture = project / "picture.png"
    result = predict(project, f"{images}/**/*.jpg", "--model", model, "--format", "json", "--picture", picture)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in images.rglob("*.jpg"))
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.width > 200


def test_no_images_is_one_line_error(checkpoint_and_images):
    project, model, images = checkpoint_and_images
    empty = images.parent / "empty"
    empty.mkdir(exist_ok=True)
    result = predict(project, empty, "--model", model)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no image files" in result.stderr


@pytest.mark.slow
def test_compiled_model_gives_the_same_rows(checkpoint_and_images, tmp_path):
    from src.inference.classify import classify_files
    project, model_path, images = checkpoint_and_images
    # A fresh inductor cache: really compiled here, not fetched from an earlier run.
    fast = predict(project, images, "--model", model_path, "--batch-size", BATCH, "--compile", "true",
                   TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    assert fast.returncode == 0 and "torch.compile failed" not in fast.stderr, fast.stderr
    assert list((tmp_path / "cache").rglob("*.so")), "nothing was compiled"
    rows = list(csv.DictReader(io.StringIO(fast.stdout)))
    # The eager model in this process (as `--compile false` runs it), on the same files.
    model, ckpt = load_trained_model(model_path)
    logits, _ = classify_files(model, ckpt, [Path(row["file"]) for row in rows], torch.device("cpu"),
                               batch_size=BATCH, precision="fp32", workers=0)
    probabilities = torch.softmax(logits, 1)
    assert len(rows) == 9
    for row, p in zip(rows, probabilities, strict=True):
        assert row["predicted"] == CLASSES[int(p.argmax())]
        assert float(row["probability"]) == pytest.approx(float(p.max()), abs=1e-4)


def test_a_compiled_model_that_fails_only_warns_and_the_eager_model_classifies(checkpoint_and_images, monkeypatch,
                                                                               capsys):
    """No working C++ compiler (inductor's CPU backend needs one) surfaces when the compiled model
    first runs: a warning, then the eager model, whatever the failure."""
    import src.inference.classify as classify
    _, model_path, images = checkpoint_and_images
    model, ckpt = load_trained_model(model_path)
    paths = sorted(images.rglob("img_*"))
    eager, _ = classify.classify_files(model, ckpt, paths, torch.device("cpu"), batch_size=BATCH)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\n/nonexistent/c++: not found")
    monkeypatch.setattr(classify, "compiled", lambda *args: no_compiler)
    logits, errors = classify.classify_files(model, ckpt, paths, torch.device("cpu"), batch_size=BATCH,
                                             use_compile=True)
    # the same network, Normalize kept separate for the compiler: the same logits up to rounding
    assert torch.allclose(logits, eager, atol=1e-4) and not any(errors)
    warned = capsys.readouterr().err
    assert "warning: torch.compile failed (RuntimeError: InductorError: CppCompileError" in warned
    assert warned.count("warning") == 1  # once, then eager for the rest


@pytest.fixture(scope="module")
def checkpoint_with_onnx(checkpoint_and_images):
    """The checkpoint exported beside itself (model.onnx, model.int8.onnx), as the stage does."""
    from src.shipping.onnx_export import export_onnx, quantize_int8, set_metadata
    project, model_path, images = checkpoint_and_images
    model, ckpt = load_trained_model(model_path)
    export_onnx(model, ckpt, model_path, model_path.with_suffix(".onnx"))
    calibration = [np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in
                             sorted(images.rglob("img_*"))])]
    quantize_int8(model, ckpt, model_path, model_path.with_suffix(".int8.onnx"), calibration)
    set_metadata(model_path.with_suffix(".int8.onnx"), {"top1_agreement_vs_fp32": "1.0"})
    return checkpoint_and_images


def test_onnx_backends_give_the_torch_rows_and_keep_error_rows(checkpoint_with_onnx):
    project, model, images = checkpoint_with_onnx
    folder = images.parent / "with_bad"
    folder.mkdir(exist_ok=True)
    for p in sorted(images.rglob("img_*")):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    common = (folder, "--model", model, "--batch-size", BATCH)
    torch_rows = list(csv.DictReader(io.StringIO(predict(project, *common, "--backend", "torch").stdout)))
    for backend in ("onnx", "int8"):
        result = predict(project, *common, "--backend", backend)
        assert result.returncode == 1 and f"({backend})" in result.stderr, result.stderr
        rows = list(csv.DictReader(io.StringIO(result.stdout)))
        assert [r["file"] for r in rows] == [r["file"] for r in torch_rows] and len(rows) == 10
        assert [r["error"] != "" for r in rows] == [r["file"].endswith("broken.png") for r in rows]
        if backend == "onnx":  # fp32: the same classes and, to float rounding, probabilities
            assert [r["predicted"] for r in rows] == [r["predicted"] for r in torch_rows]
            for got, want in zip(rows, torch_rows):
                if not got["error"]:
                    assert float(got["probability"]) == pytest.approx(float(want["probability"]), abs=1e-4)
    # auto: int8 where export recorded >= 99% agreement, else torch
    assert "(int8)" in predict(project, *common, "--backend", "auto").stderr


def test_onnx_backends_never_import_torch_and_give_an_image_over_data_max_pixels_an_error_row(checkpoint_with_onnx):
    project, model, images = checkpoint_with_onnx
    big = images.parent / "big.png"
    Image.new("RGB", (60, 60), (250, 20, 20)).save(big)
    files = [images / "img_1.jpg", big]  # 40 x 31 px, resized to 47 x 37 for the model; 60 x 60 px
    # A budget between the two; decoded by threads (processes would be torch's DataLoader).
    set_params(project, {"data.max_pixels": 2000, "predict.workers": 0})
    try:
        for backend in ("onnx", "int8"):
            result = run([python(), "-X", "importtime", "-m", "src.predict", *map(str, files), "--model", str(model),
                          "--backend", backend], project, check=False)
            imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                        if line.startswith("import time:")}
            assert "numpy" in imported and not {m for m in imported if m.split(".")[0] in ("torch", "torchvision")}
            rows = list(csv.DictReader(io.StringIO(result.stdout)))
            assert result.returncode == 1 and [r["error"] == "" for r in rows] == [True, False], result.stderr
            assert "over the budget" in rows[1]["error"] and "data.max_pixels" in rows[1]["error"]
    finally:
        set_params(project, {"data.max_pixels": 120_000_000, "predict.workers": 1})


def test_auto_backend_runs_torch_when_int8_agreed_too_little(checkpoint_with_onnx, tmp_path):
    from src.shipping.onnx_export import set_metadata
    project, model, images = checkpoint_with_onnx
    for suffix in (".pt", ".onnx", ".int8.onnx"):
        (tmp_path / f"model{suffix}").write_bytes(model.with_suffix(suffix).read_bytes())
    set_metadata(tmp_path / "model.int8.onnx", {"top1_agreement_vs_fp32": "0.95"})
    result = predict(project, images, "--model", tmp_path / "model.pt", "--backend", "auto")
    assert result.returncode == 0 and "(torch)" in result.stderr, result.stderr


def test_onnx_backend_refuses_a_file_exported_from_another_checkpoint(checkpoint_with_onnx, tmp_path):
    project, model, images = checkpoint_with_onnx
    other = tmp_path / "model.pt"
    (tmp_path / "model.onnx").write_bytes(model.with_suffix(".onnx").read_bytes())
    torch.save(torch.load(model, weights_only=True) | {"note": "retrained"}, other)
    result = predict(project, images, "--model", other, "--backend", "onnx")
    assert result.returncode == 2 and "exported from another checkpoint" in result.stderr
    missing = predict(project, images, "--model", other, "--backend", "int8")
    assert missing.returncode == 2 and "dvc repro export" in missing.stderr


def test_int8_model_reads_the_pixels_straight_into_its_first_conv(checkpoint_with_onnx, tmp_path):
    """No normalising or casting before the first quantised conv; a network whose input is not
    a plain conv's alone keeps the fp32 normalisation in the graph and still classifies."""
    import onnx
    import torch.nn as nn

    from src.shipping.onnx_export import export_onnx, quantize_int8
    from src.shipping.onnx_runtime import OnnxClassifier
    _, model_path, _ = checkpoint_with_onnx
    ops = lambda path: {node.op_type for node in onnx.load(str(path)).graph.node}  # noqa: E731
    assert {"Cast", "Mul", "Add"} <= ops(model_path.with_suffix(".onnx"))
    assert not {"Cast", "Mul"} & ops(model_path.with_suffix(".int8.onnx"))

    class TwoUses(nn.Module):  # the input also feeds a mean: the normalisation can't fold
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) * 4 + x.mean((2, 3))

    torch.manual_seed(0)
    net = TwoUses().eval()
    ckpt = {"arch": "two_uses", "class_names": ["r", "g", "b"], "image_size": 16,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    pixels = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    export_onnx(net, ckpt, model_path, tmp_path / "two.onnx")
    quantize_int8(net, ckpt, model_path, tmp_path / "two.int8.onnx", [pixels])
    assert "Mul" in ops(tmp_path / "two.int8.onnx")
    want = OnnxClassifier(tmp_path / "two.onnx").probabilities(pixels)
    got = OnnxClassifier(tmp_path / "two.int8.onnx").probabilities(pixels)
    assert np.abs(got - want).max() < 0.02 and (got.argmax(1) == want.argmax(1)).mean() >= 0.75


def test_explain_writes_one_overlay_per_readable_image(checkpoint_and_images):
    project, model, images = checkpoint_and_images
    out = project / "explained"
    inputs = [*sorted(images.rglob("img_*.jpg")), images / "missing.png"]
    result = predict(project, *inputs, "--model", model, "--explain", out)
    assert result.returncode == 1 and "missing.png" in result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{p.stem}.gradcam.png" for p in inputs[:-1])
    for name in written:
        with Image.open(out / name) as img:
            assert img.size == (32, 32) and img.mode == "RGB"


def test_image_model_gives_error_rows_for_bad_inputs_and_the_onnx_classes_for_good_ones(checkpoint_with_onnx):
    import base64

    import pandas as pd

    from src.shipping.onnx_runtime import OnnxClassifier
    from src.shipping.serving import FILES, ImageClassifier
    project, model_path, images = checkpoint_with_onnx
    good = sorted(images.rglob("img_*"))[:4]
    inputs = [base64.b64encode(good[0].read_bytes()).decode(), str(good[1]), "####", "",
              base64.b64encode(b"GIF89a but broken").decode(),
              base64.encodebytes(good[2].read_bytes()).decode(),  # wrapped in lines, as `base64 photo.jpg`
              good[3].read_bytes()]  # raw bytes, as a caller in Python may pass them
    for environ in ({FILES: str(images)}, {}):  # file paths allowed under `images`, or none at all
        classifier = ImageClassifier(environ)
        classifier.model = OnnxClassifier(model_path.with_suffix(".onnx"))
        out = classifier.predict(None, pd.DataFrame({"image": inputs}))
        assert list(out["error"] != "") == [False, not environ, True, True, True, False, False]
        for i, path in ((0, good[0]), (1, good[1]), (5, good[2]), (6, good[3])):
            if out["error"][i] == "":
                assert out["class"][i] == CLASSES[reference(model_path, path).argmax()]
                assert out["top_k_classes"][i][0] == out["class"][i] and len(out["top_k_classes"][i]) == 3
        assert (out["class"][2:5] == "").all() and "base64" in out["error"][2]
