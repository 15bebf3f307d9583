"""The search space: the default axes, checks of `sweep.params`, how each axis is suggested,
its Optuna parameter name, and the grid for sweep.sampler=grid. Which keys are no
hyperparameters (and why) each key declares in the schema (`mupsweep.config.schema`)."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

from optuna.trial import Trial

from mupsweep.config import (
    Config,
    SweepConfig,
    SweepParam,
    check_config,
    set_by_path,
    why_not_a_hyperparameter,
)
from mupsweep.errors import UserError
from mupsweep.util import MISSING, get_dotted

# The largest learning rate a trial can train at. Adam's update of each weight is about lr in
# size whatever the gradient's scale, while a weight's own scale is ~1 or less (init std
# init_mult / sqrt(fan_in), norm gains 1): at lr > 1 every step moves every weight by more than
# its own scale, so the loss diverges within a few steps and the trial is pruned or fails. A
# search axis of optim.lr whose every value is above it is refused before any trial runs
# (`check_trainable_lr`); one that merely reaches above it is left to the pruner. validate's
# --log2-lr grid may use the same bound.
MAX_TRAINABLE_LR = 1.0

# Appended to the Optuna name of a log2 axis: the trial records the exponent, the config the
# value 2**exponent.
LOG2_SUFFIX = ":log2"


def default_params() -> list[SweepParam]:
    """The paper's search space: log2 of lr, init multiplier and output multiplier."""
    return [
        SweepParam(name="optim.lr", type="float", low=-14, high=-6, log2=True),
        SweepParam(name="model.init_mult", type="float", low=-2, high=2, log2=True),
        SweepParam(name="model.output_mult", type="float", low=-3, high=3, log2=True),
    ]


def given_params(sweep: SweepConfig) -> list[SweepParam] | None:
    """`sweep.params` as SweepParams, or None when it is not given (the default space)."""
    if sweep.params is None:
        return None
    return [p if isinstance(p, SweepParam) else SweepParam(**p) for p in sweep.params]


def resolved_params(cfg: Config) -> list[SweepParam]:
    """The axes a study sweeps, unchecked: `sweep.params`, or the default space when it is not
    given (None) or empty (a base config recorded before None meant "not given" says []).
    `study.signature` reads a recorded config through this; `search_space` checks a new one."""
    return given_params(cfg.sweep) or default_params()


def search_space(cfg: Config) -> list[SweepParam]:
    """`sweep.params`, or the default space when it is not given; each entry checked. An empty
    list given explicitly sweeps nothing: it is refused."""
    params = given_params(cfg.sweep)
    if params == []:
        raise UserError("sweep.params=[] sweeps nothing: every trial would train the same "
                        "config; drop sweep.params to sweep the default space (log2 optim.lr, "
                        "model.init_mult, model.output_mult), or list the axes to sweep")
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
        why = why_not_a_hyperparameter(p.name)  # each key declares it in the schema
        if why:
            raise UserError(f"{where}: {p.name} is not a hyperparameter and cannot be swept: {why}")
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
        if p.name == "optim.lr":
            check_trainable_lr(p, where)
    # Every corner of the space must give a valid config at every proxy width, so a typo
    # (optim.lr low=-1e9 on a linear scale, a width not divisible by head_dim) fails now.
    for p in params:
        for value in corners(p):
            for width in cfg.sweep.proxy_widths:
                probe = copy.deepcopy(cfg)
                set_by_path(probe, p.name, value)
                set_by_path(probe, "model.width", width)
                try:
                    check_config(probe)
                except UserError as e:
                    raise UserError(f"sweep.params {p.name}={value} at proxy width {width}: {e}") from None
    return params


def check_trainable_lr(p: SweepParam, where: str) -> None:
    """Refuse an optim.lr axis whose every value is above MAX_TRAINABLE_LR: no trial would
    train, and the sweep would only find that out by failing each one."""
    if p.type == "categorical":
        values = list(p.choices or [])
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return  # a non-number: the corner check names it
        lowest = min(values)
        shown = f"choices {', '.join(f'{v:g}' for v in values)}"
    else:
        lowest = 2.0**p.low if p.log2 else p.low
        shown = (f"log2 exponents {p.low:g}..{p.high:g}, lr {2.0**p.low:g}..{2.0**p.high:g}"
                 if p.log2 else f"{p.low:g}..{p.high:g}")
    if lowest > MAX_TRAINABLE_LR:
        raise UserError(f"{where}: every value is above lr = {MAX_TRAINABLE_LR:g} ({shown}): Adam "
                        "at lr > 1 moves every weight by more than its own scale each step, so "
                        "no trial would train; lower the range below 1 (the default space is "
                        "log2: true, low: -14, high: -6, lr 6.1e-05..0.0156)")


def _check_key(cfg: Config, key: str, where: str) -> None:
    """The key must name a leaf value of the config (not a whole section)."""
    value = get_dotted(cfg, key)
    if value is MISSING:
        raise UserError(f"{where}: unknown config key {key!r}")
    if hasattr(value, "__dataclass_fields__"):
        raise UserError(f"{where}: {key!r} is a config section; name one of its fields")
    set_by_path(copy.deepcopy(cfg), key, value)  # raises UserError for keys set_by_path cannot reach


def corners(p: SweepParam) -> list[Any]:
    """The values at the ends of an axis (every choice of a categorical one), as the config
    gets them."""
    if p.type == "categorical":
        return list(p.choices or [])
    values = [p.low, p.high]
    if p.log2:
        return [2.0**v for v in values]
    return [int(v) for v in values] if p.type == "int" else [float(v) for v in values]


def optuna_name(p: SweepParam) -> str:
    """The Optuna parameter name: the config key, with `:log2` when the exponent is sampled."""
    return f"{p.name}{LOG2_SUFFIX}" if p.log2 else p.name


def config_values(optuna_params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optuna_name`: a trial's Optuna params as {config key: resolved value}."""
    return {k.removesuffix(LOG2_SUFFIX): (2.0**v if k.endswith(LOG2_SUFFIX) else v)
            for k, v in optuna_params.items()}


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


def grid_points(params: list[SweepParam]) -> list[dict[str, Any]]:
    """Every point of the grid, as Optuna params {optuna name: value}, in a fixed order."""
    space = grid(params)
    return [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]


def point_key(point: dict[str, Any]) -> tuple:
    """A hashable identity of a grid point; floats rounded so 0.1 + 0.2 matches 0.3."""
    return tuple(sorted((k, round(v, 9) if isinstance(v, float) else v) for k, v in point.items()))
