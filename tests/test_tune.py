"""The search (`python -m src.tune`): Optuna trials as DVC experiments and MLflow runs, pruned per
epoch, shared by workers in separate clones through one PostgreSQL database."""
import os
import signal
import sqlite3
import subprocess
import time

import mlflow
import optuna
import pytest
import yaml

from src.core.errors import UserError
from src.core.recipes import PHOTO
from src.search.space import load_space

from conftest import REPO, commit_data_stages, copy_project, env, image_folder, logged_runs, make_project, python, run

GOOD, BAD = 0.002, 30.0  # Adam at lr 30 scores chance after its first epoch, far behind the good arm


def write_space(project, **overrides):
    cfg = {"study": "t", "trials": 3, "sampler": {"startup_trials": 10, "seed": 0},
           "pruner": {"startup_trials": 1, "warmup": 0.2}, "fixed": {"train.epochs": 5},
           "space": {"train.lr": [GOOD, BAD]}, **overrides}
    (project / "tune.yaml").write_text(yaml.safe_dump(cfg))


def tune(project, *args, **kwargs):
    return run([python(), "-m", "src.tune", *args], project, **kwargs)


def experiments(project):
    out = run(["dvc", "exp", "list", "--all-commits", "--name-only"], project).stdout
    return set(out.split())


def trials(url, study="t"):
    return optuna.load_study(study_name=study, storage=url).get_trials()


def tagged_runs(project):
    return {r.data.tags["tune.trial"]: r for r in logged_runs(project) if "tune.trial" in r.data.tags}


@pytest.mark.slow
def test_two_workers_in_two_clones_share_one_postgres_study_and_one_mlflow_server(tmp_path, postgres, team_mlflow):
    url, (tracking, _) = postgres("study_two_workers"), team_mlflow
    # A few tiny pictures: this test is about sharing a study, not about learning.
    prepared = commit_data_stages(make_project(tmp_path / "prepared",
                                               {"data.source": str(image_folder(tmp_path / "images"))}))
    clones = [copy_project(prepared, tmp_path / f"clone{i}") for i in range(2)]
    for clone in clones:
        write_space(clone, trials=3, fixed={"train.epochs": 2, "mlflow.experiment": "team-search"},
                    space={"train.lr": {"low": 1e-3, "high": 3e-3}}, pruner={"startup_trials": 99})
    workers = [subprocess.Popen([python(), "-m", "src.tune", "--storage", url], cwd=clone,
                                env={**env(), "MLFLOW_TRACKING_URI": tracking},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for clone in clones]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    done = trials(url)
    assert sorted(t.number for t in done) == [0, 1, 2]  # exactly the study's trials, none twice
    assert {t.state for t in done} == {optuna.trial.TrialState.COMPLETE}, [t.user_attrs.get("error") for t in done]
    names = [experiments(clone) & {f"t-{n}" for n in range(3)} for clone in clones]
    assert names[0] | names[1] == {"t-0", "t-1", "t-2"} and not names[0] & names[1]
    assert names[0] and names[1], outputs  # both workers took trials
    # Both clones' runs meet on the team server, each named after its trial's DVC experiment.
    client = mlflow.MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("team-search")
    runs = {r.data.tags["tune.trial"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["0", "1", "2"]
    for t in done:
        assert runs[str(t.number)].info.run_name == f"t-{t.number}"
        assert runs[str(t.number)].data.metrics["best_val_acc"] == pytest.approx(t.value)
    assert not any((clone / "mlflow.db").exists() for clone in clones)


def wait_for(condition, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def reported_epochs(project, number):
    """Intermediate values of trial `number` in the local study file (read without Optuna's caching);
    0 while the worker is still creating the file's tables."""
    with sqlite3.connect(project / "tune.db") as db:
        try:
            return db.execute("SELECT COUNT(*) FROM trial_intermediate_values v JOIN trials t USING (trial_id) "
                              "WHERE t.number = ?", (number,)).fetchone()[0]
        except sqlite3.OperationalError:  # no such table (yet)
            return 0


@pytest.mark.slow
def test_local_study_prunes_the_bad_arm_survives_ctrl_c_and_its_best_params_train_with_dvc_repro(tmp_path):
    # Three colours, 63 training images: the good arm scores 1.0 after its first epoch, the bad one
    # chance (digits tell them apart as clearly, at four times the cost of each epoch).
    images = image_folder(tmp_path / "images", per_class=30)
    project = commit_data_stages(make_project(tmp_path / "project", {"data.source": str(images), "data.val": 0.2,
                                                                       "train.batch_size": 8}))
    params_file = project / "params.yaml"
    params_file.write_text("# a user's comment\n" + params_file.read_text())
    # trial 0 good, trial 1 clearly bad (pruned), trial 2 good again (interrupted by Ctrl-C, then rerun)
    write_space(project, start_from=[{"train.lr": GOOD}, {"train.lr": BAD}, {"train.lr": GOOD}],
                fixed={"train.epochs": 3})
    # As from a terminal: SIGINT on. (pytest-xdist's workers ignore it, and children inherit that.)
    worker = subprocess.Popen([python(), "-m", "src.tune"], cwd=project, env=env(), start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: (project / "tune.db").exists() and reported_epochs(project, 2) > 0, "trial 2's first epoch")
    os.killpg(worker.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the worker, dvc and the training
    out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 130, out
    assert "rerun `python -m src.tune` to continue" in out

    tune(project)  # continues the study: the interrupted trial's params run again as trial 3
    url = f"sqlite:///{project / 'tune.db'}"
    by_number = {t.number: t for t in trials(url)}
    states = {n: t.state.name for n, t in by_number.items()}
    assert states == {0: "COMPLETE", 1: "PRUNED", 2: "FAIL", 3: "COMPLETE"}
    assert by_number[2].user_attrs["interrupted"] and by_number[3].params == {"train.lr": GOOD}
    pruned = by_number[1]
    assert pruned.user_attrs["pruned_at_epoch"] < 3  # stopped before its epochs ended
    assert experiments(project) >= {"t-0", "t-1", "t-3"}
    runs = tagged_runs(project)
    assert runs["1"].data.tags["tune.state"] == "pruned" and runs["1"].info.status == "FINISHED"
    curve = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_metric_history(
        runs["1"].info.run_id, "curves/val_acc")
    assert len(curve) == pruned.user_attrs["pruned_at_epoch"]  # its curve kept up to where it stopped

    best = tune(project, "--best", "--apply").stdout
    assert "best: trial 0" in best or "best: trial 3" in best
    assert (project / "metrics/tune/trials.csv").read_text().count("\n") == 5
    assert (project / "metrics/tune/history.png").stat().st_size > 0
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["lr"] == GOOD and params["train"]["epochs"] == 3
    assert "# a user's comment" in (project / "params.yaml").read_text()  # kept
    run(["dvc", "repro", "train"], project)  # trains them (or, as here, DVC restores trial 0's identical run)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == GOOD
    assert run(["dvc", "status", "train"], project).stdout.strip().endswith("up to date.")


@pytest.mark.parametrize("space, message", [
    ({"train.lrate": [0.1]}, "space.train.lrate: unknown param 'train.lrate'"),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, "space.train.lr: empty range: low=0.1 must be below high=0.01"),
    ({"arch": []}, "space.arch: an empty list of choices"),
    ({"train.optimizer": ["adam", "lion"]}, "space.train.optimizer: train.optimizer='lion' is not allowed"),
    ({"train.lr": {"low": 0, "high": 0.1, "log": True}}, "space.train.lr: a log range needs low > 0"),
    ({"train.lr": {"min": 0.1, "max": 1}}, "space.train.lr: give a list of choices or {low, high}"),
])
def test_a_bad_space_entry_is_one_line_naming_it(tmp_path, space, message):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "trials": 2, "space": space}))
    with pytest.raises(UserError) as caught:
        load_space(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_default_space_is_valid_and_starts_from_the_photo_recipe():
    cfg = load_space(REPO / "tune.yaml")
    first = {**cfg["fixed"], **cfg["start_from"][0]}
    shared = set(first) & set(PHOTO)
    assert {"arch", "data.image_size", "train.lr", "train.start_image_size", "train.time_budget"} <= shared
    assert {knob: first[knob] for knob in shared} == {knob: PHOTO[knob] for knob in shared}
