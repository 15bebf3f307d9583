"""Trials: suggest a trial's HPs, train them at every proxy width, report the objective
(sweep.objective: the validation loss unless another metric is named) to the pruner and record
the outcome and cost (`TrialRecord`). `train_trials` trains a group of
K >= 1 trials together (`train.train_group`: K = 1 is one trial alone, K > 1 a pack), width by
width, in the order of sweep.proxy_widths: at each width the trials still going form one group,
and a trial pruned or diverged at a width leaves there, exactly where it would stop alone.

Intermediate values (what the pruner sees and optuna-dashboard draws) are the first proxy
width's objective values at its own steps: every trial trains the widths in the same order,
so the pruner compares like with like and prunes a bad HP set on the first (cheapest) width;
under muP a set that is good at the first width stays good at the next. Every width's curve is
kept in the trial's "curves" user attribute, and every metric measured at each width's last
step in "metrics". Step 0 (before any update) is not reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import Trial

from mupsweep.config import Config, SweepParam, check_config, set_by_path
from mupsweep.data import ImageDataset
from mupsweep.errors import UserError
from mupsweep.evaluation import VALIDATION_LOSS, check_metrics, prepare_metrics
from mupsweep.group_setup import TrainResult, resolve_device
from mupsweep.parametrize import build_model, make_conditioner
from mupsweep.rundir import new_run_dir, without_passwords
from mupsweep.sweep.space import corners, suggest
from mupsweep.sweep.storage import redact_text
from mupsweep.text_settings import text_settings
from mupsweep.train import train_group
from mupsweep.util import first_line


def trial_config(cfg: Config, hparams: dict[str, Any], width: int, run_dir: Path) -> Config:
    """The base config with the trial's values at one proxy width: no checkpoints, no resume
    (a trial always starts fresh, in a new `run_dir`), no per-step progress bar, the objective
    among the metrics it measures, and the password of every URL in it hidden (train() and a
    pack write this config into the trial's run dir)."""
    run_cfg = without_passwords(cfg)  # a copy
    for key, value in hparams.items():
        set_by_path(run_cfg, key, value)
    set_by_path(run_cfg, "model.width", width)
    set_by_path(run_cfg, "train.save", False)
    set_by_path(run_cfg, "train.resume", False)
    set_by_path(run_cfg, "train.progress", False)
    set_by_path(run_cfg, "train.run_dir", str(run_dir))
    if cfg.sweep.objective not in run_cfg.eval.metrics:
        run_cfg.eval.metrics = [*run_cfg.eval.metrics, cfg.sweep.objective]
    if cfg.eval.cache_dir is None:  # sample_fd's feature net lives next to the study
        run_cfg.eval.cache_dir = str(Path(cfg.sweep.out_dir) / "feature_nets")
    check_config(run_cfg)
    return run_cfg


class TrialRecord:
    """One trial's record across its proxy widths: its HPs (suggested here), each width's config
    and pruner reports, the per-width objective values and curves, every metric at each width's
    end, the FLOPs and wall time spent, and why it stopped, written to the trial's user
    attributes as they come."""

    def __init__(self, trial: Trial, cfg: Config, params: list[SweepParam]):
        self.trial, self.cfg = trial, cfg
        self.objective = cfg.sweep.objective
        # width -> the objective's final value. Stored as "losses", the name it had when the
        # objective was always the validation loss, so that older studies read the same.
        self.losses: dict[str, float] = {}
        self.metrics: dict[str, dict[str, float]] = {}  # width -> {metric: final value}
        self.eval_time_s = 0.0  # spent measuring metrics other than the validation loss
        self.flops = 0.0
        self.wall_time_s = 0.0
        self.curves: dict[str, dict[int, float]] = {}  # width -> {step: objective value}
        self.hparams = suggest(trial, params)
        trial.set_user_attr("hparams", self.hparams)

    def width_config(self, width: int) -> Config:
        """The trial's config at one proxy width, in a new directory (w64, or w64-1 beside a
        stale one from an earlier study)."""
        run_dir = new_run_dir(Path(self.cfg.sweep.out_dir) / "trials" / f"{self.trial.number:05d}",
                              f"w{width}")
        return trial_config(self.cfg, self.hparams, width, run_dir)

    def on_eval(self, i: int, width: int, run_cfg: Config) -> Callable[[int, dict[str, float]], None]:
        """The callback of width number i's evaluations. The first proxy width (trained first)
        is the learning curve Optuna sees: reported at its steps, judged by the pruner, drawn
        by optuna-dashboard. Every width's curve is also kept in the trial's user attribute
        "curves" ({width: {step: value}}). Reporting each width on one step axis (width i at
        i * (steps + 1) + step) drew a sawtooth, the next width starting high again."""
        start = {}
        curve = self.curves.setdefault(str(width), {})

        def on_eval(step: int, values: dict[str, float]) -> None:
            loss = values[VALIDATION_LOSS]
            if step == 0:
                start["loss"] = loss
                return
            value = values[self.objective]
            curve[step] = value
            # A diverged loss is the loop's to flag (with its reason), not the pruner's.
            if not math.isfinite(loss) or loss > run_cfg.train.diverge_factor * start.get("loss", math.inf):
                return
            if i > 0 or not math.isfinite(value):
                return
            self.trial.report(value, step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned by {self.cfg.sweep.pruner} at width {width} "
                                         f"step {step} ({self.objective} {value:.4g})")

        return on_eval

    def finish_width(self, width: int, result: TrainResult) -> None:
        """Record a width that trained to its end (raises TrialPruned if it diverged)."""
        self.trial.set_user_attr("curves", self.curves)
        if result.diverged:
            raise optuna.TrialPruned(f"diverged at width {width}: {result.reason}")
        self.losses[str(width)] = result.metrics[self.objective]
        self.metrics[str(width)] = result.metrics
        self.eval_time_s += sum(result.eval_time_s.values())
        self.trial.set_user_attr("losses", self.losses)
        self.trial.set_user_attr("metrics", self.metrics)

    def value(self) -> float:
        """The objective: its mean final value over the proxy widths."""
        return sum(self.losses.values()) / len(self.losses)

    def failed(self, e: BaseException) -> None:
        """Record why the trial stopped: the pruner's or divergence's reason, or the error."""
        if isinstance(e, optuna.TrialPruned):
            self.trial.set_user_attr("reason", str(e))
        elif isinstance(e, Exception):
            self.trial.set_user_attr("reason", redact_text(first_line(f"{type(e).__name__}: {e}")))

    def close(self) -> None:
        """Record the cost: FLOPs, and wall time (the trial's share of its groups')."""
        self.trial.set_user_attr("flops", self.flops)
        self.trial.set_user_attr("wall_time_s", self.wall_time_s)
        self.trial.set_user_attr("eval_time_s", self.eval_time_s)


def check_trial_setup(cfg: Config, params: list[SweepParam], dataset: ImageDataset) -> None:
    """Build what a trial builds before training, at every proxy width, so a config that
    cannot run fails here (one UserError) rather than in every trial of every worker: the
    device, the conditioner (captions, text encoder) and the model on the meta device (no
    memory, no init cost), and the metrics the trials measure. Swept int and categorical
    model.* axes are built at each of their corners (they may change shapes); a float axis only
    scales values."""
    resolve_device(cfg.train.device)
    shape_axes = [{p.name: v} for p in params
                  if p.name.startswith("model.") and p.type in ("int", "categorical") for v in corners(p)]
    specs: dict[str, Any] = {}  # a text model's conditioner encodes captions: once per setting
    for width in cfg.sweep.proxy_widths:
        for hparams in [{}, *shape_axes]:
            run_cfg = trial_config(cfg, hparams, width, Path(cfg.sweep.out_dir) / "trials")
            key = repr((run_cfg.model.arch, text_settings(run_cfg.model)))
            if key not in specs:
                specs[key] = make_conditioner(run_cfg, dataset).data_spec
            spec = specs[key]
            try:
                with torch.device("meta"):
                    build_model(run_cfg.model, spec, "meta")
            except ValueError as e:
                where = "".join(f" {k}={v}" for k, v in hparams.items())
                raise UserError(f"model config at proxy width {width}{where}: {e}") from None
    # every width's trial measures the same metrics, so the first width's config stands for all
    first = trial_config(cfg, {}, cfg.sweep.proxy_widths[0], Path(cfg.sweep.out_dir) / "trials")
    check_metrics(first, dataset)
    prepare_metrics(first, dataset)  # sample_fd's feature net: once, before the workers


def train_trials(records: list[TrialRecord], cfg: Config,
                 dataset: ImageDataset) -> list[float | Exception]:
    """Train the trials of `records` together at every proxy width; return, in order, each
    one's objective value or the exception that ended it (optuna.TrialPruned for a pruned or
    diverged trial, any other Exception for a failed one). Records each trial's reason and cost
    (FLOPs, and its share of the groups' wall time, setup included). KeyboardInterrupt (Ctrl-C,
    SIGTERM) propagates."""
    outcomes: list[float | Exception | None] = [None] * len(records)
    going = list(range(len(records)))
    for i, width in enumerate(cfg.sweep.proxy_widths):
        cfgs, on_evals, members = [], [], []
        for k in going:
            try:
                run_cfg = records[k].width_config(width)
            except Exception as e:  # the trial's own config is bad: it fails alone
                outcomes[k] = e
                continue
            cfgs.append(run_cfg)
            on_evals.append(records[k].on_eval(i, width, run_cfg))
            members.append(k)
        if not members:
            break
        t0 = time.perf_counter()
        try:
            results = train_group(cfgs, on_evals, dataset)
        except Exception as e:  # the group as a whole failed (out of memory, ...): so did each
            for k in members:
                outcomes[k] = e
                records[k].wall_time_s += (time.perf_counter() - t0) / len(members)
            going = []  # every member has its outcome: the failure
            break
        # what the members' shares leave out (setup, the last results) is split evenly
        overhead = (time.perf_counter() - t0 - sum(r.result.wall_time_s for r in results)) / len(members)
        for k, r in zip(members, results, strict=True):
            records[k].wall_time_s += r.result.wall_time_s + max(0.0, overhead)
            records[k].flops += r.result.flops
            if r.error is not None:  # its on_eval raised: pruned, or the study failed it
                outcomes[k] = r.error
                continue
            try:
                records[k].finish_width(width, r.result)
            except optuna.TrialPruned as e:  # diverged
                outcomes[k] = e
        going = [k for k in members if outcomes[k] is None]
    for k in going:  # every width trained to its end
        outcomes[k] = records[k].value()
    for record, outcome in zip(records, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            record.failed(outcome)
        record.close()
    return outcomes  # type: ignore[return-value]
