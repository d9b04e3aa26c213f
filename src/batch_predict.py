"""Score a folder of images with Spark: the exported image model as a batch job (not a stage).

    python -m src.batch_predict runs:/<run_id>/image_model photos/ preds.parquet           # local[*]
    spark-submit --master yarn src/batch_predict.py models:/NAME/latest s3a://b/photos s3a://b/preds.parquet \
        --env-manager virtualenv

One row per file: file, class, probability, top_k_classes, top_k_probabilities, error (a file
that is not an image gets its error, never a failed job). The output must not exist yet.
`--env-manager virtualenv` builds the model's own environment (no torch) on the executors;
`local` (the default) uses the Python the job runs in.
"""
import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file by spark-submit: make `src` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.core.errors import UserError, first_line  # noqa: E402
from src.core.process import run_stage  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the image model's URI: runs:/<run_id>/image_model, models:/NAME/latest, ...")
    parser.add_argument("input", help="a folder of images (read recursively; any Spark/Hadoop path)")
    parser.add_argument("output", help="where rows go: a .parquet folder (default), .csv or .json")
    parser.add_argument("--master", default=None, help="Spark master when not run by spark-submit (default local[*])")
    parser.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"])
    args = parser.parse_args()
    from pyspark.sql import SparkSession

    from src.shipping.spark_batch import score_folder, write

    builder = SparkSession.builder.appName("resnet-tl batch predict")
    if args.master or not os.environ.get("SPARK_ENV_LOADED"):  # spark-submit sets the master itself
        builder = builder.master(args.master or "local[*]")
    spark = builder.getOrCreate()
    try:
        frame = score_folder(spark, args.model, args.input, args.env_manager)
        write(frame, args.output)
        written = spark.read.parquet(args.output) if not args.output.endswith((".csv", ".json")) else None
        if written is not None:
            failed = written.filter("error != ''").count()
            print(f"batch_predict: {written.count()} files -> {args.output} ({failed} unreadable)")
        else:
            print(f"batch_predict: -> {args.output}")
    except Exception as e:  # Spark's and MLflow's errors, as one line that says what to do
        from mlflow.exceptions import MlflowException
        from pyspark.errors import AnalysisException

        if isinstance(e, AnalysisException) and "PATH_ALREADY_EXISTS" in str(e):
            raise UserError(f"{args.output} already exists: give a new output path") from None
        if isinstance(e, AnalysisException) and "PATH_NOT_FOUND" in str(e):
            raise UserError(f"{args.input}: no such folder; give a folder of images") from None
        if isinstance(e, MlflowException):
            raise UserError(f"model {args.model}: {first_line(e)}; give the image model's URI "
                            "(runs:/<run_id>/image_model, models:/NAME/latest) in $MLFLOW_TRACKING_URI's "
                            "store") from None
        raise
    finally:
        spark.stop()


if __name__ == "__main__":
    run_stage(main)
