"""One trial: suggest the HPs, train them at every proxy width with `mupsweep.train.train`,
report the validation losses to the pruner, and record the cost.

Intermediate values (what the pruner sees) are the validation losses of every width in turn,
on one step axis: width i's step s is reported as `i * (train.steps + 1) + s`. Every trial
trains the widths in the same order, so the pruner compares like with like, and a bad HP set
is usually pruned on the first (cheapest) width. Step 0 (before any update) is not reported.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import Trial

from mupsweep.config import Config, SweepParam, check_config, set_by_path
from mupsweep.data import ImageDataset
from mupsweep.errors import UserError
from mupsweep.parametrize import build_model, data_spec_of, make_conditioner
from mupsweep.rundir import new_run_dir
from mupsweep.storage import redact_text, redact_url
from mupsweep.sweep.space import corners, suggest
from mupsweep.train import resolve_device
from mupsweep.train import train as run_train
from mupsweep.util import first_line


def trial_config(cfg: Config, hparams: dict[str, Any], width: int, run_dir: Path) -> Config:
    """The base config with the trial's values at one proxy width: no checkpoints, no resume
    (a trial always starts fresh, in a new `run_dir`), no per-step progress bar, and the
    storage URL's password hidden (train() writes this config into the trial's run dir)."""
    run_cfg = copy.deepcopy(cfg)
    for key, value in hparams.items():
        set_by_path(run_cfg, key, value)
    set_by_path(run_cfg, "model.width", width)
    set_by_path(run_cfg, "sweep.storage", redact_url(cfg.sweep.storage))
    set_by_path(run_cfg, "train.save", False)
    set_by_path(run_cfg, "train.resume", False)
    set_by_path(run_cfg, "train.progress", False)
    set_by_path(run_cfg, "train.run_dir", str(run_dir))
    check_config(run_cfg)
    return run_cfg


def check_trial_setup(cfg: Config, params: list[SweepParam], dataset: ImageDataset) -> None:
    """Build what a trial builds before training, at every proxy width, so a config that
    cannot run fails here (one UserError) rather than in every trial of every worker: the
    device, the conditioner (captions, text encoder) and the model on the meta device (no
    memory, no init cost). Swept int and categorical model.* axes are built at each of their
    corners (they may change shapes); a float axis only scales values."""
    resolve_device(cfg.train.device)
    shape_axes = [{p.name: v} for p in params
                  if p.name.startswith("model.") and p.type in ("int", "categorical") for v in corners(p)]
    specs: dict[str, Any] = {}  # a text model's conditioner encodes captions: once per setting
    for width in cfg.sweep.proxy_widths:
        for hparams in [{}, *shape_axes]:
            run_cfg = trial_config(cfg, hparams, width, Path(cfg.sweep.out_dir) / "trials")
            key = repr((run_cfg.model.arch, run_cfg.model.extra))
            if key not in specs:
                specs[key] = make_conditioner(run_cfg, dataset).data_spec
            spec = specs[key]
            try:
                with torch.device("meta"):
                    build_model(run_cfg.model, spec, "meta")
            except ValueError as e:
                where = "".join(f" {k}={v}" for k, v in hparams.items())
                raise UserError(f"model config at proxy width {width}{where}: {e}") from None


def objective(trial: Trial, cfg: Config, params: list[SweepParam], dataset: ImageDataset) -> float:
    """Suggest the HPs, train them at every proxy width, return the mean final loss.

    User attrs: hparams, losses (per width), flops, wall_time_s, reason (why pruned/failed)."""
    hparams = suggest(trial, params)
    trial.set_user_attr("hparams", hparams)
    losses: dict[str, float] = {}
    cost = {"flops": 0.0, "flops_per_step": 0.0, "step": 0}
    t0 = time.perf_counter()
    try:
        spec = data_spec_of(dataset)
        for i, width in enumerate(cfg.sweep.proxy_widths):
            # A new directory (w64, or w64-1 beside a stale one from an earlier study)
            run_dir = new_run_dir(Path(cfg.sweep.out_dir) / "trials" / f"{trial.number:05d}", f"w{width}")
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
