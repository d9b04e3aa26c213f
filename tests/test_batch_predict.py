"""Batch prediction on Spark (local[2], a real Spark): the exported image model over a folder, the
way a cluster job runs it, gives the rows `src.predict --backend onnx` gives."""
import csv
import io
import shutil

import pandas as pd
import pytest

from conftest import env, python, run, store_uri

pytestmark = pytest.mark.slow  # trains or runs Spark; shares the exported project


def test_spark_scores_a_folder_like_predict_onnx_with_error_rows_for_bad_files(exported_project, tmp_path):
    project, test_rows, run_id = exported_project
    photos = tmp_path / "photos" / "nested"
    photos.mkdir(parents=True)
    for row in test_rows:
        shutil.copy(project / row["path"], photos / f"{row['label']}-{(project / row['path']).name}")
    (photos / "notes.txt").write_text("not an image")
    good = next(photos.glob("*.png"))
    (photos / "cut.png").write_bytes(good.read_bytes()[:60])  # a truncated image
    (photos / ".DS_Store").write_bytes(b"\0")  # hidden, and not an image name: no row, as in predict
    shutil.copy(good, photos / ".hidden.png")

    out = tmp_path / "preds.parquet"
    spark_env = {**env(), "MLFLOW_TRACKING_URI": store_uri(project), "PYSPARK_PYTHON": python()}
    result = run([python(), "-m", "src.batch_predict", f"runs:/{run_id}/image_model", str(tmp_path / "photos"),
                  str(out), "--master", "local[2]"], project, env=spark_env)
    assert f"{len(test_rows) + 1} files" in result.stdout and "(1 unreadable)" in result.stdout
    spark_rows = pd.read_parquet(out).set_index("file")
    spark_rows.index = [name.removeprefix("file:") for name in spark_rows.index]

    predicted = run([python(), "-m", "src.predict", str(tmp_path / "photos"), "--backend", "onnx",
                     "--top-k", "5"], project, check=False)
    assert predicted.returncode == 1  # some files unreadable
    expected = predicted.stdout
    reference = {r["file"]: r for r in csv.DictReader(io.StringIO(expected))}
    assert set(spark_rows.index) == set(reference) and len(reference) == len(test_rows) + 1
    for file, row in reference.items():
        got = spark_rows.loc[file]
        if row["error"]:
            assert got["error"] and got["class"] == ""
            continue
        assert got["error"] == "" and got["class"] == row["predicted"]
        assert got["probability"] == pytest.approx(float(row["probability"]), abs=1e-6)
        assert list(got["top_k_classes"][:2]) == [row["predicted"], row["class_2"]]

    again = run([python(), "-m", "src.batch_predict", f"runs:/{run_id}/image_model", str(tmp_path / "photos"),
                 str(out), "--master", "local[2]"], project, env=spark_env, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr.strip().splitlines()[-1]
