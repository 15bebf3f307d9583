"""`mupsweep tune`: an Optuna study of the muP hyperparameters on narrow proxy models.

A trial suggests a value for every search-space axis (`sweep.params`), then calls the one
training loop, `mupsweep.train.train`, once per proxy width with an `on_eval` callback that
reports the validation loss to Optuna. The objective is the mean final validation loss over
the proxy widths.

`tune(cfg, workers)` runs the study to its global budget, `sweep.n_trials` COMPLETE + PRUNED
trials over every worker and machine sharing the storage, shows progress on stderr and writes
trials.csv and best.json. The parts, in `mupsweep.sweep`:

    space.py      the search space: default axes, checks of sweep.params, suggest, grid
    objective.py  one trial: its config per width, training, pruning, cost (the step axis)
    study.py      create or load the study: storage, model signature, sampler, pruner
    workers.py    run trials to the exact budget; fail and re-queue dead workers' trials
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

from mupsweep.best import best_document, write_best_json
from mupsweep.config import Config
from mupsweep.errors import UserError
from mupsweep.sweep.space import search_space
from mupsweep.sweep.study import enqueue_grid, open_study
from mupsweep.sweep.workers import FINISHED, run_worker, run_worker_processes, trial_budget


def tune(cfg: Config, workers: int = 1) -> optuna.Study:
    """Run the sweep in `cfg.sweep` to its global budget and write trials.csv and best.json.

    workers > 1 starts that many worker processes on the same storage and study (and this
    process only watches); the same call on another machine with the same storage adds more."""
    if workers < 1:
        raise UserError(f"--workers={workers} must be >= 1")
    params = search_space(cfg)  # validate everything before any process starts
    study = open_study(cfg, params)  # creates the study once, before workers race for it
    if cfg.sweep.sampler == "grid":
        enqueue_grid(study, params)  # here, once, so that workers starting together find it
    budget = trial_budget(cfg, params)
    if budget < cfg.sweep.n_trials:
        Console(stderr=True).print(f"the grid has {budget} points: running {budget} trials, "
                                   f"not sweep.n_trials={cfg.sweep.n_trials}", highlight=False)
    progress = _Progress(budget)
    with progress:
        progress.start(study)
        if workers == 1:
            study = run_worker(cfg, 0, on_trial=progress.update)
        else:
            run_worker_processes(cfg, workers, on_poll=lambda: progress.update(study))
        progress.update(study)
    write_outputs(study, Path(cfg.sweep.out_dir))
    return study


class _Progress:
    """Trials done / budget, best so far and running trials, on stderr; one line per trial."""

    def __init__(self, budget: int):
        self.budget, self.seen, self.console = budget, set(), Console(stderr=True)

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console)
        self.bar.__enter__()
        self.task = self.bar.add_task("tune", total=self.budget, info="")
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
        return False

    def start(self, study: optuna.Study) -> None:
        """Trials finished before this run are not announced again."""
        self.seen |= {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                value = f"{t.value:.4f}" if t.value is not None and t.state == TrialState.COMPLETE else "-"
                hp = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in (t.user_attrs.get("hparams") or {}).items())
                reason = t.user_attrs.get("reason", "")
                self.bar.console.print(f"trial {t.number} {t.state.name.lower()} {value}  {hp}"
                                       + (f"  [{reason}]" if reason else ""), highlight=False,
                                       markup=False)
        done = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        best = min(complete, key=lambda t: t.value) if complete else None
        info = (f"best {best.value:.4f} (#{best.number})" if best else "best -") + f"  running {running}"
        self.bar.update(self.task, completed=min(done, self.budget), info=info)


def write_outputs(study: optuna.Study, out_dir: Path) -> dict[str, Any]:
    """Write out_dir/trials.csv (Optuna's dataframe) and out_dir/best.json; return the doc."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    doc = best_document(study)
    write_best_json(doc, out_dir / "best.json")
    return doc
