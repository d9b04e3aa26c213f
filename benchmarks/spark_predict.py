"""Batch prediction on Spark against `src.predict` on the same machine, side by side.

    python -m benchmarks.spark_predict                  # 1000 JPEGs of 256 px, resnet18 at 224 px
    python -m benchmarks.spark_predict --images 3000 --master 'local[2]'

Writes JPEGs and a random checkpoint, exports it as the export stage does, logs the image model
into a scratch MLflow store, then times, interleaved, --repeats times each (best kept):
  predict onnx   `src.predict.main --backend onnx`: the same fp32 ONNX model the image model runs
  predict int8   `src.predict.main --backend int8`: the fastest single-machine path
  spark          `score_folder` + parquet write in a running SparkSession (binaryFile, base64,
                 spark_udf of the image model with env_manager=local)
  spark job      `python -m src.batch_predict ...`: the whole job, JVM start included (once)
"""
import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from benchmarks.predict_throughput import export_models, write_images
from src import predict
from src.core.params import load_params
from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from src.networks.checkpoint import save_checkpoint
from src.networks.factory import build_model
from src.shipping.serving import log_image_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--stored", type=int, default=256, help="side of the stored JPEGs in px")
    ap.add_argument("--size", type=int, default=224, help="model input size in px")
    ap.add_argument("--master", default="local[*]")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])  # predict reads params.yaml from the repo root
    params = load_params()
    from pyspark.sql import SparkSession

    from src.shipping.spark_batch import score_folder, write

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        write_images(folder, args.images, args.stored, np.random.default_rng(0))
        torch.manual_seed(0)
        save_checkpoint(tmp / "model.pt", {
            "arch": "resnet18", "num_classes": 10, "class_names": [f"class_{i}" for i in range(10)],
            "image_size": args.size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "model": build_model("resnet18", 10).state_dict()})
        export_models(tmp, args.size, args.stored)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        experiment = mlflow.set_experiment(params["mlflow"]["experiment"])
        with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
            pass
        params["mlflow"]["register_model"] = None
        uri = log_image_model(params, run.info.run_id, tmp / "model.onnx", next(folder.iterdir()))

        spark = SparkSession.builder.master(args.master).appName("benchmark").getOrCreate()
        times = {}

        def timed(name, fn):
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)

        def run_predict(backend):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                predict.main([str(folder), "--model", str(tmp / "model.pt"), "--backend", backend,
                              "--output", str(tmp / f"{backend}.csv")])

        for repeat in range(args.repeats):
            timed("predict onnx", lambda: run_predict("onnx"))
            timed("predict int8", lambda: run_predict("int8"))
            timed("spark", lambda r=repeat: write(score_folder(spark, uri, folder), tmp / f"spark{r}.parquet"))
        spark.stop()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "src.batch_predict", uri, str(folder), str(tmp / "job.parquet"),
                        "--master", args.master], check=True, capture_output=True)
        times["spark job (JVM start included)"] = [time.perf_counter() - start]

    print(f"\n{args.images} JPEGs of {args.stored} px, resnet18 at {args.size} px, Spark {args.master}, "
          f"{os.cpu_count()} CPUs\n")
    print("| path | best s | img/s | x predict onnx |")
    print("|---|---|---|---|")
    base = min(times["predict onnx"])
    for name, values in times.items():
        best = min(values)
        print(f"| {name} | {best:.1f} | {args.images / best:.1f} | {base / best:.2f}x |")


if __name__ == "__main__":
    main()
