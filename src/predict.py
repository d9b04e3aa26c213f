"""Stage `predict` (and a command line): classify images with the trained model.

    python -m src.predict                 # predict.input from params.yaml (default: the test split)
    python -m src.predict photo.jpg dir/  # any files, folders or globs

Writes one CSV row per file: file, predicted class, probability.
"""
import argparse
import csv
import glob
import io
import sys
from pathlib import Path

import torch

from src.classes import read_manifest
from src.common import UserError, run_stage, write_text
from src.data import ImageListDataset, eval_transform, make_loader
from src.device import pick_device
from src.images import is_image_name
from src.inference import load_trained_model, predict_logits
from src.params import load_params

MODEL_PATH = Path("models/model.pt")
OUTPUT_PATH = Path("data/predictions.csv")


def expand_inputs(inputs):
    files = []
    for item in inputs:
        if item == "test":
            files += [Path(r["path"]) for r in read_manifest() if r["split"] == "test"]
            continue
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))] or [Path(item)]
        for m in matches:
            if m.is_dir():
                files += sorted(p for p in m.rglob("*") if p.is_file() and is_image_name(p))
            elif m.is_file():
                files.append(m)
            else:
                raise UserError(f"{item}: no such file, folder or glob match")
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="files, folders or globs (default: predict.input)")
    parser.add_argument("--model", default=str(MODEL_PATH))
    parser.add_argument("--output", default=str(OUTPUT_PATH))
    args = parser.parse_args(argv)
    params = load_params()
    device = pick_device(params["train"]["device"])
    model, ckpt = load_trained_model(args.model, device)
    files = expand_inputs(args.inputs or [params["predict"]["input"]])
    dataset = ImageListDataset(files, [0] * len(files), eval_transform(ckpt["image_size"], ckpt["mean"], ckpt["std"]))
    logits, _ = predict_logits(model, make_loader(dataset, params["predict"]["batch_size"]), device)
    probs = torch.softmax(logits, 1)
    top_p, top_i = probs.max(1)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "predicted", "probability"])
    for f, i, p in zip(files, top_i.tolist(), top_p.tolist()):
        writer.writerow([str(f), ckpt["class_names"][i], f"{p:.6f}"])
    write_text(args.output, buf.getvalue())
    print(f"predict: {len(files)} images -> {args.output}")


if __name__ == "__main__":
    run_stage(main)
