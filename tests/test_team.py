"""A team's MLflow server (`make team-server`: PostgreSQL backend, proxied artifacts): a clone that
points MLFLOW_TRACKING_URI at it logs its training, evaluation and image model there, registers the
model, and `mlflow models serve -m models:/NAME/latest` serves it from the server."""
import base64
import json
import shutil
import subprocess
import sys
import urllib.request

import mlflow
import pytest

from conftest import SHAPES, copy_project, env, free_port, run, set_params, stop_server, wait_until_answers

pytestmark = pytest.mark.slow  # trains or runs Spark; shares the exported project


def test_a_clone_logs_registers_and_serves_through_the_team_server(exported_project, team_mlflow, tmp_path):
    tracking, artifacts = team_mlflow
    project = copy_project(exported_project[0], tmp_path / "project")
    (project / "mlflow.db").unlink()
    shutil.rmtree(project / "mlartifacts", ignore_errors=True)
    set_params(project, {"mlflow.register_model": "team-shapes", "mlflow.experiment": "team"})
    team_env = {**env(), "MLFLOW_TRACKING_URI": tracking}
    run(["dvc", "repro", "-f", "train", "evaluate", "export"], project, env=team_env)

    client = mlflow.MlflowClient(tracking_uri=tracking)
    (logged,) = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert "test/accuracy" in logged.data.metrics and "best_val_acc" in logged.data.metrics
    versions = client.search_model_versions("name='team-shapes'")
    assert len(versions) == 1 and versions[0].run_id == logged.info.run_id, versions
    # Artifacts went through the server into its folder; the clone keeps no store of its own.
    assert list(artifacts.rglob("image_model.py")) and list(artifacts.rglob("model.onnx"))
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/team-shapes/latest",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env=team_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        wait_until_answers(server, f"http://127.0.0.1:{port}/ping", "mlflow models serve")
        photo = next((project / "data/raw").rglob("*.png"))
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[
            base64.b64encode(photo.read_bytes()).decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            (row,) = json.loads(answer.read())["predictions"]
        assert row["class"] in SHAPES and row["error"] == ""
    finally:
        stop_server(server)
