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

Packs (sweep.pack = K > 1): a worker asks for up to K trials at once (never more than the
budget leaves free), runs Optuna's heartbeat for each and trains them as one packed model
(`sweep.packing`); a dead pack worker's trials are failed and re-queued like any others.
"""

from __future__ import annotations

import contextlib
import math
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
from mupsweep.optuna_adapter import fail_trial, heartbeat
from mupsweep.storage import redact_text, uses_heartbeat
from mupsweep.sweep.objective import TrialProgress, objective
from mupsweep.sweep.packing import check_pack_settings, train_trials_packed
from mupsweep.sweep.space import grid, search_space
from mupsweep.sweep.study import open_study
from mupsweep.util import first_line

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the states the budget counts
POLL_S = 1.0  # how often a waiting worker / the parent of --workers looks at the storage
MAX_CONSECUTIVE_FAILURES = 3  # a worker whose trials keep failing stops (the config is broken)


def trial_budget(cfg: Config, params: list[SweepParam]) -> int:
    """n_trials, but never more than the grid has points (GridSampler would repeat them)."""
    if cfg.sweep.sampler == "grid":
        return min(cfg.sweep.n_trials, math.prod(len(v) for v in grid(params).values()))
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
    check_pack_settings(cfg, params)
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
        if dataset is None:
            dataset = load_dataset(cfg.data)
        if cfg.sweep.pack > 1:
            finished = _run_pack(study, cfg, params, dataset, budget)
        else:
            finished = [t for t in [_run_one(study, cfg, params, dataset, budget)] if t is not None]
        for trial in finished:
            failed = trial.state == TrialState.FAIL
            surplus = trial.user_attrs.get("reason", "").startswith("surplus")
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
        # Who runs the trial: fail_dead_trials fails it when this process is gone.
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        return objective(trial, cfg, params, dataset)

    # The callback receives the trial as stored after it finished (a FAIL included: `catch`).
    study.optimize(one_trial, n_trials=1, catch=(Exception,),
                   callbacks=[lambda _study, trial: finished.append(trial)])
    return finished[0] if finished else None


def _run_pack(study: optuna.Study, cfg: Config, params: list[SweepParam], dataset: ImageDataset,
              budget: int) -> list[FrozenTrial]:
    """Up to sweep.pack trials asked one after another (enqueued HP sets first; TPE's constant
    liar sees the earlier ones running) and trained as one pack (`sweep.packing`), each under
    Optuna's heartbeat, then told, as `study.optimize` does for one: a value is COMPLETE,
    TrialPruned is PRUNED, any other error a FAIL. Returns the finished trials."""
    done, running = _counts(study)
    asked: list[TrialProgress] = []
    finished: list[FrozenTrial] = []
    with contextlib.ExitStack() as heartbeats:
        try:
            for _ in range(min(cfg.sweep.pack, budget - done - running)):
                with warnings.catch_warnings():  # "heartbeat is for Study.optimize": we run it
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
                # The budget rule of _run_one: a trial that another worker's made surplus yields.
                earlier = [t for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                           if t.state in FINISHED or t.number < trial.number]
                if len(earlier) >= budget:
                    trial.set_user_attr("reason", "surplus: the budget was reached by other workers")
                    finished.append(_tell(study, trial, state=TrialState.FAIL))
                    break
                heartbeats.enter_context(heartbeat(study, trial))
                trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
                try:
                    asked.append(TrialProgress(trial, cfg, params))  # suggests its HPs
                except Exception as e:
                    trial.set_user_attr("reason", redact_text(first_line(f"{type(e).__name__}: {e}")))
                    finished.append(_tell(study, trial, state=TrialState.FAIL))
            for p in asked:
                p.trial.set_user_attr("pack_size", len(asked))
            outcomes = train_trials_packed(asked, cfg, dataset)
        except BaseException:  # Ctrl-C, a storage error: as study.optimize, fail the trials
            for p in asked:
                _tell(study, p.trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    for p, outcome in zip(asked, outcomes, strict=True):
        if isinstance(outcome, optuna.TrialPruned):
            finished.append(_tell(study, p.trial, state=TrialState.PRUNED))
        elif isinstance(outcome, BaseException):
            finished.append(_tell(study, p.trial, state=TrialState.FAIL))
        else:
            finished.append(_tell(study, p.trial, outcome))
    return finished


def _tell(study: optuna.Study, trial: Trial, value: float | None = None, **kwargs) -> FrozenTrial:
    """`study.tell`. GridSampler calls `Study.stop` once its last point is told, which raises
    RuntimeError outside `study.optimize` after the trial is stored (Optuna documents this for
    ask-and-tell); the budget, not the sampler, ends our sweeps, so that error is dropped."""
    try:
        return study.tell(trial, value, **kwargs)
    except RuntimeError:
        stored = study.get_trials(deepcopy=False)[trial.number]
        if not (isinstance(study.sampler, optuna.samplers.GridSampler) and stored.state.is_finished()):
            raise
        return stored


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
