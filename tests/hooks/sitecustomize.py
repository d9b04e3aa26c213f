"""Test-only start-up hook: with RESNET_TL_TEST_KILL_AT=EPOCH:BATCH, a training process SIGKILLs
itself at that batch, to prove that resuming works (tests/test_resume.py puts this folder on
PYTHONPATH; Python imports sitecustomize at start-up). Production code knows nothing of it."""
import importlib.abc
import importlib.util
import os
import signal
import sys

KILL_AT = os.environ.get("RESNET_TL_TEST_KILL_AT")
TRAINER = "src.training.trainer"


class KillingLoader:
    """The loader's batches, until the process kills itself on fetching batch `at`."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for step, batch in enumerate(self.loader, 1):
            if step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def killing(train_one_epoch, epoch_to_kill, batch_to_kill):
    def wrapped(model, loader, trainer, run, epoch, *args, **kwargs):
        if epoch == epoch_to_kill:
            loader = KillingLoader(loader, batch_to_kill)
        return train_one_epoch(model, loader, trainer, run, epoch, *args, **kwargs)
    return wrapped


class KillHook(importlib.abc.MetaPathFinder):
    """Wraps train_one_epoch as the trainer module loads, before the stage imports the name."""

    def find_spec(self, name, path, target=None):
        if name != TRAINER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            epoch, batch = map(int, KILL_AT.split(":"))
            module.train_one_epoch = killing(module.train_one_epoch, epoch, batch)

        spec.loader.exec_module = exec_module
        return spec


if KILL_AT:
    sys.meta_path.insert(0, KillHook())
