"""Workers: run trials until the study's global budget is met, in this process or in worker
processes; fail (then re-queue) the trials of dead or interrupted workers.

Budget: `sweep.n_trials` counts COMPLETE + PRUNED trials over all workers and machines that
share the storage. A worker starts a trial only while finished + running < n_trials and waits
otherwise (a running trial may still fail and need a replacement), so the study ends with
exactly n_trials; re-running a finished study runs nothing, an interrupted one continues. A
trial that two workers start at the same moment past the budget is failed as surplus (not a
failure: `retry.SURPLUS`). Our own count, not Optuna's `MaxTrialsCallback`: that one is
checked only after a trial ends, so workers that start together overshoot the budget by up to
one trial each, and it does not hold back a trial while a running one may still fail.

Dead workers: RDB storages (SQLite, PostgreSQL, ...) run Optuna's heartbeat: a trial whose
worker stopped beating for `sweep.grace_s` is set FAIL and re-queued with the same parameters
(`retry.retry_trial`, at most sweep.max_retry times). Optuna 5.0's JournalStorage has no
heartbeat, so every worker also fails RUNNING trials whose recorded worker process (same host)
no longer exists. The parent of `--workers` keeps the other workers going when one dies.

Ctrl-C and SIGTERM (`stop_signals`): a terminal's Ctrl-C sends SIGINT to every process of the
command; a scheduler (Slurm, Kubernetes, `timeout`) sends SIGTERM, to the whole process group
or to the parent only. Either raises `Interrupted` (a KeyboardInterrupt) in the main thread of
the process that gets it; later SIGINTs and SIGTERMs are ignored meanwhile, so that the
bookkeeping is not cut short. Each worker fails its running trial with reason "interrupted",
re-queues it with the same parameters and exits quietly; the parent of `--workers` passes the
signal on to every worker (one that only it got), waits for them, re-queues what a worker
left RUNNING (one killed before it could, or whose write failed) and then propagates it, so
no worker outlives it (nor its being killed: on Linux a worker gets SIGTERM when its parent
dies). A signal that comes while a worker fails and re-queues a dead worker's trial, or
tells the results of the trials it trained, waits until they are written (`deferred_stop`).

Trials: a worker asks for up to K = sweep.pack trials at once (1 when not packing; never more
than the budget leaves free), runs Optuna's heartbeat for each, trains them as one group
(`objective.train_trials`; K > 1 is one packed model) and tells their results; each asked
trial passes the same budget and grid rules, and a dead or interrupted worker's trials are
failed and re-queued alike.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mupsweep.config import Config, SweepConfig, SweepParam, from_dict, to_dict
from mupsweep.data import ImageDataset, load_dataset
from mupsweep.errors import UserError
from mupsweep.stopping import STOP_SIGNALS, deferred_stop, stop_once, stop_signals
from mupsweep.sweep.objective import TrialRecord, train_trials
from mupsweep.sweep.optuna_adapter import fail_trial, heartbeat
from mupsweep.sweep.packing import check_pack_settings
from mupsweep.sweep.retry import INTERRUPTED, SURPLUS, is_surplus, retry_trial
from mupsweep.sweep.space import grid_points, point_key, search_space
from mupsweep.sweep.storage import redact_text, storage_failure, uses_heartbeat
from mupsweep.sweep.study import enqueue_grid, grid_conflict, open_study
from mupsweep.util import first_line

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the states the budget counts
POLL_S = 1.0  # how often a waiting worker / the parent of --workers looks at the storage
MAX_CONSECUTIVE_FAILURES = 3  # a worker whose trials keep failing stops (the config is broken)
STOP_WAIT_S = 30.0  # after Ctrl-C / SIGTERM, how long the parent waits for workers to re-queue
EXIT_INTERRUPTED = 130  # a worker's exit code after Ctrl-C (128 + SIGINT, as shells report it)
EXIT_BAD_INPUT = 2  # a worker's exit code after a UserError (its line goes to the parent)
_logger = optuna.logging.get_logger("optuna.study.study")  # where study.optimize's lines go


def trial_budget(sweep: SweepConfig, params: list[SweepParam]) -> int:
    """n_trials, but never more than the grid has distinct points (each runs once)."""
    if sweep.sampler == "grid":
        return min(sweep.n_trials, len({point_key(p) for p in grid_points(params)}))
    return sweep.n_trials


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
    if uses_heartbeat(cfg):
        return
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") != host or _alive(int(worker.get("pid", 0))):
            continue
        with deferred_stop():  # a failed trial is re-queued, even when SIGTERM comes between
            failed = fail_trial(study, t, f"worker process {worker['pid']} died")
            if failed is not None:  # None: another worker got there first
                retry_trial(study, failed, cfg.sweep.max_retry)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --------------------------------------------------------------------------------------------
# One worker: trials until the budget is met
# --------------------------------------------------------------------------------------------


def run_worker(cfg: Config, on_trial: Callable[[optuna.Study], None] | None = None,
               dataset: ImageDataset | None = None) -> optuna.Study:
    """Run trials of the study until COMPLETE + PRUNED reaches the budget (over all workers).

    Returns early, leaving the budget unmet, after MAX_CONSECUTIVE_FAILURES failed trials in a
    row: a config that fails every trial should stop, not loop. `dataset`: already loaded
    (else loaded here, once, if there is work to do). KeyboardInterrupt propagates after the
    running trial is failed and re-queued."""
    params = search_space(cfg)
    check_pack_settings(cfg, params)
    study = open_study(cfg, params)
    budget = trial_budget(cfg.sweep, params)
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
        for trial in _run_trials(study, cfg, params, dataset, budget):
            failed = trial.state == TrialState.FAIL
            failures = failures + 1 if failed and not is_surplus(trial) else 0
        if on_trial is not None:
            on_trial(study)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            break
    return study


def _why_surplus(study: optuna.Study, cfg: Config, number: int, budget: int) -> str | None:
    """Why trial `number`, just started, must yield (its reason, "surplus..."), or None.

    Two workers may pass the budget check at the same moment; the later trial (by number)
    yields, so COMPLETE + PRUNED never exceeds the budget. And each grid point runs once,
    whatever the number of workers (`grid_conflict`)."""
    earlier = [t for t in study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
               if t.state in FINISHED or t.number < number]
    if len(earlier) >= budget:
        return SURPLUS
    conflict = grid_conflict(study, number) if cfg.sweep.sampler == "grid" else None
    return f"{SURPLUS}: {conflict}" if conflict else None


def _run_trials(study: optuna.Study, cfg: Config, params: list[SweepParam],
                dataset: ImageDataset, budget: int) -> list[FrozenTrial]:
    """Up to sweep.pack trials (1 when not packing) asked one after another (enqueued HP sets
    first; TPE's constant liar sees the earlier ones running), trained as one group
    (`objective.train_trials`), each under Optuna's heartbeat, then told as `study.optimize`
    tells one: a value is COMPLETE, TrialPruned is PRUNED, any other error a FAIL (logged as
    Optuna logs it). Returns the finished trials."""
    done, running = _counts(study)
    asked: list[TrialRecord] = []
    finished: list[FrozenTrial] = []
    try:
        with contextlib.ExitStack() as heartbeats:
            try:
                for _ in range(min(cfg.sweep.pack, budget - done - running)):
                    with warnings.catch_warnings():  # "heartbeat is for Study.optimize": we run it
                        warnings.filterwarnings("ignore", message="Heartbeat of storage")
                        trial = study.ask()
                    surplus = _why_surplus(study, cfg, trial.number, budget)
                    if surplus:  # the budget or the grid point is taken: no more asks this round
                        trial.set_user_attr("reason", surplus)
                        finished.append(study.tell(trial, state=TrialState.FAIL))
                        break
                    heartbeats.enter_context(heartbeat(study, trial))
                    # Who runs the trial: fail_dead_trials fails it when this process is gone.
                    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
                    try:
                        asked.append(TrialRecord(trial, cfg, params))  # suggests its HPs
                    except Exception as e:
                        trial.set_user_attr("reason", redact_text(first_line(f"{type(e).__name__}: {e}")))
                        _log_failed(trial.number, trial.params, e)
                        finished.append(study.tell(trial, state=TrialState.FAIL))
                if cfg.sweep.pack > 1:
                    for r in asked:
                        r.trial.set_user_attr("pack_size", len(asked))
                outcomes = train_trials(asked, cfg, dataset) if asked else []
            except KeyboardInterrupt:
                raise
            except BaseException:  # a storage error: as study.optimize, fail the trials
                for r in asked:
                    study.tell(r.trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
    except KeyboardInterrupt:  # also while the heartbeats stop: fail each as "interrupted", queue it again
        for r in asked:
            _requeue_interrupted(study, r.trial.number)
        raise
    with deferred_stop():  # trained is told: a stop signal now waits until every result is written
        for r, outcome in zip(asked, outcomes, strict=True):
            if isinstance(outcome, optuna.TrialPruned):
                finished.append(study.tell(r.trial, state=TrialState.PRUNED))
                _logger.info(f"Trial {r.trial.number} pruned. {outcome}")
            elif isinstance(outcome, BaseException):
                _log_failed(r.trial.number, r.trial.params, outcome)
                finished.append(study.tell(r.trial, state=TrialState.FAIL))
            else:
                finished.append(study.tell(r.trial, outcome))
                _logger.info(f"Trial {r.trial.number} finished with value: {outcome} and parameters: "
                             f"{r.trial.params}.")
    return finished


def _log_failed(number: int, params: dict, e: BaseException) -> None:
    """The lines study.optimize logs for a trial that raised (its traceback included)."""
    _logger.warning(f"Trial {number} failed with parameters: {params} because of the following "
                    f"error: {e!r}.", exc_info=(type(e), e, e.__traceback__))
    _logger.warning(f"Trial {number} failed with value None.")


def _requeue_interrupted(study: optuna.Study, number: int) -> None:
    """Fail trial `number` with reason "interrupted" (when the interrupt came before Optuna
    could) and queue its parameters again. Best effort: if the storage cannot be reached now,
    the trial stays RUNNING and the next run's dead-worker check fails and re-queues it."""
    try:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if trial is not None and trial.state == TrialState.RUNNING:
            trial = fail_trial(study, trial, INTERRUPTED)
        if trial is not None and trial.state == TrialState.FAIL:
            retry_trial(study, trial, max_retry=None)
    except Exception:  # noqa: BLE001 - a storage error here must not hide the interrupt
        pass


def _requeue_trials_of(study: optuna.Study, pids: set[int]) -> None:
    """The trials still RUNNING under processes `pids` of this host, which have all stopped:
    failed "interrupted" and queued again, as each worker does for its own when it can."""
    host = socket.gethostname()
    try:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # noqa: BLE001 - the storage may be what is gone: the next run's check
        return
    for t in running:
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == host and worker.get("pid") in pids:
            _requeue_interrupted(study, t.number)


# --------------------------------------------------------------------------------------------
# Worker processes (--workers N)
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerExit:
    """A worker process that did not end normally."""

    worker: int
    pid: int
    exitcode: int
    error: str = ""  # its UserError (bad input only a worker could see), if that stopped it

    def describe(self) -> str:
        who = f"worker {self.worker} (pid {self.pid})"
        if self.error:
            return f"{who}: {self.error}"
        if self.exitcode < 0:
            return f"{who} was killed by {signal.Signals(-self.exitcode).name}"
        if self.exitcode == EXIT_INTERRUPTED:
            return f"{who} was interrupted"
        if self.exitcode == 128 + signal.SIGTERM:
            return f"{who} was stopped by SIGTERM"
        return f"{who} exited with code {self.exitcode} (see its error above)"


def _worker_main(cfg_dict: dict, worker: int, verbosity: int, handled: tuple[int, ...],
                 errors: multiprocessing.SimpleQueue, parent: int) -> None:
    """Entry point of a `--workers` process (multiprocessing spawn). It starts with SIGINT and
    SIGTERM blocked (the parent's signal mask while it started us), so one that comes while it
    imports waits, and leaves no traceback; from here on the signals in `handled` (those the
    parent handles) stop it the way `stop_once` says. On Linux a worker also gets SIGTERM
    when its parent dies (killed, so that it could not stop its workers): it stops like this
    rather than train on alone."""
    for s in handled:
        signal.signal(s, stop_once)
    optuna.logging.set_verbosity(verbosity)
    try:
        if signal.SIGTERM in handled:
            _sigterm_when_parent_dies(parent)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending one is raised here
        run_worker(from_dict(cfg_dict))
    except KeyboardInterrupt as e:
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    except UserError as e:
        errors.put((worker, str(e)))
        sys.exit(EXIT_BAD_INPUT)
    except Exception as e:  # a full disk met inside a trial, behind Optuna's AssertionError
        full = storage_failure(e)
        if full is None:
            raise
        errors.put((worker, str(full)))
        sys.exit(EXIT_BAD_INPUT)


def _sigterm_when_parent_dies(parent: int) -> None:
    """Linux: ask the kernel for SIGTERM when the parent process (pid `parent`) dies
    (prctl PR_SET_PDEATHSIG); if it is gone already, send it now. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker_processes(cfg: Config, workers: int, on_poll: Callable[[], None],
                         study: optuna.Study | None = None) -> list[WorkerExit]:
    """Run `workers` processes of `run_worker` on the study of `cfg` and wait for them all,
    calling on_poll() every POLL_S meanwhile. A worker that dies does not stop the others
    (its trial is failed and retried by them). Returns the workers that did not end normally.

    On Ctrl-C or SIGTERM (KeyboardInterrupt; `stop_signals` is on here): every worker gets the
    same signal (also when only this process got it), has STOP_WAIT_S to re-queue its trial,
    is killed after that; the trials the workers left RUNNING in `study` (one killed before it
    could re-queue, or whose storage write failed) are re-queued here; then the interrupt
    propagates, and no worker is left running.
    Should this process be killed (SIGKILL), its workers get SIGTERM (Linux) and stop alike."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding DB handles
    errors = ctx.SimpleQueue()
    main = threading.current_thread() is threading.main_thread()
    with stop_signals():
        handled = tuple(s for s in STOP_SIGNALS if main and signal.getsignal(s) is stop_once)
        procs = [ctx.Process(target=_worker_main, name=f"mupsweep-tune-{k}",
                             args=(to_dict(cfg), k, optuna.logging.get_verbosity(), handled, errors,
                                   os.getpid()))
                 for k in range(workers)]
        try:
            for p in procs:
                # The worker inherits the blocked mask (see _worker_main); a signal this
                # process gets meanwhile is raised once the worker is known, then stops it.
                with deferred_stop():  # not between its fork and its Process knowing its pid
                    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                    try:
                        p.start()
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            # is_alive() reaps a dead worker: every one is asked (no short-circuit), so none
            # stays a zombie that the dead-worker check would take for alive.
            while any([p.is_alive() for p in procs]):
                time.sleep(POLL_S)
                on_poll()
        except KeyboardInterrupt as e:
            _stop(procs, main, getattr(e, "signum", signal.SIGINT))
            if study is not None:
                _requeue_trials_of(study, {p.pid for p in procs if p.pid is not None})
            raise
    for p in procs:
        p.join()
    messages = {}
    while not errors.empty():
        k, message = errors.get()
        messages[k] = message
    return [WorkerExit(k, p.pid or 0, p.exitcode or 0, messages.get(k, ""))
            for k, p in enumerate(procs) if p.exitcode]


@contextlib.contextmanager
def _stop_signals_ignored(main: bool) -> Iterator[None]:
    if not main:
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop(procs: list[multiprocessing.process.BaseProcess], main: bool, signum: int) -> None:
    """After Ctrl-C or SIGTERM: send `signum` to every worker until it exits (one still
    starting up holds it until it can handle it), for at most STOP_WAIT_S; then kill what is
    left (its trial stays RUNNING until the next run's dead-worker check fails and re-queues
    it). Workers never started are skipped."""
    started = [p for p in procs if p.pid is not None]
    with _stop_signals_ignored(main):
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            alive = [p for p in started if p.is_alive()]
            if not alive:
                break
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)
            alive[0].join(0.5)
        for p in started:
            if p.is_alive():
                p.kill()
            p.join()
