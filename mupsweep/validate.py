"""Does the optimum stay put as the model grows? `mupsweep validate`: a grid over log2 lr at
several sizes along one axis, for each parametrization that axis compares: along width muP vs
SP; along depth (`--depths`) model.depth_parametrization none vs completep, at one width or at
(width, depth) shapes that grow together.

Each grid is an ordinary study (`tune`: same storage, workers, resume) whose points each run
exactly once. Along width one study per parametrization trains every width (OUT/PAR); along
depth one study per (parametrization, shape) (OUT/PAR-wW-dD, all in OUT/study.db unless
sweep.storage says otherwise). Per size: the grid argmin of log2 lr, the parabola fit around
it, the loss there and its seed noise; per parametrization: the drift of the fitted optimum
(`mupsweep.drift`) and whether the loss at the optimum falls with every step ("wider / deeper
is better"). Only what can be judged is: a grid with missing points is refused (re-run to
complete it), an optimum on the grid edge is reported as such, never as a drift. Written:
STEM.png, STEM.md and STEM_PAR.csv, STEM = `validate` (width) or `validate_depth` (depth).
Grids ranked by another sweep.objective are judged by the validation loss too, from the same
runs (every trial records it): a second table in STEM.md and STEM_validation_loss.png.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from mupsweep.config import Config, SweepParam, check_config
from mupsweep.coordcheck import gate
from mupsweep.drift import drift_octaves, place_optimum
from mupsweep.errors import UserError
from mupsweep.evaluation import VALIDATION_LOSS, metric_named
from mupsweep.plots import pyplot
from mupsweep.sweep.packing import packs_by_default
from mupsweep.sweep.space import LOG2_SUFFIX, MAX_TRAINABLE_LR, grid_points, point_key, search_space
from mupsweep.sweep.storage import storage_spec
from mupsweep.sweep.study import duplicate_grid_trials, missing_grid_points, open_study, trial_point
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import tune
from mupsweep.util import atomic_write, atomic_write_text

MAX_GRID_POINTS = 1000  # a typo in STEP (1e-9) must not enqueue a billion trials


@dataclass(frozen=True)
class Axis:
    """What grows from one size to the next, and what is compared along it."""

    name: str  # "width" or "depth"
    parametrizations: tuple[str, ...]  # compared by default
    compared: str  # what the parametrizations are, as the table heads them
    better: str  # the claim the loss at the optimum is checked against
    stem: str  # the files written: STEM.png, STEM.md, STEM_PARAMETRIZATION.csv
    shape: tuple[str, ...]  # the columns that name one size


WIDTH = Axis("width", ("sp", "mup"), "parametrization", "wider is better", "validate", ("width",))
DEPTH = Axis("depth", ("none", "completep"), "depth parametrization", "deeper is better",
             "validate_depth", ("width", "depth"))


@dataclass
class Verdict:
    """One parametrization's grid, judged."""

    axis: Axis
    parametrization: str
    table: pd.DataFrame  # raw losses: width (depth), log2_lr, seed, loss
    best: pd.DataFrame  # best_lr_per_size: one row per size, in order along the axis
    # drift of the fitted optimum across the sizes; None when not judged (see `why_not`)
    drift_octaves: float | None
    bigger_is_better: bool  # the loss at the optimum falls with every step along the axis
    why_not: str | None = None  # why there is no drift figure: an optimum on the grid edge, ...
    objective: str = "validation_loss"  # what "loss" is: the metric the grid's trials measured

    def summary(self) -> dict:
        return {self.axis.compared.replace(" ", "_"): self.parametrization, "objective": self.objective,
                "drift_octaves": self.drift_octaves,
                "judged": self.drift_octaves is not None, "why_not": self.why_not,
                self.axis.better.replace(" ", "_"): self.bigger_is_better,
                "best": self.best.to_dict(orient="records")}

    @property
    def drift_text(self) -> str:
        return f"{self.drift_octaves:.2f}" if self.drift_octaves is not None else f"not judged: {self.why_not}"


@dataclass
class ValidationResult:
    """What `validate` ran: a verdict per parametrization, the figure and table written."""

    axis: Axis
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    base_depth: int | None = None  # along depth: the depth CompleteP's factors are 1 at
    figure: str | None = None
    table_md: str | None = None
    # grid ("mup", or "completep w64 d4" along depth) -> why it was not judged (missing points)
    incomplete: dict[str, str] = field(default_factory=dict)
    # when the grids rank by another metric: the same runs judged by the validation loss,
    # which every trial records (so the two answers come from one set of runs)
    loss_verdicts: dict[str, Verdict] = field(default_factory=dict)
    loss_figure: str | None = None

    def summary(self) -> dict:
        head = {"figure": self.figure, "table": self.table_md}
        if self.axis is DEPTH:
            head["base_depth"] = self.base_depth
        by_loss = {VALIDATION_LOSS: {p: v.summary() for p, v in self.loss_verdicts.items()},
                   f"{VALIDATION_LOSS}_figure": self.loss_figure} if self.loss_verdicts else {}
        return {**head, "incomplete": self.incomplete,
                **{p: v.summary() for p, v in self.verdicts.items()}, **by_loss}


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def validate(cfg: Config, widths: list[int], log2_lrs: list[float], seeds: list[int],
             parametrizations: tuple[str, ...] | None = None, workers: int = 1,
             out_dir: str | None = None, pack: int | None = None,
             depths: list[int] | None = None) -> ValidationResult:
    """Run (or resume) the grids and judge the transfer: along width at `widths`, or with
    `depths` along depth at the shapes zip(widths, depths) (one width per depth: the same one
    for a depth grid, growing ones for a joint grid). parametrizations: those the axis
    compares (sp, mup; or none, completep), by default both.

    A grid with missing points (trials that kept failing, a worker that died) is not judged:
    `result.incomplete` says which points are missing, and no figure or table is written.

    pack (along width): grid points trained at once as one packed model (sweep.pack); None:
    `default_pack`. Depth grids train as sweep.pack says."""
    axis = DEPTH if depths is not None else WIDTH
    check_grid(widths, log2_lrs, seeds, depths)
    if metric_named(cfg.sweep.objective).direction != "minimize":  # the optimum's fit minimizes
        raise UserError(f"validate places each size's optimum of a metric to minimize; "
                        f"sweep.objective={cfg.sweep.objective} is to be maximized")
    if axis is DEPTH and cfg.model.parametrization != "mup":
        raise UserError("validate --depths compares depth parametrizations of muP; "
                        f"model.parametrization={cfg.model.parametrization} is not muP")
    if "mup" in (parametrizations or axis.parametrizations) or axis is DEPTH:
        as_mup = copy.deepcopy(cfg)
        as_mup.model.parametrization = "mup"
        gate(as_mup, "validate")  # a model mupsweep converted to muP itself: is it muP at all?
    out = Path(out_dir or cfg.sweep.out_dir)
    result = ValidationResult(axis)
    if axis is DEPTH:
        result.base_depth = cfg.model.base_depth if cfg.model.base_depth is not None else min(depths)
    grids = {par: grid_configs(cfg, par, widths, depths, log2_lrs, seeds, out, result.base_depth)
             for par in parametrizations or axis.parametrizations}  # all checked before training
    out.mkdir(parents=True, exist_ok=True)
    also_by_loss = cfg.sweep.objective != VALIDATION_LOSS
    for par, runs in grids.items():
        docs = []
        for run in runs:
            if axis is WIDTH:  # depth grids train as sweep.pack says
                run.sweep.pack = default_pack(run, workers) if pack is None else pack
            doc, why = run_grid(run, workers)
            if why:  # a grid with missing points is never judged
                result.incomplete[grid_name(run, axis)] = why
                continue
            docs.append((run, doc))
        if len(docs) < len(runs):
            continue
        result.verdicts[par] = judge(grids_table(docs, axis), par, axis, cfg.sweep.objective)
        atomic_write_text(out / f"{axis.stem}_{par}.csv", result.verdicts[par].table.to_csv(index=False))
        if also_by_loss:
            result.loss_verdicts[par] = judge(grids_table(docs, axis, VALIDATION_LOSS), par, axis)
    if result.incomplete:
        return result
    result.figure = str(plot_validation(result.verdicts, out / f"{axis.stem}.png"))
    md = validation_markdown(result.verdicts, result.base_depth)
    if also_by_loss:
        result.loss_figure = str(plot_validation(result.loss_verdicts,
                                                 out / f"{axis.stem}_{VALIDATION_LOSS}.png"))
        md += (f"\nThe same runs judged by {VALIDATION_LOSS} (figure {Path(result.loss_figure).name}):\n\n"
               + validation_markdown(result.loss_verdicts, result.base_depth))
    result.table_md = str(atomic_write_text(out / f"{axis.stem}.md", md))
    return result


def grids_table(docs: list[tuple[Config, dict]], axis: Axis, metric: str | None = None) -> pd.DataFrame:
    """One parametrization's `loss_table`s (one grid along width, one per shape along depth)
    as one table; metric: as in loss_table."""
    tables = [loss_table(doc, metric) for _, doc in docs]
    if axis is DEPTH:
        tables = [t.assign(depth=run.model.depth) for (run, _), t in zip(docs, tables, strict=True)]
    return pd.concat(tables, ignore_index=True)


def default_pack(run: Config, workers: int) -> int:
    """sweep.pack of a grid when --pack is not given: on a GPU the whole grid split evenly over
    the workers (with one worker, each width's lr x seed grid is one pack); on a CPU, where
    packing wide models is slower, one at a time (`sweep.packing.packs_by_default`)."""
    return math.ceil(run.sweep.n_trials / max(1, workers)) if packs_by_default(run) else 1


def grid_name(run: Config, axis: Axis) -> str:
    """How a grid's result is named: its parametrization, and along depth its shape too."""
    if axis is WIDTH:
        return run.model.parametrization
    return f"{run.model.depth_parametrization} w{run.model.width} d{run.model.depth}"


# --------------------------------------------------------------------------------------------
# The grids: input, configs
# --------------------------------------------------------------------------------------------


def parse_log2_grid(text: str) -> tuple[list[float], str | None]:
    """`--log2-lr LOW:HIGH[:STEP]` (STEP defaults to 1) -> the log2 lrs LOW, LOW+STEP, ...,
    all within [LOW, HIGH], and a note saying what the grid is when HIGH is not on it."""
    usage = f"--log2-lr={text!r}: give LOW:HIGH[:STEP] with finite LOW < HIGH and STEP > 0, e.g. -12:-5"
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise UserError(usage)
    try:
        lo, hi, step = (float(x) for x in [*parts, "1"][:3])
    except ValueError:
        raise UserError(usage) from None
    if not all(math.isfinite(v) for v in (lo, hi, step)) or not lo < hi or not step > 0:
        raise UserError(usage)
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > MAX_GRID_POINTS:
        raise UserError(f"--log2-lr={text!r} makes {n} learning rates; at most {MAX_GRID_POINTS}")
    grid = [round(lo + k * step, 9) for k in range(n)]
    if 2.0**grid[0] > MAX_TRAINABLE_LR:
        raise UserError(f"--log2-lr={text!r}: every lr of the grid is above {MAX_TRAINABLE_LR:g} "
                        f"(2^{grid[0]:g} .. 2^{grid[-1]:g}): Adam there moves every weight by more "
                        "than its own scale each step, so no run would train; give a grid "
                        "below 0, e.g. -12:-5")
    note = None
    if not math.isclose(grid[-1], hi, abs_tol=1e-9):
        note = (f"--log2-lr {text}: the grid is {', '.join(f'{x:g}' for x in grid)} "
                f"(HIGH {hi:g} is not on it)")
    return grid, note


def check_grid(widths: list[int], log2_lrs: list[float], seeds: list[int],
               depths: list[int] | None = None) -> None:
    """At least 2 sizes, 3 learning rates and one seed, no value twice; with `depths`,
    increasing depths and one width per depth (a joint grid may repeat a width)."""
    if depths is None:
        sizes, what, axes = widths, "validate needs at least 2 widths", [("--widths", widths)]
    else:
        sizes, what, axes = depths, "validate --depths needs at least 2 depths", []
    if len(sizes) < 2 or len(log2_lrs) < 3 or not seeds:
        raise UserError(f"{what}, 3 learning rates and 1 seed")
    for flag, values in (*axes, ("--log2-lr", log2_lrs), ("--seeds", seeds)):
        if len(set(values)) != len(values):
            raise UserError(f"{flag} lists a value twice: {', '.join(f'{v:g}' for v in values)}")
    if depths is None:
        return
    if depths != sorted(depths) or len(set(depths)) != len(depths):
        raise UserError(f"--depths={','.join(map(str, depths))}: give increasing depths")
    if len(widths) != len(depths):
        raise UserError(f"--widths={','.join(map(str, widths))} and --depths="
                        f"{','.join(map(str, depths))}: give one width per depth for a joint "
                        "grid, or leave --widths out to keep model.width")


def grid_configs(cfg: Config, parametrization: str, widths: list[int], depths: list[int] | None,
                 log2_lrs: list[float], seeds: list[int], out: Path,
                 base_depth: int | None = None) -> list[Config]:
    """The grid studies of one parametrization: along width one study that trains every width
    per trial; along depth one study per (width, depth) shape."""
    if depths is None:
        runs = [grid_config(cfg, parametrization, log2_lrs, seeds, widths, cfg.sweep.study, out)]
    else:
        runs = [depth_grid_config(cfg, parametrization, w, d, base_depth, log2_lrs, seeds, out)
                for w, d in zip(widths, depths, strict=True)]
    if cfg.eval.cache_dir is None:  # one sample_fd feature net for all the grids, not one each
        for run in runs:
            run.eval.cache_dir = str(out / "feature_nets")
    return runs


def grid_config(cfg: Config, parametrization: str, log2_lrs: list[float], seeds: list[int],
                widths: list[int], study: str, out_dir: Path | None = None) -> Config:
    """The sweep config for one parametrization's grid: lr x seed, every width per trial.

    Its best.json, trials.csv and trial runs go to out_dir/PARAMETRIZATION; the study stays
    in the storage of `cfg` (default: sweep.out_dir/study.db, beside both grids)."""
    run = copy.deepcopy(cfg)
    run.model.parametrization = parametrization
    if out_dir is not None:
        run.sweep.storage = storage_spec(cfg).target if cfg.sweep.storage is None else cfg.sweep.storage
        run.sweep.out_dir = str(Path(out_dir) / parametrization)
    lo, hi = min(log2_lrs), max(log2_lrs)
    step = (hi - lo) / (len(log2_lrs) - 1) if len(log2_lrs) > 1 else 1.0
    run.sweep.params = [
        SweepParam(name="optim.lr", type="float", low=lo, high=hi, log2=True, step=step),
        SweepParam(name="train.seed", type="categorical", choices=list(seeds)),
    ]
    run.sweep.sampler, run.sweep.pruner = "grid", "none"
    run.sweep.proxy_widths = list(widths)
    run.sweep.n_trials = len(log2_lrs) * len(seeds)
    run.sweep.study = f"{study}-{parametrization}"
    return run


def depth_grid_config(cfg: Config, depth_parametrization: str, width: int, depth: int,
                      base_depth: int, log2_lrs: list[float], seeds: list[int], out: Path) -> Config:
    """The grid study of one depth parametrization (under muP) at one (width, depth)."""
    tag = f"{depth_parametrization}-w{width}-d{depth}"
    run = grid_config(cfg, "mup", log2_lrs, seeds, [width], cfg.sweep.study)
    run.model.depth_parametrization = depth_parametrization
    run.model.depth, run.model.base_depth = depth, base_depth
    run.sweep.study = f"{cfg.sweep.study}-depth-{tag}"
    run.sweep.out_dir = str(out / tag)
    if cfg.sweep.storage is None:  # every study in one file, not one file per folder
        run.sweep.storage = f"sqlite:///{(out / 'study.db').resolve()}"
    check_config(run)
    return run


# --------------------------------------------------------------------------------------------
# Running one grid: every point exactly once, or no verdict
# --------------------------------------------------------------------------------------------


def run_grid(run: Config, workers: int = 1) -> tuple[dict | None, str | None]:
    """Run (or resume) one grid study: (its study summary, None), or (None, why it cannot be
    judged) when points are missing. A study holding another grid's points is refused."""
    params = search_space(run)
    open_study(run, params, check_first=lambda study: _refuse_another_grid(study, params))
    study = tune(run, workers=workers, depth_experiment=True)
    why = why_incomplete(study, params, Path(run.sweep.out_dir) / "trials.csv")
    return (None, why) if why else (study_summary(study), None)


def _point_text(point: dict) -> str:
    """An Optuna grid point as a person reads it: 2^-7 seed 1."""
    parts = []
    for key, value in sorted(point.items()):
        if key == f"optim.lr{LOG2_SUFFIX}":
            parts.insert(0, f"2^{value:g}")
        else:
            parts.append(f"{key.removeprefix('train.')} {value}")
    return " ".join(parts)


def _refuse_another_grid(study, params: list[SweepParam]) -> None:
    """A study that holds finished points of another grid (another --log2-lr or --seeds under
    the same study name) would count them against this grid's budget and never finish it."""
    ours = {point_key(p) for p in grid_points(params)}
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    foreign = sorted({trial_point(t) for t in finished} - ours - {None})
    if foreign:
        shown = ", ".join(_point_text(dict(p)) for p in foreign[:5])
        raise UserError(f"study {study.study_name!r} holds trials of another grid ({shown}"
                        f"{', ...' if len(foreign) > 5 else ''}); give the same --log2-lr and "
                        "--seeds as before, or another sweep.study")


def why_incomplete(study, params: list[SweepParam], trials_csv: Path) -> str | None:
    """Why the grid cannot be judged yet (its missing points), or None when it is complete."""
    missing = missing_grid_points(study, params)
    if not missing:
        return None
    total = len(grid_points(params))
    shown = ", ".join(_point_text(p) for p in missing[:8]) + (", ..." if len(missing) > 8 else "")
    line = f"grid {study.study_name!r} is missing {len(missing)} of {total} points ({shown})"
    duplicates = duplicate_grid_trials(study)
    if duplicates:  # the budget was spent on repeats: re-running this study cannot finish it
        runs = "; ".join(" and ".join(map(str, d)) for d in duplicates[:3])
        return (f"{line}: trials {runs} ran the same point (an older mupsweep's grid was not "
                "exact under --workers); re-run with another sweep.study")
    return f"{line}: its trials failed (reasons in {trials_csv}); re-run to complete the grid"


# --------------------------------------------------------------------------------------------
# Judging: the losses, each size's optimum, the drift
# --------------------------------------------------------------------------------------------


def loss_table(doc: dict, metric: str | None = None) -> pd.DataFrame:
    """One row per (trial, width): log2_lr, seed, loss (NaN where that run diverged). "loss" is
    the study's objective, or with `metric` that metric's final value (every trial records the
    final value of each metric it measured).

    Trials that did not finish (FAIL: an error, a dead worker, a surplus trial) are left out:
    a width they never reached did not diverge. A point run twice counts once (the first)."""
    rows = []
    seen: set[tuple] = set()
    for trial in sorted(doc["trials"], key=lambda t: t.get("number", 0)):
        hp = trial.get("hparams") or {}
        if "optim.lr" not in hp or trial.get("state") in ("FAIL", "RUNNING", "WAITING"):
            continue
        point = (round(math.log2(hp["optim.lr"]), 6), hp.get("train.seed", 0))
        if point in seen:
            continue
        seen.add(point)
        losses = trial.get("losses") or {}
        if metric is not None:
            losses = {w: values.get(metric) for w, values in (trial.get("metrics") or {}).items()}
        for width in doc["proxy_widths"]:
            loss = losses.get(str(width))
            ok = loss is not None and math.isfinite(loss)
            rows.append({"width": int(width), "log2_lr": round(math.log2(hp["optim.lr"]), 6),
                         "seed": hp.get("train.seed", 0), "loss": loss if ok else math.nan})
    if not rows:
        raise UserError(f"study {doc.get('study')!r} has no trials with optim.lr to validate")
    return pd.DataFrame(rows)


def best_lr_per_size(table: pd.DataFrame, axis: Axis = WIDTH) -> pd.DataFrame:
    """Per size (a width; along depth a (width, depth) shape), in order along the axis: the
    grid argmin and parabola fit of log2 lr, the loss at the optimum and its seed noise."""
    rows = []
    for key, g in table.groupby(list(axis.shape)):
        shape = dict(zip(axis.shape, key if isinstance(key, tuple) else (key,), strict=True))
        stats = g.groupby("log2_lr")["loss"].agg(["mean", "std", "count"]).sort_index()
        opt = place_optimum(stats.index.to_numpy(float), stats["mean"].to_numpy(float))
        i = opt.index
        rows.append({"width": int(shape["width"]), "best_log2_lr": opt.best_log2_lr,
                     "fit_log2_lr": opt.fit_log2_lr, "fitted": opt.fitted,
                     "loss_at_best": float(stats["mean"].iloc[i]), "at_edge": opt.at_edge,
                     "all_diverged": opt.all_diverged,
                     "seed_std": float(stats["std"].iloc[i]) if stats["count"].iloc[i] > 1 else 0.0,
                     "seeds": int(stats["count"].iloc[i]),
                     **{k: int(v) for k, v in shape.items() if k != "width"}})
    return pd.DataFrame(rows).sort_values(axis.name).reset_index(drop=True)


def judge(table: pd.DataFrame, parametrization: str, axis: Axis = WIDTH,
          objective: str = "validation_loss") -> Verdict:
    """Judge one parametrization's losses (`loss_table`, with a depth column along depth). An
    optimum on the edge of the grid is only a bound (the true one may lie beyond it), and a
    size where every lr diverged has none: no drift figure then."""
    best = best_lr_per_size(table, axis)
    better = bool(np.all(np.diff(best["loss_at_best"].to_numpy()) < 0))
    why = why_not_judged(best, axis.name)
    drift = None if why else drift_octaves(best["fit_log2_lr"])
    return Verdict(axis, parametrization, table, best, drift, better, why, objective)


def why_not_judged(best: pd.DataFrame, axis: str) -> str | None:
    """Why a drift figure cannot be read off `best` (rows of best_lr_per_size, one per `axis`
    value): every lr diverged somewhere, or an optimum sits on the grid edge. None: judge."""
    diverged = best[best["all_diverged"]]
    if len(diverged):
        return f"every lr diverged at {axis} {_values(diverged, axis)}: lower --log2-lr"
    edge = best[best["at_edge"]]
    if len(edge):
        parts = [f"2^{x:g} ({axis} {_values(g, axis)})" for x, g in edge.groupby("best_log2_lr")]
        return f"optimum at the grid edge {', '.join(parts)}: widen --log2-lr"
    return None


def _values(rows: pd.DataFrame, axis: str) -> str:
    return ", ".join(str(int(w)) for w in rows[axis])


# --------------------------------------------------------------------------------------------
# The figure and the table
# --------------------------------------------------------------------------------------------


def plot_validation(verdicts: dict[str, Verdict], path: Path) -> Path:
    """One panel per parametrization: the objective vs log2 lr, a curve per size (seed mean,
    band = seed std), each size's fitted optimum dotted. Along depth one more panel: the loss
    at the optimum vs depth ("deeper is better?")."""
    plt = pyplot()
    axis = next(iter(verdicts.values())).axis
    joint = axis is DEPTH and any(v.best["width"].nunique() > 1 for v in verdicts.values())
    n = len(verdicts) + (axis is DEPTH)
    fig, panels = plt.subplots(1, n, figsize=(5.2 * n, 4), squeeze=False)
    lr_panels = panels[0][:len(verdicts)]
    for ax in lr_panels[1:]:  # shared before plotting, so the range covers every panel's curves
        ax.sharey(lr_panels[0])
    for ax, (par, v) in zip(lr_panels, verdicts.items(), strict=True):
        colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(v.best)))
        for color, size in zip(colors, v.best.itertuples(), strict=True):
            shape = [getattr(size, c) for c in axis.shape]
            s = (v.table[(v.table[list(axis.shape)] == shape).all(axis=1)]
                 .groupby("log2_lr")["loss"].agg(["mean", "std"]))
            ax.plot(s.index, s["mean"], marker="o", ms=3, color=color, label=_size_label(size, axis, joint))
            if s["std"].notna().any():
                ax.fill_between(s.index, s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                                color=color, alpha=0.15)
            ax.axvline(size.fit_log2_lr, color=color, ls=":", lw=1)
        name = {"mup": "μP", "sp": "SP"}.get(par, par)
        ax.set_title(f"{name}: optimum drifts {v.drift_octaves:.2f} octaves"
                     if v.drift_octaves is not None else f"{name}: not judged (see table)")
        ax.set_xlabel("log2 learning rate")
        ax.set_yscale("log")
        if ax is not lr_panels[0]:
            ax.tick_params(axis="y", which="both", labelleft=False)
    lr_panels[0].set_ylim(*_loss_range(verdicts))
    lr_panels[0].set_ylabel(_label(verdicts))
    lr_panels[-1].legend(fontsize=8)
    if axis is DEPTH:
        _plot_loss_at_optimum(panels[0][-1], verdicts, joint)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    finally:
        plt.close(fig)
    return path


def _loss_range(verdicts: dict[str, Verdict], headroom: float = 3.0) -> tuple[float | None, float | None]:
    """The shared y range: every curve's lowest point, and up to `headroom` x the worst size's
    optimum; a run near divergence above it leaves the chart rather than flattening the
    curves around the optima, which are what the figure is for."""
    means = pd.concat([v.table.groupby([*v.axis.shape, "log2_lr"])["loss"].mean() for v in verdicts.values()])
    means = means[np.isfinite(means)]
    worst_best = max(v.best["loss_at_best"].max() for v in verdicts.values())
    if means.empty or not np.isfinite(worst_best) or means.min() <= 0:
        return (None, None)  # nothing to frame on a log scale: matplotlib's own range
    return means.min() / 1.05, min(means.max(), headroom * worst_best) * 1.05


def _label(verdicts: dict[str, Verdict]) -> str:
    return next(iter(verdicts.values())).objective.replace("_", " ")


def _size_label(size, axis: Axis, joint: bool) -> str:
    if axis is WIDTH:
        return f"width {size.width}"
    return f"w{size.width} d{size.depth}" if joint else f"depth {size.depth}"


def _plot_loss_at_optimum(ax, verdicts: dict[str, Verdict], joint: bool) -> None:
    """The loss at each depth's optimum (seed std as the error bar), a line per parametrization."""
    for par, v in verdicts.items():
        ax.errorbar(v.best["depth"], v.best["loss_at_best"], yerr=v.best["seed_std"], marker="o",
                    capsize=3, label=par)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth" + (" (width grows with it)" if joint else ""))
    ax.set_ylabel(f"{_label(verdicts)} at the optimum")
    ax.set_title("deeper is better?")
    ax.legend(fontsize=8)


def validation_markdown(verdicts: dict[str, Verdict], base_depth: int | None = None) -> str:
    """validate's table: each size's optimum per parametrization, then each parametrization's
    drift and whether the loss at the optimum improves along the axis (along depth also the
    base depth, and the loss at the optimum at the first and last depth)."""
    axis = next(iter(verdicts.values())).axis
    by_depth = axis is DEPTH
    lines = _md_row([axis.compared, *axis.shape, "best log2 lr (grid)", "best log2 lr (fit)",
                     f"{_label(verdicts)} at best", "seed std"], header=True)
    for par, v in verdicts.items():
        for r in v.best.itertuples():
            lines += _md_row([par, *(getattr(r, c) for c in axis.shape), f"{r.best_log2_lr:g}",
                              f"{r.fit_log2_lr:.2f}", f"{r.loss_at_best:.4f}", f"{r.seed_std:.4f}"])
    lines.append("")
    if by_depth:
        lines += [f"base depth {base_depth}", ""]
    lines += _md_row([axis.compared, "drift (octaves, fit)", axis.better,
                      *([f"{_label(verdicts)} at best, first -> last"] if by_depth else [])], header=True)
    for par, v in verdicts.items():
        first, last = v.best["loss_at_best"].iloc[0], v.best["loss_at_best"].iloc[-1]
        lines += _md_row([par, v.drift_text, "yes" if v.bigger_is_better else "no",
                          *([f"{first:.4f} -> {last:.4f}"] if by_depth else [])])
    return "\n".join(lines) + "\n"


def _md_row(cells: list, header: bool = False) -> list[str]:
    """One Markdown table row (and the rule under it when it is the header)."""
    row = "| " + " | ".join(str(c) for c in cells) + " |"
    return [row, "|" + "---|" * len(cells)] if header else [row]
