"""`mupsweep tune`: an Optuna study of the muP hyperparameters on narrow proxy models.

A trial suggests a value for every search-space axis (`sweep.params`), then calls the one
training loop, `mupsweep.train.train`, once per proxy width with an `on_eval` callback that
reports the validation loss to Optuna. The objective is the mean final validation loss over
the proxy widths.

`tune(cfg, workers)` runs the study to its global budget, `sweep.n_trials` COMPLETE + PRUNED
trials over every worker and machine sharing the storage, shows progress on stderr and writes
trials.csv and best.json. A sweep that ran but has nothing to transfer (budget not met, or no
trial completed) raises `SweepFailed` after writing them. Ctrl-C or SIGTERM (to this process
alone or to its whole group) stops every worker, fails and re-queues the running trials, writes
them too and raises `Interrupted`, whose str() is the line to print. The parts, in
`mupsweep.sweep`:

    space.py      the search space: default axes, checks of sweep.params, suggest, grid
    objective.py  one trial: its config per width, training, pruning, cost (the step axis)
    study.py      create or load the study: storage, signature, per-trial seeded sampler, pruner
    workers.py    run trials to the exact budget; fail and re-queue dead or interrupted trials
    retry.py      re-queue a trial with its parameters; reasons that are not failures
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from mupsweep.completep import why_depth_transfer_fails
from mupsweep.config import Config
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.evaluation import metric_named
from mupsweep.stopping import Interrupted, stop_signals
from mupsweep.sweep.objective import check_trial_setup
from mupsweep.sweep.packing import check_pack_settings, pruning_note
from mupsweep.sweep.retry import INTERRUPTED
from mupsweep.sweep.space import search_space
from mupsweep.sweep.storage import label_of
from mupsweep.sweep.study import enqueue_grid, open_study
from mupsweep.sweep.summary import study_summary, write_best_json
from mupsweep.sweep.workers import (
    FINISHED,
    WorkerExit,
    run_worker,
    run_worker_processes,
    trial_budget,
)
from mupsweep.util import atomic_write, os_reason

RESUME = "re-run the same command to continue"  # how to go on after an interrupt or a shortfall


class SweepFailed(Exception):
    """The sweep ran, but has no result to transfer: fewer trials than the budget finished,
    or none completed. trials.csv and best.json are written; `study` holds what there is."""

    def __init__(self, message: str, study: optuna.Study):
        super().__init__(message)
        self.study = study


def tune(cfg: Config, workers: int = 1, depth_experiment: bool = False) -> optuna.Study:
    """Run the sweep in `cfg.sweep` to its global budget and write trials.csv and best.json.

    workers > 1 starts that many worker processes on the same storage and study (and this
    process only watches); the same call on another machine with the same storage adds more.
    Everything a trial needs (data, model at every proxy width, device) is checked here first:
    bad input is one UserError before any worker starts. Raises SweepFailed (after writing the
    outputs) when the budget was not met or no trial completed. Ctrl-C or SIGTERM: raises
    Interrupted (a KeyboardInterrupt; str() says what to do, exit_code is 130 or 143) once
    every worker has stopped, the running trials are failed and re-queued, and the outputs
    are written with the trials there are.

    depth_experiment: the study measures whether HPs carry across depth (validate --depths),
    so an architecture where they are known not to is run, not refused."""
    if workers < 1:
        raise UserError(f"--workers={workers} must be >= 1")
    opened: list[optuna.Study] = []  # the study, once open: written on an interrupt too
    with stop_signals():  # Ctrl-C and SIGTERM raise Interrupted; later ones wait for the below
        try:
            return _run(cfg, workers, opened, depth_experiment)
        except KeyboardInterrupt as e:
            if opened:  # every worker has stopped and re-queued its trial by now
                with contextlib.suppress(Exception):  # the storage may be what is gone
                    write_outputs(opened[0], Path(cfg.sweep.out_dir))
            by = Interrupted.of(e, "").by  # "" for Ctrl-C, " by SIGTERM"
            raise Interrupted.of(e, f"interrupted{by}; {RESUME}") from None


def _run(cfg: Config, workers: int, opened: list[optuna.Study],
         depth_experiment: bool = False) -> optuna.Study:
    """`tune` inside its signal handling; the study goes into `opened` once it exists."""
    params = search_space(cfg)  # validate everything before any process starts
    metric_named(cfg.sweep.objective)
    why = None if depth_experiment else why_depth_transfer_fails(cfg.model)
    if why:  # a depth sweep, or a study meant to transfer across depth, would mislead
        raise UserError(f"model.depth_parametrization=completep with model.arch={cfg.model.arch}: "
                        f"tuned HPs would not carry across depth: {why}; tune with "
                        "model.depth_parametrization=none (and transfer across width only)")
    check_pack_settings(cfg, params)
    dataset = load_dataset(cfg.data)
    check_trial_setup(cfg, params, dataset)
    study = open_study(cfg, params)  # creates the study once, before workers race for it
    opened.append(study)
    if cfg.sweep.sampler == "grid":
        enqueue_grid(study, params)  # here, once, so that workers starting together find it
    budget = trial_budget(cfg.sweep, params)
    console = Console(stderr=True)
    if budget < cfg.sweep.n_trials:
        console.print(f"the grid has {budget} points: running {budget} trials, "
                      f"not sweep.n_trials={cfg.sweep.n_trials}", highlight=False)
    note = pruning_note(cfg.sweep, budget)
    if note:
        console.print(f"warning: {note}", highlight=False)
    progress = _Progress(budget)
    exits: list[WorkerExit] = []
    with progress:
        progress.start(study)
        if workers == 1:
            study = run_worker(cfg, on_trial=progress.update, dataset=dataset)
        else:
            del dataset  # each worker loads its own
            exits = run_worker_processes(cfg, workers, on_poll=lambda: progress.update(study),
                                         study=study)
        progress.update(study)
    doc = write_outputs(study, Path(cfg.sweep.out_dir))
    bad_input = [e for e in exits if e.error]
    if bad_input:
        raise UserError(bad_input[0].describe())
    problem = shortfall(doc, budget, exits)
    if problem:
        raise SweepFailed(problem, study)
    for e in exits:
        console.print(f"[yellow]warning:[/] {escape(e.describe())}; the other workers made up "
                      "for it", highlight=False, soft_wrap=True)
    return study


def shortfall(doc: dict[str, Any], budget: int, exits: list[WorkerExit] | None = None) -> str | None:
    """Why the sweep in study summary `doc` has no result to use, in one line; None if it has.

    Not met: the budget (workers died, or trials kept failing), or any COMPLETE trial (every
    one was pruned or diverged)."""
    trials = doc["trials"]
    done = sum(t["state"] in (s.name for s in FINISHED) for t in trials)
    if done < budget:
        head = f"sweep incomplete: {done}/{budget} trials finished"
        if exits:
            return f"{head} ({'; '.join(e.describe() for e in exits)}); {RESUME}"
        failed = [t for t in trials if t["state"] == "FAIL" and t["reason"]
                  and t["reason"] != INTERRUPTED and not t["reason"].startswith("surplus")]
        if failed:
            return f"{head}: trials keep failing, the last with: {failed[-1]['reason']}"
        return head
    if doc["trial"] is None and done > 0:
        diverged = sum(t["state"] == "PRUNED" and t["reason"].startswith("diverged") for t in trials)
        pruned = sum(t["state"] == "PRUNED" for t in trials) - diverged
        hint = ("lower the lr range (sweep.params optim.lr), or lower the init / output "
                "multiplier ranges" if diverged else "use sweep.pruner=none, or more trials")
        return (f"all {done} trials were pruned or diverged ({diverged} diverged, {pruned} pruned "
                f"by sweep.pruner): nothing to transfer; {hint}")
    return None


class _Progress:
    """Trials done / budget, best so far and running trials, on stderr; one line per trial.
    On a terminal a rich bar; otherwise (SLURM, nohup, CI logs) the trial lines alone, each
    with the count and the best so far, one unwrapped line each."""

    def __init__(self, budget: int):
        self.budget, self.seen, self.console = budget, set(), Console(stderr=True)
        self.bar = None

    def __enter__(self):
        if not self.console.is_terminal:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console)
        self.bar.__enter__()
        self.task = self.bar.add_task("tune", total=self.budget, info="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def start(self, study: optuna.Study) -> None:
        """Trials finished before this run are not announced again."""
        self.seen |= {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.update(study)

    def update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        best = min(complete, key=lambda t: t.value) if complete else None
        info = (f"best {best.value:.4f} (#{best.number})" if best else "best -") + f"  running {running}"
        for t in trials:
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                value = f"{t.value:.4f}" if t.value is not None and t.state == TrialState.COMPLETE else "-"
                hp = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in (t.user_attrs.get("hparams") or {}).items())
                reason = t.user_attrs.get("reason", "")
                count = "" if self.bar is not None else f"[{min(done, self.budget)}/{self.budget}, {info}] "
                self.console.print(f"{count}trial {t.number} {t.state.name.lower()} {value}  {hp}"
                                   + (f"  [{reason}]" if reason else ""), highlight=False,
                                   markup=False, soft_wrap=True)
        if self.bar is not None:
            self.bar.update(self.task, completed=min(done, self.budget), info=info)


def write_outputs(study: optuna.Study, out_dir: Path) -> dict[str, Any]:
    """Write out_dir/trials.csv (Optuna's dataframe) and out_dir/best.json, each atomically
    (another machine's tune may write them at the same time); return the doc. A full disk is
    one line: the study keeps every finished trial, and a re-run writes the files again."""
    doc = study_summary(study)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        frame = study.trials_dataframe()
        atomic_write(out_dir / "trials.csv", lambda tmp: frame.to_csv(tmp, index=False))
        write_best_json(doc, out_dir / "best.json")
    except OSError as e:
        raise UserError(f"cannot write {out_dir}/trials.csv and best.json: {os_reason(e)}; the "
                        f"study in {label_of(study)} keeps every finished trial; free space and "
                        "re-run tune to write them") from None
    return doc
