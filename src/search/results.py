"""A study's outcome: the table of trials, the best trial, its params written into params.yaml, and
plots of the study's history and of which params mattered (metrics/tune/)."""
import csv
import io
from pathlib import Path

from src.core.errors import UserError
from src.core.files import atomic_path, write_text
from src.search.report import PRUNED_AT
from src.search.study import INTERRUPTED

RESULTS = Path("metrics/tune")
PARAMS_FILE = Path("params.yaml")


def trial_rows(study):
    """One row per trial: number, state, value, the epoch a pruned one stopped at, params, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = "interrupted" if t.user_attrs.get(INTERRUPTED) else t.state.name.lower()
        rows.append({"trial": t.number, "state": state, "value": t.value if t.value is not None else "",
                     "pruned_at_epoch": t.user_attrs.get(PRUNED_AT, ""),
                     "minutes": round(t.duration.total_seconds() / 60, 2) if t.duration else "",
                     "experiment": t.user_attrs.get("experiment", ""), **t.params,
                     "error": t.user_attrs.get("error", "")})
    return rows


def write_table(rows, path):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())


def best_trial(study):
    """The best finished trial (completed; pruned ones never are), or one line saying why there is none."""
    try:
        return study.best_trial
    except ValueError:
        raise UserError(f"study '{study.study_name}' has no completed trial yet: run `python -m src.tune`") from None


def apply_params(values, path=PARAMS_FILE):
    """Write dotted params into params.yaml, keeping its comments and layout (ruamel, as DVC's -S does)."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments and order survive
    yaml.width = 4096
    doc = yaml.load(Path(path).read_text(encoding="utf-8"))
    for dotted, value in values.items():
        node = doc
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yaml.dump(doc, f)


def write_plots(study, folder=RESULTS):
    """history.png (every trial's value, the best so far) and importance.png (fANOVA importances,
    from at least two completed trials)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    plots = [("history.png", vis.plot_optimization_history)]
    if sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) >= 2:
        plots.append(("importance.png", vis.plot_param_importances))
    for name, plot in plots:
        axes = plot(study)
        axes.figure.set_size_inches(8, 5)
        axes.figure.tight_layout()
        with atomic_path(folder / name) as tmp:
            axes.figure.savefig(tmp, format="png", dpi=100)
        plt.close(axes.figure)
        written.append(folder / name)
    return written
