"""The study: create or load it in its storage, record the base config, refuse a study made
for another model, pick the sampler and pruner, and keep a grid exact.

A grid (sweep.sampler=grid) is not sampled: its points are enqueued once, when `tune` opens
the study (`enqueue_grid`, idempotent on resume), and every worker pops them from Optuna's
queue, which hands each WAITING trial to one worker only. A trial that finds its point already
run, or no point at all, yields before it trains (`grid_conflict`), so each point runs exactly
once whatever the number of workers; a point whose trial failed is enqueued again.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mupsweep.config import Config, SweepParam, to_dict
from mupsweep.errors import UserError
from mupsweep.storage import open_for_tune, redact_text, storage_spec
from mupsweep.sweep.space import grid, grid_points, point_key, search_space
from mupsweep.util import first_line


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
            grid(params)  # a float axis without a step fails here, before any worker starts
            # Optuna's GridSampler is not exact under parallel workers (each worker shuffles the
            # grid with its own seed; two may pick one point). The points are enqueued instead
            # (enqueue_grid); this sampler only meets a trial that found none waiting, and that
            # trial yields before it samples anything (grid_conflict).
            return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"sweep.sampler={name!r}: use tpe, gp, random or grid")


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """The pruner named by sweep.pruner; it sees the intermediate values that
    mupsweep.sweep.objective reports."""
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


def _model_signature(cfg: Config) -> dict[str, Any]:
    """What must match for trials of one study to be comparable."""
    m = cfg.model
    signature = {"arch": m.arch, "parametrization": m.parametrization, "depth": m.depth,
                 "head_dim": m.head_dim, "patch_size": m.patch_size,
                 "proxy_widths": list(cfg.sweep.proxy_widths), "data": cfg.data.name}
    if m.depth_parametrization != "none":  # only then: studies made before it still match
        signature.update(depth_parametrization=m.depth_parametrization,
                         base_depth=m.base_depth, depth_alpha=m.depth_alpha)
    return signature


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
