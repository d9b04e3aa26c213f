"""Batch prediction on Spark: the exported `image_model` over a folder of images, as a cluster job.

    spark.read.format("binaryFile")  ->  base64(content)  ->  mlflow.pyfunc.spark_udf(image_model)

The rows are what the served model answers over REST (the same decoding, the same ONNX model, the
same error rows for files that are not images), one per file, with its path. `python -m
src.batch_predict` (or `spark-submit src/batch_predict.py`) runs it.
"""
from pyspark.sql import functions as F

from src.data.images import IMAGE_EXTENSIONS

# The files `src.predict` takes from a folder (`is_image_name`): an image extension, not hidden.
IMAGE_NAME = r"(?i)/[^./][^/]*\.(" + "|".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + ")$"
# The image model's output columns (src.shipping.serving.COLUMNS) as Spark types.
RESULT_TYPE = ("class string, probability double, top_k_classes array<string>, "
               "top_k_probabilities array<double>, error string")


def score_folder(spark, model_uri, input_path, env_manager="local"):
    """A DataFrame: file, class, probability, top_k_classes, top_k_probabilities, error.

    Files are read recursively and chosen by name as `src.predict` chooses them in a folder. The
    bytes travel as base64, the type the model's signature declares (its REST input)."""
    import mlflow.pyfunc

    classify = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE, env_manager=env_manager)
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(input_path))
             .filter(F.col("path").rlike(IMAGE_NAME)))
    return (files.select(F.col("path").alias("file"), classify(F.base64("content")).alias("p"))
            .select("file", "p.*"))


def write(frame, output_path):
    """Parquet (a folder, the default), or one-file-per-partition CSV/JSON by the path's suffix;
    CSV keeps the top-k lists as JSON text."""
    output_path = str(output_path)
    if output_path.endswith(".csv"):
        frame = frame.withColumn("top_k_classes", F.to_json("top_k_classes")) \
                     .withColumn("top_k_probabilities", F.to_json("top_k_probabilities"))
        frame.write.mode("errorifexists").option("header", True).csv(output_path)
    elif output_path.endswith(".json"):
        frame.write.mode("errorifexists").json(output_path)
    else:
        frame.write.mode("errorifexists").parquet(output_path)
