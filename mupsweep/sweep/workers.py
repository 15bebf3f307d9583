"""Workers: run trials until the study's global budget is met, in this process or in worker
processes, and fail (then re-queue) the trials of dead workers.

Budget: `sweep.n_trials` counts COMPLETE + PRUNED trials over all workers and machines that
share the storage. A worker starts a trial only while finished + running < n_trials and waits
otherwise (a running trial may still fail and need a replacement), so the study ends with
exactly n_trials; re-running a finished study runs nothing, an interrupted one continues.

Dead workers: RDB storages (SQLite, PostgreSQL, ...) run Optuna's heartbeat: a trial whose
worker stopped beating for `sweep.grace_s` is set FAIL and re-queued with the same parameters
(RetryHeartbeatStaleTrialCallback). Optuna 5.0's JournalStorage has no heartbeat, so every
worker also fails RUNNING trials whose recorded worker process (same host) no longer exists.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from mupsweep.config import Config, SweepParam, from_dict, to_dict
from mupsweep.data import ImageDataset, load_dataset
from mupsweep.optuna_adapter import fail_trial
from mupsweep.storage import uses_heartbeat
from mupsweep.sweep.objective import objective
from mupsweep.sweep.space import grid_points, point_key, search_space
from mupsweep.sweep.study import enqueue_grid, grid_conflict, open_study

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the states the budget counts
POLL_S = 1.0  # how often a waiting worker / the parent of --workers looks at the storage
MAX_CONSECUTIVE_FAILURES = 3  # a worker whose trials keep failing stops (the config is broken)


def trial_budget(cfg: Config, params: list[SweepParam]) -> int:
    """n_trials, but never more than the grid has distinct points (each runs once)."""
    if cfg.sweep.sampler == "grid":
        return min(cfg.sweep.n_trials, len({point_key(p) for p in grid_points(params)}))
    return cfg.sweep.n_trials


def _counts(study: optuna.Study) -> tuple[int, int]:
    """(finished = COMPLETE + PRUNED, running) over all workers."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    done = sum(t.state in FINISHED for t in trials)
    return done, len(trials) - done


def fail_dead_trials(study: optuna.Study, cfg: Config) -> None:
    """Fail (and re-queue) the trials of dead workers. RDB storages: Optuna's heartbeat check.
    Without a heartbeat (journal files, heartbeat_s=0): RUNNING trials whose worker ran on this
    host and whose process is gone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without a heartbeat
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=cfg.sweep.max_retry)
    if uses_heartbeat(cfg):
        return
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") != host or _alive(int(worker.get("pid", 0))):
            continue
        failed = fail_trial(study, t, f"worker process {worker['pid']} died")
        if failed is not None:  # None: another worker got there first
            retry(study, failed)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_worker(cfg: Config, worker: int = 0,
               on_trial: Callable[[optuna.Study], None] | None = None) -> optuna.Study:
    """Run trials of the study until COMPLETE + PRUNED reaches the budget (over all workers).

    Returns early, leaving the budget unmet, after MAX_CONSECUTIVE_FAILURES failed trials in a
    row: a config that fails every trial should stop, not loop."""
    params = search_space(cfg)
    study = open_study(cfg, params, worker)
    budget = trial_budget(cfg, params)
    dataset = None  # loaded once per process, only if there is work to do
    failures = 0
    while True:
        fail_dead_trials(study, cfg)
        done, running = _counts(study)
        if done >= budget:
            break
        if done + running >= budget:
            # The last trials are running elsewhere; one may still fail and need a stand-in.
            time.sleep(POLL_S)
            continue
        if cfg.sweep.sampler == "grid":
            enqueue_grid(study, params)  # a point whose trial failed waits again
        if dataset is None:
            dataset = load_dataset(cfg.data)
        trial = _run_one(study, cfg, params, dataset, budget)
        failed = trial is not None and trial.state == TrialState.FAIL
        surplus = trial is not None and trial.user_attrs.get("reason", "").startswith("surplus")
        failures = failures + 1 if failed and not surplus else 0
        if on_trial is not None:
            on_trial(study)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            break
    return study


def _run_one(study: optuna.Study, cfg: Config, params: list[SweepParam], dataset: ImageDataset,
             budget: int) -> FrozenTrial | None:
    """One trial through `study.optimize`, which runs Optuna's heartbeat thread and records an
    exception as a FAIL (catch) instead of ending the sweep. Returns the finished trial."""
    finished: list[FrozenTrial] = []

    def one_trial(trial: Trial) -> float:
        # Two workers may pass the budget check at the same moment; the later trial (by
        # number) yields, so COMPLETE + PRUNED never exceeds the budget.
        earlier = [t for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                   if t.state in FINISHED or t.number < trial.number]
        if len(earlier) >= budget:
            trial.set_user_attr("reason", "surplus: the budget was reached by other workers")
            raise _Surplus()
        conflict = grid_conflict(study, trial.number) if cfg.sweep.sampler == "grid" else None
        if conflict:  # each grid point runs once, whatever the number of workers
            trial.set_user_attr("reason", f"surplus: {conflict}")
            raise _Surplus()
        # Who runs the trial: fail_dead_trials fails it when this process is gone.
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        return objective(trial, cfg, params, dataset)

    # The callback receives the trial as stored after it finished (a FAIL included: `catch`).
    study.optimize(one_trial, n_trials=1, catch=(Exception,),
                   callbacks=[lambda _study, trial: finished.append(trial)])
    return finished[0] if finished else None


class _Surplus(Exception):
    """This trial started after the budget was filled by other workers."""


def _worker_main(cfg_dict: dict, worker: int, verbosity: int) -> None:
    """Entry point of a `--workers` process (multiprocessing spawn)."""
    optuna.logging.set_verbosity(verbosity)
    run_worker(from_dict(cfg_dict), worker)


def run_worker_processes(cfg: Config, workers: int, on_poll: Callable[[], None]) -> None:
    """Run `workers` processes of `run_worker` on the study of `cfg` and wait for them all,
    calling on_poll() every POLL_S meanwhile. Raises RuntimeError naming every worker that
    exited with an error (the study is intact: run again to continue)."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding DB handles
    procs = [ctx.Process(target=_worker_main, args=(to_dict(cfg), k, optuna.logging.get_verbosity()),
                         name=f"mupsweep-tune-{k}") for k in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(POLL_S)
            on_poll()
    finally:
        for p in procs:
            p.join()
    bad = [f"worker {k} exit code {p.exitcode}" for k, p in enumerate(procs) if p.exitcode]
    if bad:
        on_poll()  # announce the trials that finished before the failure
        raise RuntimeError("; ".join(bad))
