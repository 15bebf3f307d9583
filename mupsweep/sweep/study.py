"""The study: create or load it in its storage, record the base config, refuse a study made
for another model, and pick the sampler and pruner."""

from __future__ import annotations

import warnings
from typing import Any

import optuna

from mupsweep.config import Config, SweepParam, to_dict
from mupsweep.errors import UserError
from mupsweep.storage import open_for_tune, redact_text, storage_spec
from mupsweep.sweep.space import grid, search_space
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
            return optuna.samplers.GridSampler(grid(params), seed=seed)
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
