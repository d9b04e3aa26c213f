"""The training's side of a trial: after each epoch, report to the study and ask its pruner.

`python -m src.tune` runs each trial as `dvc exp run train` with RESNET_TL_TRIAL set (the storage,
study, trial and pruner); outside a study the variable is unset and training never imports Optuna.
"""
import json
import math
import os

TRIAL_ENV = "RESNET_TL_TRIAL"
PRUNED_AT = "pruned_at_epoch"  # trial attribute: the epoch after which the pruner stopped the training
HISTORY_COLUMN = {"best_val_acc": ("val_acc", max), "best_val_loss": ("val_loss", min)}


def trial_env(storage, study, trial, objective, pruning):
    return {TRIAL_ENV: json.dumps({"storage": storage, "study": study.study_name, "trial_id": trial._trial_id,
                                   "number": trial.number, "objective": objective, "pruner": pruning})}


def pruner(pruning):
    """The pruner, rebuilt alike in the worker and in the training it runs (a pruner is not stored):
    a trial stops when its best so far is below `percentile` of finished trials' at the same step
    (50: the median rule).
    Steps are tenths of the training (of its epochs, or of its time budget's planned epochs), so
    trials with different epoch counts are compared at the same point of their schedules."""
    import optuna

    return optuna.pruners.PercentilePruner(pruning["percentile"], n_startup_trials=pruning["startup_trials"],
                                           n_warmup_steps=round(10 * pruning["warmup"]))


class TrialReport:
    """Reports the objective so far, as tenths of the training (the pruner's steps), once per epoch."""

    def __init__(self, spec):
        import optuna  # only in a study's trials

        self.spec = spec
        self.study = optuna.load_study(study_name=spec["study"], storage=spec["storage"],
                                       pruner=pruner(spec["pruner"]))
        self.trial = optuna.trial.Trial(self.study, spec["trial_id"])
        self.column, self.best = HISTORY_COLUMN[spec["objective"]]
        self.reported = 0

    @classmethod
    def from_env(cls):
        spec = os.environ.get(TRIAL_ENV)
        return cls(json.loads(spec)) if spec else None

    def tags(self):
        return {"tune.study": self.spec["study"], "tune.trial": str(self.spec["number"])}

    def should_stop(self, history):
        """Report the history's best value at each tenth of training it has passed; True when the
        pruner stops this trial (its curve is kept: the training ends as if its plan had ended)."""
        last = history[-1]
        value = self.best(row[self.column] for row in history)
        step = min(10, math.floor(10 * last["epoch"] / last["planned_epochs"])) if last["planned_epochs"] else 0
        for tenth in range(self.reported + 1, step + 1):
            self.trial.report(value, tenth)
        self.reported = max(self.reported, step)
        if step < 10 and self.trial.should_prune():
            self.trial.set_user_attr(PRUNED_AT, last["epoch"])
            return True
        return False
