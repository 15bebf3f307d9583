"""`mupsweep tune`: an Optuna study of the muP hyperparameters on narrow proxy models.

A trial suggests a value for every search-space axis (`sweep.params`), then calls the one
training loop, `mupsweep.train.train`, once per proxy width with an `on_eval` callback that
reports the validation loss to Optuna. The objective is the mean final validation loss over
the proxy widths.

Intermediate values (what the pruner sees) are the validation losses of every width in turn,
on one step axis: width i's step s is reported as `i * (train.steps + 1) + s`. Every trial
trains the widths in the same order, so the pruner compares like with like, and a bad HP set
is usually pruned on the first (cheapest) width. Step 0 (before any update) is not reported.

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

import copy
import json
import math
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import Console

from mupsweep.config import Config, SweepParam, check_config, from_dict, set_by_path, to_dict
from mupsweep.errors import UserError
from mupsweep.optuna_adapter import fail_trial
from mupsweep.report import json_safe
from mupsweep.storage import label_of, open_for_tune, redact_text, storage_spec, uses_heartbeat
from mupsweep.util import first_line

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the states the budget counts
POLL_S = 1.0  # how often a waiting worker / the parent of --workers looks at the storage
MAX_CONSECUTIVE_FAILURES = 3  # a worker whose trials keep failing stops (the config is broken)


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


def default_params() -> list[SweepParam]:
    """The paper's search space: log2 of lr, init multiplier and output multiplier."""
    return [
        SweepParam(name="optim.lr", type="float", low=-14, high=-6, log2=True),
        SweepParam(name="model.init_mult", type="float", low=-2, high=2, log2=True),
        SweepParam(name="model.output_mult", type="float", low=-3, high=3, log2=True),
    ]


def search_space(cfg: Config) -> list[SweepParam]:
    """`sweep.params`, or the default space when it is empty; each entry checked."""
    params = [p if isinstance(p, SweepParam) else SweepParam(**p) for p in cfg.sweep.params]
    params = params or default_params()
    seen: set[str] = set()
    for i, p in enumerate(params):
        where = f"sweep.params[{i}] ({p.name or 'no name'})"
        if not p.name:
            raise UserError(f"{where}: give name, the config key to sweep (e.g. optim.lr)")
        if p.name in seen:
            raise UserError(f"{where}: {p.name} appears twice in sweep.params")
        seen.add(p.name)
        _check_key(cfg, p.name, where)
        if p.type == "categorical":
            if not p.choices:
                raise UserError(f"{where}: type categorical needs a non-empty choices list")
        elif p.type in ("float", "int"):
            if p.low is None or p.high is None:
                raise UserError(f"{where}: type {p.type} needs low and high")
            if not p.low < p.high:
                raise UserError(f"{where}: low={p.low} must be < high={p.high}")
            if p.log and p.log2:
                raise UserError(f"{where}: set log or log2, not both")
            if p.log and p.low <= 0:
                raise UserError(f"{where}: log=true needs low > 0 (or use log2 exponents)")
            if p.step is not None and not p.step > 0:
                raise UserError(f"{where}: step={p.step} must be > 0")
            if p.type == "int" and p.log2:
                raise UserError(f"{where}: log2 applies to type float only")
        else:
            raise UserError(f"{where}: type={p.type!r}: use float, int or categorical")
    # Every corner of the space must give a valid config at every proxy width, so a typo
    # (optim.lr low=-1e9 on a linear scale, a width not divisible by head_dim) fails now.
    for p in params:
        for value in _corners(p):
            for width in cfg.sweep.proxy_widths:
                probe = copy.deepcopy(cfg)
                set_by_path(probe, p.name, value)
                set_by_path(probe, "model.width", width)
                try:
                    check_config(probe)
                except UserError as e:
                    raise UserError(f"sweep.params {p.name}={value} at proxy width {width}: {e}") from None
    return params


def _check_key(cfg: Config, key: str, where: str) -> None:
    """The key must name a leaf value of the config (not a whole section)."""
    probe = copy.deepcopy(cfg)
    obj: Any = probe
    try:
        for part in key.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    except (AttributeError, KeyError):
        raise UserError(f"{where}: unknown config key {key!r}") from None
    if hasattr(obj, "__dataclass_fields__"):
        raise UserError(f"{where}: {key!r} is a config section; name one of its fields")
    set_by_path(probe, key, obj)  # raises UserError for keys set_by_path cannot reach


def _corners(p: SweepParam) -> list[Any]:
    if p.type == "categorical":
        return list(p.choices or [])
    values = [p.low, p.high]
    if p.log2:
        return [2.0**v for v in values]
    return [int(v) for v in values] if p.type == "int" else [float(v) for v in values]


def optuna_name(p: SweepParam) -> str:
    """The Optuna parameter name: the config key, with `:log2` when the exponent is sampled."""
    return f"{p.name}:log2" if p.log2 else p.name


def suggest(trial: Trial, params: list[SweepParam]) -> dict[str, Any]:
    """Ask the trial for one value per axis; returns {config key: resolved value}."""
    hparams: dict[str, Any] = {}
    for p in params:
        name = optuna_name(p)
        if p.type == "categorical":
            hparams[p.name] = trial.suggest_categorical(name, list(p.choices or []))
        elif p.type == "int":
            step = int(p.step) if p.step else 1
            hparams[p.name] = trial.suggest_int(name, int(p.low), int(p.high), step=step, log=p.log)
        elif p.log2:
            exponent = trial.suggest_float(name, float(p.low), float(p.high), step=p.step)
            hparams[p.name] = 2.0**exponent
        else:
            hparams[p.name] = trial.suggest_float(name, float(p.low), float(p.high),
                                                  step=p.step, log=p.log)
    return hparams


def grid(params: list[SweepParam]) -> dict[str, list[Any]]:
    """GridSampler's search space. log2 axes: exponents low..high by `step` (default 1)."""
    space: dict[str, list[Any]] = {}
    for p in params:
        if p.type == "categorical":
            space[optuna_name(p)] = list(p.choices or [])
            continue
        step = p.step if p.step else (1 if p.log2 or p.type == "int" else None)
        if step is None:
            raise UserError(f"sweep.sampler=grid: give {p.name} a step (or choices)")
        n = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
        values = [p.low + k * step for k in range(n)]
        space[optuna_name(p)] = [int(v) for v in values] if p.type == "int" else [float(v) for v in values]
    return space


# --------------------------------------------------------------------------------------------
# Sampler and pruner
# --------------------------------------------------------------------------------------------


def make_sampler(cfg: Config, params: list[SweepParam], worker: int = 0) -> optuna.samplers.BaseSampler:
    """Worker k seeds its sampler with sweep.seed + k, so parallel workers do not draw the same
    start-up points. (Another machine joining the study should use another sweep.seed.)"""
    name, seed = cfg.sweep.sampler, cfg.sweep.seed + worker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            return optuna.samplers.GridSampler(grid(params), seed=seed)
    raise UserError(f"sweep.sampler={name!r}: use tpe, gp, random or grid")


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    name = cfg.sweep.pruner
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"sweep.pruner={name!r}: use hyperband, successive_halving, median or none")


def trial_budget(cfg: Config, params: list[SweepParam]) -> int:
    """n_trials, but never more than the grid has points (GridSampler would repeat them)."""
    if cfg.sweep.sampler == "grid":
        return min(cfg.sweep.n_trials, math.prod(len(v) for v in grid(params).values()))
    return cfg.sweep.n_trials


def _model_signature(cfg: Config) -> dict[str, Any]:
    """What must match for trials of one study to be comparable."""
    m = cfg.model
    return {"arch": m.arch, "parametrization": m.parametrization, "depth": m.depth,
            "head_dim": m.head_dim, "patch_size": m.patch_size,
            "proxy_widths": list(cfg.sweep.proxy_widths), "data": cfg.data.name}


def open_study(cfg: Config, params: list[SweepParam] | None = None, worker: int = 0) -> optuna.Study:
    """Create or load the study; record the base config; refuse a study made for another model."""
    if not cfg.sweep.study or not cfg.sweep.study.strip():
        raise UserError("sweep.study is empty: give a study name (--study NAME)")
    params = params if params is not None else search_space(cfg)
    spec = storage_spec(cfg)
    storage = open_for_tune(cfg, spec)
    try:
        study = optuna.create_study(study_name=cfg.sweep.study, storage=storage,
                                    sampler=make_sampler(cfg, params, worker),
                                    pruner=make_pruner(cfg), direction="minimize",
                                    load_if_exists=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot open study {cfg.sweep.study!r} in {spec.label}: "
                        f"{redact_text(first_line(e))}") from None
    attrs = study.user_attrs
    signature = _model_signature(cfg)
    if "model_signature" in attrs:
        old = attrs["model_signature"]
        diff = [k for k in signature if old.get(k) != signature[k]]
        if diff:
            k = diff[0]
            raise UserError(f"study {cfg.sweep.study!r} in {spec.label} was run with {k}={old.get(k)!r}, "
                            f"this config has {k}={signature[k]!r}; use another --study name")
    else:
        base = to_dict(cfg)
        base["sweep"]["storage"] = spec.label  # never store a password in the study
        study.set_user_attr("base_config", base)
        study.set_user_attr("parametrization", cfg.model.parametrization)
        study.set_user_attr("proxy_widths", list(cfg.sweep.proxy_widths))
        study.set_user_attr("model_signature", signature)
        study.set_user_attr("storage", spec.label)
    return study


# --------------------------------------------------------------------------------------------
# The objective: suggest, then train each proxy width
# --------------------------------------------------------------------------------------------


def trial_config(cfg: Config, hparams: dict[str, Any], width: int, run_dir: Path) -> Config:
    """The base config with the trial's values at one proxy width: no checkpoints, no resume
    (a trial always starts fresh), no per-step progress bar."""
    run_cfg = copy.deepcopy(cfg)
    for key, value in hparams.items():
        set_by_path(run_cfg, key, value)
    set_by_path(run_cfg, "model.width", width)
    set_by_path(run_cfg, "train.save", False)
    set_by_path(run_cfg, "train.resume", False)
    set_by_path(run_cfg, "train.progress", False)
    set_by_path(run_cfg, "train.run_dir", str(run_dir))
    check_config(run_cfg)
    return run_cfg


def objective(trial: Trial, cfg: Config, params: list[SweepParam], dataset) -> float:
    """Suggest the HPs, train them at every proxy width, return the mean final loss.

    User attrs: hparams, losses (per width), flops, wall_time_s, reason (why pruned/failed)."""
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
    hparams = suggest(trial, params)
    trial.set_user_attr("hparams", hparams)
    losses: dict[str, float] = {}
    cost = {"flops": 0.0, "flops_per_step": 0.0, "step": 0}
    t0 = time.perf_counter()
    try:
        from mupsweep.train import data_spec_of
        from mupsweep.train import train as run_train

        spec = data_spec_of(dataset)
        for i, width in enumerate(cfg.sweep.proxy_widths):
            run_dir = Path(cfg.sweep.out_dir) / "trials" / f"{trial.number:05d}" / f"w{width}"
            run_cfg = trial_config(cfg, hparams, width, run_dir)
            offset, start = i * (run_cfg.train.steps + 1), {}
            cost["step"] = 0

            def on_model(model, run_cfg=run_cfg) -> None:
                # train() counts FLOPs the same way; a pruned run never returns its result.
                cost["flops_per_step"] = 3 * model.flops_per_image(spec) * run_cfg.train.batch_size

            def on_eval(step: int, loss: float, width=width, offset=offset, start=start,
                        run_cfg=run_cfg) -> None:
                cost["step"] = step
                if step == 0:
                    start["loss"] = loss
                    return
                # A diverged loss is train()'s to flag (with its reason), not the pruner's.
                if not math.isfinite(loss) or loss > run_cfg.train.diverge_factor * start.get("loss", math.inf):
                    return
                trial.report(loss, offset + step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned by {cfg.sweep.pruner} at width {width} "
                                             f"step {step} (validation loss {loss:.4g})")

            try:
                result = run_train(run_cfg, on_eval=on_eval, dataset=dataset, on_model=on_model)
            except BaseException:
                cost["flops"] += cost["flops_per_step"] * cost["step"]
                raise
            cost["flops"] += result.flops
            if result.diverged:
                raise optuna.TrialPruned(f"diverged at width {width}: {result.reason}")
            losses[str(width)] = result.validation_loss
            trial.set_user_attr("losses", losses)
        return sum(losses.values()) / len(losses)
    except optuna.TrialPruned as e:
        trial.set_user_attr("reason", str(e))
        raise
    except Exception as e:
        trial.set_user_attr("reason", redact_text(first_line(f"{type(e).__name__}: {e}")))
        raise
    finally:
        trial.set_user_attr("flops", cost["flops"])
        trial.set_user_attr("wall_time_s", time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# A worker: run trials until the global budget is met
# --------------------------------------------------------------------------------------------


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
    from mupsweep.data import load_dataset

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


def _run_one(study: optuna.Study, cfg: Config, params: list[SweepParam], dataset,
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


# --------------------------------------------------------------------------------------------
# tune: one worker in this process, or N worker processes
# --------------------------------------------------------------------------------------------


def tune(cfg: Config, workers: int = 1) -> optuna.Study:
    """Run the sweep in `cfg.sweep` to its global budget and write trials.csv and best.json.

    workers > 1 starts that many worker processes on the same storage and study (and this
    process only watches); the same call on another machine with the same storage adds more."""
    if workers < 1:
        raise UserError(f"--workers={workers} must be >= 1")
    params = search_space(cfg)  # validate everything before any process starts
    study = open_study(cfg, params)  # creates the study once, before workers race for it
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
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding DB handles
            procs = [ctx.Process(target=_worker_main, args=(to_dict(cfg), k, optuna.logging.get_verbosity()),
                                 name=f"mupsweep-tune-{k}") for k in range(workers)]
            for p in procs:
                p.start()
            try:
                while any(p.is_alive() for p in procs):
                    time.sleep(POLL_S)
                    progress.update(study)
            finally:
                for p in procs:
                    p.join()
            bad = [f"worker {k} exit code {p.exitcode}" for k, p in enumerate(procs) if p.exitcode]
            if bad:
                progress.update(study)
                raise RuntimeError("; ".join(bad))
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


# --------------------------------------------------------------------------------------------
# Results: the best document (read by transfer / report), trials.csv, best.json
# --------------------------------------------------------------------------------------------


def _hparams_of(t: FrozenTrial) -> dict[str, Any]:
    """Resolved config values; from the params when a trial died before recording them."""
    if "hparams" in t.user_attrs:
        return dict(t.user_attrs["hparams"])
    return {k.removesuffix(":log2"): (2.0**v if k.endswith(":log2") else v) for k, v in t.params.items()}


def best_document(study: optuna.Study) -> dict[str, Any]:
    """The sweep's result: best trial, its resolved HPs, base config, cost and every trial.

    This is the interface `transfer` and `report` read (from best.json or from a storage)."""
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(complete, key=lambda t: (t.value, t.number)) if complete else None
    rows = []
    for t in trials:
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "hparams": _hparams_of(t), "losses": dict(t.user_attrs.get("losses") or {}),
                     "flops": float(t.user_attrs.get("flops", 0.0)),
                     "wall_time_s": float(t.user_attrs.get("wall_time_s", 0.0)),
                     "reason": t.user_attrs.get("reason", "")})
    return {
        "study": study.study_name,
        "storage": label_of(study),
        "parametrization": attrs.get("parametrization"),
        "value": best.value if best else None,
        "trial": best.number if best else None,
        "hparams": _hparams_of(best) if best else {},
        "proxy_widths": list(attrs.get("proxy_widths") or []),
        "base_config": attrs.get("base_config", {}),
        "cost": {"flops": sum(r["flops"] for r in rows),
                 "wall_time_s": sum(r["wall_time_s"] for r in rows),
                 "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
                 "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
                 "n_failed": sum(t.state == TrialState.FAIL for t in trials)},
        "trials": rows,
    }


def write_outputs(study: optuna.Study, out_dir: Path) -> dict[str, Any]:
    """Write out_dir/trials.csv (Optuna's dataframe) and out_dir/best.json; return the doc."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(out_dir / "trials.csv", index=False)
    doc = best_document(study)
    tmp = out_dir / f".best.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(json_safe(doc), indent=2) + "\n")
    os.replace(tmp, out_dir / "best.json")  # concurrent machines never leave a torn file
    return doc
