"""Hyper-parameter search with Optuna (`python -m src.tune`): the search space file (`space`), the
study in its storage and the claiming of trials (`study`), the training's per-epoch reports that let
the pruner stop a trial (`report`), and the best trial, its params and plots (`results`).

Each trial is a `dvc exp run` of the train stage, so every trial is a DVC experiment and an MLflow run."""
