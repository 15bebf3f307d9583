"""The study: create or load it in its storage, record the base config, refuse to mix in
trials whose losses would not be comparable (the signature), pick the sampler and pruner, and
keep a grid exact.

A grid (sweep.sampler=grid) is not sampled: its points are enqueued once, when `tune` opens
the study (`enqueue_grid`, idempotent on resume), and every worker pops them from Optuna's
queue, which hands each WAITING trial to one worker only. A trial that finds its point already
run, or no point at all, yields before it trains (`grid_conflict`), so each point runs exactly
once whatever the number of workers; a point whose trial failed is enqueued again.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mupsweep.config import (
    Config,
    SweepConfig,
    SweepParam,
    from_dict,
    keys_outside_signature,
    to_dict,
)
from mupsweep.errors import UserError
from mupsweep.evaluation import metric_named
from mupsweep.rundir import without_passwords
from mupsweep.sweep.optuna_adapter import set_study_system_attr, study_system_attrs
from mupsweep.sweep.retry import retry_trial
from mupsweep.sweep.space import grid, grid_points, point_key, resolved_params, search_space
from mupsweep.sweep.storage import open_for_tune, redact_text, storage_spec
from mupsweep.util import first_line

# The study's base config: a system attribute, out of `optuna studies` and the dashboard's
# user attributes (mupsweep.sweep.optuna_adapter.set_study_system_attr says why).
BASE_CONFIG_ATTR = "mupsweep:base_config"


def study_base_config(study: optuna.Study) -> dict[str, Any]:
    """The base config the study recorded when it was created ({} if none): a system
    attribute; studies made before it moved there keep it in their user attributes."""
    return study_system_attrs(study).get(BASE_CONFIG_ATTR) or study.user_attrs.get("base_config") or {}


# --------------------------------------------------------------------------------------------
# Sampler and pruner
# --------------------------------------------------------------------------------------------


def make_sampler(cfg: SweepConfig, params: list[SweepParam]) -> optuna.samplers.BaseSampler:
    """The sampler named by sweep.sampler (`cfg` is the sweep section). tpe, gp and random are seeded per trial (see
    `TrialSeededSampler`). grid is not sampled: Optuna's GridSampler is not exact under
    parallel workers (each shuffles the grid with its own seed; two may pick one point), so the
    points are enqueued instead (`enqueue_grid`); the sampler returned for it only meets a
    trial that found no point waiting, and that trial yields before it samples anything
    (`grid_conflict`)."""
    name = cfg.sampler
    if name == "grid":
        grid(params)  # a float axis without a step fails here, before any worker starts
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if name not in ("tpe", "gp", "random"):
        raise UserError(f"sweep.sampler={name!r}: use tpe, gp, random or grid")

    def make(seed: int) -> optuna.samplers.BaseSampler:
        if name == "tpe":
            # constant_liar: a running trial (another worker's, or an earlier member of this
            # worker's pack) counts as a bad result, so parallel asks do not all sample next to
            # the same good point.
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if name == "gp":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.GPSampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)

    return TrialSeededSampler(make, cfg.seed)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial `number` of a study swept with sweep.seed=`seed`."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler made afresh for each trial, seeded from sweep.seed and the trial's number.

    Trial numbers are unique in a study, so every trial draws from its own random stream: a
    re-run, a resumed study, another `--workers` process or another machine (same sweep.seed
    or not) never replays points already drawn. What is reproducible: with `random` (and the
    random start-up trials of tpe / gp), trial n gets the same point for the same sweep.seed,
    whichever worker runs it and whenever; a single worker's tpe / gp sweep repeats exactly,
    fresh or resumed, as long as the same trials are finished when each is sampled.
    What is not: with several workers, which trials are finished when a trial is sampled
    depends on timing, and so do tpe's and gp's later points. A re-queued trial (a dead or
    interrupted worker's) keeps its parameters and takes the next number.

    Samplers here keep no state across trials that a fresh one would lack (TPE and random
    read the history from the storage; GP only loses a warm start of its kernel fit)."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._sampler = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = self._make(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    """The pruner named by sweep.pruner (`cfg` is the sweep section); it sees the intermediate values that
    mupsweep.sweep.objective reports."""
    name = cfg.pruner
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"sweep.pruner={name!r}: use hyperband, successive_halving, median or none")


# --------------------------------------------------------------------------------------------
# Signature: what must match for the trials of one study to be comparable
# --------------------------------------------------------------------------------------------

def signature(cfg: Config) -> dict[str, Any]:
    """{dotted config key: value} for every key that can change a trial's loss, with
    "sweep.params" as the resolved search space (its swept keys left out).

    Which keys (or whole sections) cannot, each key declares in the schema (signature=False,
    listed by `mupsweep.config.keys_outside_signature`); every other key, a field added later
    included, is in the signature."""
    params = resolved_params(cfg)  # not given (None) or a recorded [] alike: the default space
    left_out = {*keys_outside_signature(), *(p.name for p in params)}
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if prefix in left_out:
            return
        if isinstance(value, dict) and prefix != "sweep.params":
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", to_dict(cfg))
    flat["sweep.params"] = [dataclasses.asdict(p) for p in params]
    return flat


def signature_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key old -> new' for every key whose value differs (a key one side lacks included)."""
    def show(side: dict[str, Any], key: str) -> str:
        return repr(side[key]) if key in side else "(unset)"

    return [f"{k} {show(old, k)} -> {show(new, k)}" for k in sorted(old.keys() | new.keys())
            if k not in old or k not in new or old[k] != new[k]]


def _check_signature(study: optuna.Study, cfg: Config, where: str) -> None:
    """Refuse a config whose trials would not be comparable with the study's.

    The study's side is derived from the base config it recorded when it was created (every
    mupsweep study does; older ones recorded only a "model_signature" beside it, which is
    ignored), read with today's schema: a field added since takes its default."""
    base = study_base_config(study)
    try:
        recorded = from_dict(base)
    except UserError as e:
        raise UserError(f"study {cfg.sweep.study!r} in {where} was made by another version of "
                        f"mupsweep (its recorded config does not load: {e}); use another --study "
                        "name") from None
    diff = signature_diff(signature(recorded), signature(cfg))
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UserError(f"study {cfg.sweep.study!r} in {where} was run with another config "
                        f"({shown}; study -> this run): its trials' losses are not comparable "
                        "with this run's; use another --study name")


# --------------------------------------------------------------------------------------------
# Open
# --------------------------------------------------------------------------------------------


def open_study(cfg: Config, params: list[SweepParam] | None = None,
               check_first: Callable[[optuna.Study], None] | None = None) -> optuna.Study:
    """Create or load the study; record the base config; refuse a config whose trials would
    not be comparable with the study's (`signature`). `check_first` runs on the loaded study
    before that signature check, for a caller whose own refusal says more (validate's grid)."""
    if not cfg.sweep.study or not cfg.sweep.study.strip():
        raise UserError("sweep.study is empty: give a study name (--study NAME)")
    params = params if params is not None else search_space(cfg)
    spec = storage_spec(cfg)
    max_retry = cfg.sweep.max_retry
    storage = open_for_tune(cfg, spec, on_stale=lambda study, trial: retry_trial(study, trial, max_retry))
    try:
        study = optuna.create_study(study_name=cfg.sweep.study, storage=storage,
                                    sampler=make_sampler(cfg.sweep, params),
                                    pruner=make_pruner(cfg.sweep),
                                    direction=metric_named(cfg.sweep.objective).direction,
                                    load_if_exists=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot open study {cfg.sweep.study!r} in {spec.label}: "
                        f"{redact_text(first_line(e))}") from None
    if check_first is not None:
        check_first(study)
    if study_base_config(study):
        _check_signature(study, cfg, spec.label)
    elif study.get_trials(deepcopy=False):
        raise UserError(f"study {cfg.sweep.study!r} in {spec.label} was not made by mupsweep tune "
                        "(it records no base config); use another --study name")
    else:
        base = to_dict(without_passwords(cfg))  # never store a password in the study
        base["sweep"]["storage"] = spec.label
        set_study_system_attr(study, BASE_CONFIG_ATTR, base)
        study.set_user_attr("parametrization", cfg.model.parametrization)
        study.set_user_attr("proxy_widths", list(cfg.sweep.proxy_widths))
        study.set_user_attr("storage", spec.label)
    if study.metric_names is None:  # optuna-dashboard says "sample_fd", not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([cfg.sweep.objective])
    return study


# --------------------------------------------------------------------------------------------
# An exact grid: enqueued points, each run once
# --------------------------------------------------------------------------------------------

# The states in which a trial holds its grid point: it will run, runs, or ran it.
_HOLDING = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def trial_point(t: FrozenTrial) -> tuple | None:
    """The grid point a trial holds: the params it was enqueued with, else the ones it drew;
    None for a trial that has neither yet."""
    point = t.system_attrs.get("fixed_params") or t.params
    return point_key(point) if point else None


def enqueue_grid(study: optuna.Study, params: list[SweepParam]) -> int:
    """Enqueue every grid point no trial holds (none WAITING, RUNNING, COMPLETE or PRUNED with
    it): all of them for a new study, the missing ones on resume or after a failed trial.
    Returns how many were enqueued."""
    held = {trial_point(t) for t in study.get_trials(deepcopy=False, states=_HOLDING)}
    added = 0
    for point in grid_points(params):
        if point_key(point) not in held:
            study.enqueue_trial(point)
            held.add(point_key(point))  # a value listed twice in choices is one point
            added += 1
    return added


def grid_conflict(study: optuna.Study, number: int) -> str | None:
    """Why trial `number` (just started) must not run, or None: it has no grid point (it was
    not popped from the queue), or another trial ran its point, or one with a lower number
    holds it. Every worker applies the same rule, so exactly one trial runs each point."""
    trials = study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == number)
    point = trial_point(me)
    if point is None:
        return "no grid point was waiting (the others are running or done)"
    for t in trials:
        if t.number == number or t.state not in _HOLDING or trial_point(t) != point:
            continue
        if t.state in _FINISHED or t.number < number:
            return f"grid point {dict(point)} is run by trial {t.number}"
    return None


def missing_grid_points(study: optuna.Study, params: list[SweepParam]) -> list[dict]:
    """The grid points without a COMPLETE or PRUNED trial, as Optuna params."""
    done = {trial_point(t) for t in study.get_trials(deepcopy=False, states=_FINISHED)}
    return [p for p in grid_points(params) if point_key(p) not in done]


def duplicate_grid_trials(study: optuna.Study) -> list[list[int]]:
    """Groups of finished trials that ran the same point (only an older mupsweep, whose grid
    was sampled, could leave them), each as its trial numbers."""
    by_point: dict[tuple, list[int]] = {}
    for t in study.get_trials(deepcopy=False, states=_FINISHED):
        by_point.setdefault(trial_point(t), []).append(t.number)
    return [numbers for numbers in by_point.values() if len(numbers) > 1]
