"""The study in its storage, and how workers take trials from it so that no trial runs twice and the
study ends at exactly its number of trials, with any number of workers on any number of machines.

The worker that creates the study enqueues all its trials (the `start_from` ones first); workers then
take WAITING trials one at a time through the storage, which lets exactly one of them move a trial to
RUNNING. A trial interrupted by Ctrl-C is marked failed (`interrupted`) and a fresh one is enqueued in
its place, so the finished count still reaches `trials`.
"""
import os
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from src.core.errors import UserError, first_line
from src.core.params import redact_url
from src.core.paths import workspace_root
from src.search.report import pruner
from src.search.space import OBJECTIVES

STORAGE_ENV = "RESNET_TL_TUNE_STORAGE"  # a database URL for every worker (overrides tune.yaml's storage)
LOCAL_STORE = "tune.db"                 # the default: one file in the workspace (gitignored)
PLANNED = "planned_trials"              # study attribute: the study's total, set before its trials are queued
INTERRUPTED = "interrupted"             # trial attribute of a trial stopped by Ctrl-C (not counted)


def storage_url(cfg, override=None):
    """--storage, else $RESNET_TL_TUNE_STORAGE, else tune.yaml's storage, else tune.db here."""
    url = override or os.environ.get(STORAGE_ENV) or cfg["storage"]
    return url or f"sqlite:///{workspace_root() / LOCAL_STORE}"


def connect(url, tries=4):
    """The storage; workers starting together on an empty database race to create its tables, and the
    losers' first try fails (a unique-constraint error), so a failure is retried before it is reported."""
    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # driver missing, server down, wrong password: the URL and the reason
            if attempt == tries - 1:
                raise UserError(f"cannot open the study storage {redact_url(url)}: {first_line(e)}; check the "
                                "URL, that its server answers, and its driver (postgresql+psycopg:// uses "
                                "psycopg, in requirements.txt)") from None
            time.sleep(1 + attempt)


def sampler(cfg):
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # multivariate, constant_liar
    # constant_liar: a running trial counts as a poor result, so parallel workers don't sample the same point
    return optuna.samplers.TPESampler(n_startup_trials=cfg["sampler"]["startup_trials"], seed=cfg["sampler"]["seed"],
                                      multivariate=True, constant_liar=True)


def open_study(cfg, url, create=True):
    """Load the study, or (create=True) create it with its trials queued."""
    missing = f"no study '{cfg['study']}' in {redact_url(url)}: run `python -m src.tune` first (or give its --storage)"
    if not create and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UserError(missing)  # before connecting, which would create an empty database file
    storage = connect(url)
    direction = OBJECTIVES[cfg["objective"]]
    if not create and cfg["study"] not in optuna.get_all_study_names(storage):
        raise UserError(missing)
    try:
        study = optuna.create_study(study_name=cfg["study"], storage=storage, direction=direction,
                                    sampler=sampler(cfg), pruner=pruner(cfg["pruner"]))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=cfg["study"], storage=storage, sampler=sampler(cfg),
                                  pruner=pruner(cfg["pruner"]))
        if study.direction.name.lower() != direction:
            raise UserError(f"study '{cfg['study']}' in {redact_url(url)} {study.direction.name.lower()}s; "
                            f"tune.yaml's objective {cfg['objective']} would {direction}: name a new study") from None
        return study
    study.set_user_attr(PLANNED, cfg["trials"])
    study.set_user_attr("objective", cfg["objective"])
    for params in cfg["start_from"]:
        study.enqueue_trial(params)
    for _ in range(cfg["trials"] - len(cfg["start_from"])):
        study.enqueue_trial({})
    return study


def counted(trial):
    """Finished trials that count towards the study's total (not those stopped by Ctrl-C)."""
    return trial.state.is_finished() and not trial.user_attrs.get(INTERRUPTED)


def claim(study, wait=30):
    """The next queued trial, now RUNNING and ours alone; None when every trial is taken.

    Only the storage decides who gets a trial: `set_trial_state_values(..., RUNNING)` succeeds for
    exactly one worker. `wait`: seconds to wait for a study whose creator is still queueing trials."""
    storage = study._storage  # the study's own (caching) view of the storage, as study.ask() uses it
    study_id = storage.get_study_id_from_name(study.study_name)
    deadline = time.time() + wait
    while True:
        for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.trial.Trial(study, frozen._trial_id)  # as study.ask() builds it
        planned = study.user_attrs.get(PLANNED)
        queued = sum(not t.user_attrs.get(INTERRUPTED) for t in study.get_trials(deepcopy=False))
        if planned is not None and queued >= planned or time.time() > deadline:
            return None
        time.sleep(1)  # the creator is still queueing the trials


def requeue(study, trial):
    """Ctrl-C stopped `trial`: mark it failed and not counted, and queue its params again (its
    training then resumes from models/resume.pt where the same clone runs it)."""
    trial.set_user_attr(INTERRUPTED, True)
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial(trial.params)
