"""Stage `export`: the trained model as files a deployer can ship, each checked against PyTorch.

Writes
  models/model.onnx       fp32; uint8 NHWC RGB images (resized + cropped) in, probabilities
                          out, class names and preprocessing in its metadata (`src.shipping.onnx_export`)
  models/model.int8.onnx  int8 static quantisation (QDQ, per-channel), calibrated on
                          export.calibration_images training images, the same input and output:
                          predict's fastest path on a CPU, with or without native bf16
  metrics/export.json     on the held-out split (test, else val), decoded as predict decodes it:
                          onnxruntime against PyTorch fp32: top-1 agreement, max |probability
                          difference|; the same for the int8 model
and logs `image_model` into the training's MLflow run: a pyfunc that takes images (`src.shipping.serving`).
"""
import random

import numpy as np
import torch

from src.core import process
from src.core.errors import UserError
from src.core.files import write_json
from src.core.params import load_params
from src.core.paths import EXPORT_METRICS, MODEL, ONNX_INT8_MODEL, ONNX_MODEL
from src.core.process import run_stage
from src.data.loaders import ImageFiles
from src.data.manifest import check_same_classes, held_out_split, read_manifest
from src.inference.classify import classify_files
from src.networks.checkpoint import load_trained_model
from src.shipping import serving
from src.shipping.onnx_export import export_onnx, quantize_int8, set_metadata
from src.shipping.onnx_runtime import OnnxClassifier, classify_files_onnx

BATCH = 64
CALIBRATION_BATCH = 16


def calibration_batches(rows, image_size, n, seed):
    """Up to n training images (a seeded sample), decoded as predict decodes them, in NHWC batches."""
    paths = [r["path"] for r in rows if r["split"] == "train"]
    paths = random.Random(seed).sample(paths, min(n, len(paths)))
    files = ImageFiles(paths, image_size)
    pixels = [p for p, err in map(files.pixels, range(len(files))) if not err]
    if not pixels:
        raise UserError("no readable training images to calibrate the int8 model on; check data/manifest.csv")
    return [np.stack(pixels[i:i + CALIBRATION_BATCH]) for i in range(0, len(pixels), CALIBRATION_BATCH)]


def agreement(probs, reference):
    """Top-1 agreement and max |probability difference| of two N x classes arrays."""
    return {"top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
            "max_prob_diff": float(np.abs(probs - reference).max())}


def parity(paths, model, ckpt):
    """{"images", "onnx": {...}, "int8": {...}}: each ONNX file under onnxruntime against the torch
    predict path in fp32 (the same decoded pixels: `ImageFiles`)."""
    files = ImageFiles(paths, ckpt["image_size"])
    logits, errors = classify_files(model, ckpt, files, torch.device("cpu"), batch_size=BATCH, precision="fp32",
                                    workers=0, desc="export")
    bad = [(p, e) for p, e in zip(paths, errors) if e]
    if bad:
        raise UserError(f"{bad[0][0]}: {bad[0][1]} ({len(bad)} unreadable images); fix or remove them, "
                        f"then rerun `dvc repro`")
    reference = torch.softmax(logits, 1).numpy()
    result = {"images": len(paths)}
    for name, path in (("onnx", ONNX_MODEL), ("int8", ONNX_INT8_MODEL)):
        probs, _ = classify_files_onnx(OnnxClassifier(path), files, batch_size=BATCH, workers=0, desc="export")
        result[name] = agreement(probs, reference)
    return result


def main():
    process.start()
    params = load_params()
    model, ckpt = load_trained_model(MODEL)
    check_same_classes(ckpt["class_names"])
    rows = read_manifest()
    split = held_out_split(rows)
    paths = [r["path"] for r in rows if r["split"] == split]
    if not paths:
        raise UserError("the manifest has no test or val images to check the export on; set data.test > 0")
    export_onnx(model, ckpt, MODEL, ONNX_MODEL)
    quantize_int8(model, ckpt, MODEL, ONNX_INT8_MODEL, calibration_batches(
        rows, ckpt["image_size"], params["export"]["calibration_images"], params["seed"]))
    metrics = {"split": split, **parity(paths, model, ckpt)}
    # Predict's `auto` backend runs the int8 model only where it agrees well enough: it reads this.
    set_metadata(ONNX_INT8_MODEL, {"top1_agreement_vs_fp32": str(metrics["int8"]["top1_agreement"])})
    write_json(EXPORT_METRICS, metrics)
    if ckpt.get("mlflow_run_id"):
        serving.log_image_model(params, ckpt["mlflow_run_id"], ONNX_MODEL, paths[0])
    onnx, int8 = metrics["onnx"], metrics["int8"]
    print(f"export: {ONNX_MODEL} top-1 agreement {onnx['top1_agreement']:.4f}, max prob diff "
          f"{onnx['max_prob_diff']:.2e}; {ONNX_INT8_MODEL} agreement {int8['top1_agreement']:.4f} "
          f"on {len(paths)} {split} images -> {EXPORT_METRICS}")


if __name__ == "__main__":
    run_stage(main)
