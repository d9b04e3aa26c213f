"""Stage `predict` (and a command line): classify images with the trained model.

    python -m src.predict                          # the stage: predict.input (default: the test split)
                                                   #   -> data/predictions.csv
    python -m src.predict photo.jpg dir/ 'shots/**/*.png'   # files, folders (recursive), globs -> stdout
    python -m src.predict dir/ --output preds.json --top-k 5
    python -m src.predict photo.jpg --picture      # the tutorial's plot: the image titled with its class
    python -m src.predict photo.jpg --explain out/ # out/photo.gradcam.png: where the model looked
    python -m src.predict dir/ --backend int8      # models/model.int8.onnx under onnxruntime

Everything about the model (arch, classes, image size, normalisation) comes from the
checkpoint (or the exported ONNX file's metadata). Every file gets a row: its top-k classes
with probabilities, or why it could not be read. Exit code 0 when every file was classified, 1
when any could not be (2 for a usage problem). An image over data.max_pixels gets an error row.
With --backend onnx or int8, torch is never imported.
"""
import argparse
import csv
import functools
import glob
import io
import json
import sys
from pathlib import Path

import numpy as np

from src.core import process
from src.core.errors import UserError
from src.core.files import write_text
from src.core.params import load_params
from src.core.paths import CLASS_INDEX, MODEL, PREDICTIONS
from src.core.process import run_stage
from src.data.images import PixelBudget, is_image_name
from src.data.manifest import check_same_classes, held_out_split, read_manifest

PICTURE_LIMIT = 16  # images drawn by --picture; more would be too small to see


def expand_inputs(inputs):
    """Files in order, without repeats. A folder gives its image files, recursively, and so
    does a glob; a name that matches nothing stays in the list, so it gets an error row like
    any unreadable file."""
    files = []
    for item in inputs:
        if item == "test":  # the held-out images: test split, or val where the dataset has no test/
            rows = read_manifest()
            files += [Path(r["path"]) for r in rows if r["split"] == held_out_split(rows)]
            continue
        matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
        if not matches:
            files.append(Path(item))
        is_pattern = any(c in item for c in "*?[")
        for match in matches:
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.is_file() and is_image_name(p))
            elif not is_pattern or is_image_name(match):
                files.append(match)
    return list(dict.fromkeys(files))


def result_rows(files, probs, errors, class_names, top_k):
    """One dict per file: {file, top_k: [(class, probability), ...], error}."""
    k = min(top_k, len(class_names))
    probs = np.asarray(probs, dtype=np.float32)
    top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [{"file": str(f), "error": err or None,
             "top_k": [] if err else [(class_names[i], float(prob[i])) for i in idx]}
            for f, err, prob, idx in zip(files, errors, probs, top_i)]


def to_csv(rows, top_k):
    """file, predicted, probability, class_2, probability_2, ..., error."""
    header = ["file", "predicted", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header + ["error"])
    for row in rows:
        cells = [row["file"]]
        for cls, p in row["top_k"]:
            cells += [cls, f"{p:.6f}"]
        cells += [""] * (len(header) - len(cells))
        writer.writerow(cells + [row["error"] or ""])
    return buf.getvalue()


def to_json(rows):
    out = []
    for row in rows:
        best = row["top_k"][0] if row["top_k"] else (None, None)
        out.append({"file": row["file"], "predicted": best[0], "probability": best[1],
                    "top_k": [{"class": c, "probability": p} for c, p in row["top_k"]], "error": row["error"]})
    return json.dumps(out, indent=1, ensure_ascii=False) + "\n"


def output_format(fmt, output):
    if fmt:
        return fmt
    return "json" if output and Path(output).suffix.lower() == ".json" else "csv"


def draw_picture(rows, destination):
    """The tutorial's figure (plt.imshow + title) for each image, in a window when there is a
    display, else into a PNG file. Returns where it went."""
    from matplotlib import pyplot as plt

    from src.inference.figures import image_grid, save_figure
    shown = [r for r in rows if not r["error"]][:PICTURE_LIMIT]
    titles = [f"class: {r['top_k'][0][0]}   prob: {r['top_k'][0][1]:.3}" for r in shown]
    if len(shown) > 1:  # which picture is which file
        titles = [f"{Path(r['file']).name}\n{t}" for r, t in zip(shown, titles)]
    readable = len(rows) - sum(1 for r in rows if r["error"])
    fig = image_grid([r["file"] for r in shown], titles, columns=1 if len(shown) == 1 else 4,
                     title=f"the first {len(shown)} of {readable} images" if readable > len(shown) else None)
    if destination is None and plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        plt.show()
        return "a window"
    save_figure(fig, destination or "prediction.png")
    return str(destination or "prediction.png")


def parse_args(argv, params):
    cfg = params["predict"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help=f"files, folders or globs (default: predict.input={cfg['input']})")
    parser.add_argument("--model", default=str(MODEL), help="checkpoint (default: %(default)s)")
    parser.add_argument("--output", "-o", help=f"CSV or JSON file; default {PREDICTIONS} for the stage, "
                                               f"stdout when inputs are given")
    parser.add_argument("--format", choices=["csv", "json"], help="default: from --output's extension, else csv")
    parser.add_argument("--top-k", type=int, default=cfg["top_k"], help="classes per file (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=cfg["batch_size"], help="default: %(default)s")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=cfg["precision"],
                        help="torch backend (default: %(default)s)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default=str(cfg["compile"]).lower(),
                        help="torch.compile the model (default: %(default)s; auto = from 30,000 files on CPU)")
    parser.add_argument("--backend", choices=["auto", "torch", "onnx", "int8"], default=cfg["backend"],
                        help="torch (the checkpoint), onnx or int8 (the files `dvc repro export` writes beside "
                             "it, under onnxruntime); auto: int8 on a CPU where export measured >= 99%% "
                             "top-1 agreement, else torch (default: %(default)s)")
    parser.add_argument("--explain", metavar="DIR", help="write a Grad-CAM overlay per readable image into DIR")
    parser.add_argument("--picture", nargs="?", const="", metavar="PNG",
                        help="draw the images titled with their predictions: into PNG, or a window when "
                             "there is a display, else prediction.png")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be at least 1")
    if args.output is None and not args.inputs:
        csv_out = output_format(args.format, None) == "csv"
        args.output = str(PREDICTIONS if csv_out else PREDICTIONS.with_suffix(".json"))
    return args


ONNX_FILES = {"onnx": ".onnx", "int8": ".int8.onnx"}  # beside the checkpoint: models/model.onnx, ...
INT8_MIN_AGREEMENT = 0.99


def pick_backend(choice, checkpoint, on_cpu):
    """(backend, OnnxClassifier or None). The ONNX files must come from this very checkpoint.
    auto: on a CPU the int8 model, the fastest path measured with or without native bf16
    (benchmarks/README.md), if its top-1 agreement with fp32 on the held-out split, measured
    by export, is >= 99%; else (and on GPUs) torch, in bf16 where the hardware has it natively.
    onnx and int8 run on the CPU, and never import torch."""
    from src.shipping.onnx_runtime import OnnxClassifier
    if choice == "torch" or (choice == "auto" and not on_cpu()):
        return "torch", None
    backend = "int8" if choice == "auto" else choice
    path = Path(checkpoint).with_suffix(ONNX_FILES[backend])
    if choice == "auto" and not path.is_file():
        return "torch", None
    classifier = OnnxClassifier(path)
    if not classifier.matches(checkpoint):
        if choice == "auto":
            return "torch", None
        raise UserError(f"{path} was exported from another checkpoint than {checkpoint}; rerun `dvc repro export`")
    if choice == "auto" and float(classifier.meta.get("top1_agreement_vs_fp32", 0)) < INT8_MIN_AGREEMENT:
        return "torch", None
    return backend, classifier


def classify(args, cfg, files, budget):
    """(probabilities, errors, class names, backend name) of the files with the chosen backend."""
    @functools.cache
    def device():  # only the torch backend (or auto choosing) asks: finding it imports torch
        from src.core.device import pick_device
        return pick_device(cfg["device"], "predict.device")

    backend, classifier = pick_backend(args.backend, args.model, lambda: device().type == "cpu")
    if classifier is not None:
        from src.shipping.onnx_runtime import classify_files_onnx
        probs, errors = classify_files_onnx(classifier, files, batch_size=args.batch_size, workers=cfg["workers"],
                                            budget=budget)
        return probs, errors, classifier.class_names, backend
    import torch

    from src.data.loaders import ImageFiles
    from src.inference.classify import classify_files
    from src.networks.checkpoint import load_trained_model
    model, ckpt = load_trained_model(args.model, device())
    compile_choice = {"auto": "auto", "true": True, "false": False}[args.compile]
    logits, errors = classify_files(model, ckpt, ImageFiles(files, ckpt["image_size"], budget), device(),
                                    batch_size=args.batch_size, precision=args.precision,
                                    precision_param="predict.precision", workers=cfg["workers"],
                                    use_compile=compile_choice, desc="predict")
    return torch.softmax(logits, 1).numpy(), errors, ckpt["class_names"], backend


def write_explanations(rows, checkpoint, folder):
    """One Grad-CAM overlay PNG per readable file (of its top class) in `folder`; returns how many."""
    from PIL import Image

    from src.core.files import atomic_path
    from src.data.loaders import ImageFiles
    from src.inference.explain import overlay_names, overlays
    from src.networks.checkpoint import load_trained_model

    model, ckpt = load_trained_model(checkpoint)  # fp32 on the CPU: gradients, one image batch at a time
    readable = [r for r in rows if not r["error"]]
    files = ImageFiles([r["file"] for r in readable], ckpt["image_size"])
    classes = [ckpt["class_names"].index(r["top_k"][0][0]) for r in readable]
    names = overlay_names(files.paths)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(files), 64):  # a chunk at a time: overlays of many files need not fit in memory
        chunk = range(start, min(start + 64, len(files)))
        for i, picture in zip(chunk, overlays(model, ckpt, [files.pixels(i)[0] for i in chunk],
                                              classes[chunk.start:chunk.stop])):
            with atomic_path(Path(folder) / names[i]) as tmp:
                Image.fromarray(picture).save(tmp, format="PNG")
    return len(files)


def main(argv=None):
    process.start()
    params = load_params()
    args = parse_args(argv, params)
    cfg = params["predict"]
    budget = PixelBudget(params["data"]["max_pixels"], "data.max_pixels in params.yaml")
    inputs = args.inputs or [cfg["input"]]
    files = expand_inputs(inputs)
    if not files:
        raise UserError(f"no image files in {' '.join(inputs)}; give image files, folders holding them, or globs")
    probs, errors, class_names, backend = classify(args, cfg, files, budget)
    if "test" in inputs and CLASS_INDEX.exists():
        check_same_classes(class_names)
    rows = result_rows(files, probs, errors, class_names, args.top_k)
    fmt = output_format(args.format, args.output)
    text = to_json(rows) if fmt == "json" else to_csv(rows, min(args.top_k, len(class_names)))
    if args.output and args.output != "-":
        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    log = sys.stderr if not args.output or args.output == "-" else sys.stdout
    if args.picture is not None:
        print(f"predict: picture -> {draw_picture(rows, args.picture or None)}", file=log)
    if args.explain:
        print(f"predict: {write_explanations(rows, args.model, args.explain)} Grad-CAM overlays -> {args.explain}",
              file=log)

    failed = [r for r in rows if r["error"]]
    for row in failed[:10]:
        print(f"predict: {row['file']}: {row['error']}", file=sys.stderr)
    if len(failed) > 10:
        print(f"predict: ... and {len(failed) - 10} more unreadable files (see the error column)", file=sys.stderr)
    print(f"predict: {len(rows) - len(failed)} of {len(rows)} files classified ({backend}) -> "
          f"{args.output or 'stdout'}", file=log)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
