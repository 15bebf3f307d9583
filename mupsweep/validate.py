"""Does the optimum stay put? A grid over log2 lr at several widths, in muP and in SP.

`validate(cfg)` runs one grid study per parametrization with the ordinary sweep machinery
(`tune.tune`: same storage, workers, resume), then reads the per-width losses back and
reports, per width: the grid argmin of log2 lr, a least-squares parabola through the grid points
around it, the loss there and its seed noise; the drift of the optimum (octaves) from the
narrowest to the widest width; and whether the loss at the optimum improves with every width
step ("wider is better"). The two-panel figure (SP | muP) is the picture that sells muP.

Each grid point runs exactly once (the points are enqueued: `mupsweep.sweep.study`), each
parametrization writes its own best.json / trials.csv / trial runs (OUT/sp, OUT/mup), and a
result is only judged when it can be: a grid with missing points is refused (re-run to
complete it), and an optimum on the grid edge is reported as such, never as a drift figure.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from mupsweep.sweep.summary import best_document
from mupsweep.config import Config, SweepParam
from mupsweep.errors import UserError
from mupsweep.sweep.storage import storage_spec
from mupsweep.sweep.packing import packs_by_default
from mupsweep.sweep.space import LOG2_SUFFIX, MAX_TRAINABLE_LR, grid_points, point_key, search_space
from mupsweep.sweep.study import duplicate_grid_trials, missing_grid_points, open_study, trial_point
from mupsweep.sweep.tune import tune
from mupsweep.util import atomic_write, atomic_write_text

MAX_GRID_POINTS = 1000  # a typo in STEP (1e-9) must not enqueue a billion trials


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


def loss_table(doc: dict) -> pd.DataFrame:
    """One row per (trial, width): log2_lr, seed, loss (NaN where that run diverged).

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
        for width in doc["proxy_widths"]:
            loss = losses.get(str(width))
            ok = loss is not None and math.isfinite(loss)
            rows.append({"width": int(width), "log2_lr": round(math.log2(hp["optim.lr"]), 6),
                         "seed": hp.get("train.seed", 0), "loss": loss if ok else math.nan})
    if not rows:
        raise UserError(f"study {doc.get('study')!r} has no trials with optim.lr to validate")
    return pd.DataFrame(rows)


def parabola_vertex(x: np.ndarray, y: np.ndarray, i: int, half_window: int = 2,
                    unstable: float = 1.5) -> tuple[float, bool]:
    """Least-squares parabola through the grid points within `half_window` of the argmin i,
    leaving out points above `unstable` x the minimum (the cliff where training breaks down
    would drag the vertex). Near-flat optima are common at small scale, and five points
    average out seed noise better than three. Returns (vertex, True), or (x[i], False) when
    fewer than three points remain, the fit does not curve upwards, or i is at the grid edge."""
    if i == 0 or i == len(x) - 1:
        return float(x[i]), False
    lo, hi = max(0, i - half_window), min(len(x), i + half_window + 1)
    xs, ys = x[lo:hi], y[lo:hi]
    keep = np.isfinite(ys) & (ys <= unstable * y[i])
    if keep.sum() < 3:
        return float(x[i]), False
    a, b, _ = np.polyfit(xs[keep], ys[keep], 2)
    if a <= 0:
        return float(x[i]), False
    return float(np.clip(-b / (2 * a), xs[keep].min(), xs[keep].max())), True


def best_per_width(table: pd.DataFrame) -> pd.DataFrame:
    """Per width: grid argmin and parabola fit of log2 lr, loss at the optimum, seed noise."""
    rows = []
    for width, g in table.groupby("width"):
        stats = g.groupby("log2_lr")["loss"].agg(["mean", "std", "count"]).sort_index()
        x, y = stats.index.to_numpy(float), stats["mean"].to_numpy(float)
        y_search = np.where(np.isfinite(y), y, np.inf)
        i = int(np.argmin(y_search))
        fit, fitted = parabola_vertex(x, y_search, i)
        rows.append({"width": int(width), "best_log2_lr": float(x[i]), "fit_log2_lr": fit,
                     "fitted": fitted, "loss_at_best": float(y[i]),
                     "at_edge": i in (0, len(x) - 1), "all_diverged": not np.isfinite(y).any(),
                     "seed_std": float(stats["std"].iloc[i]) if stats["count"].iloc[i] > 1 else 0.0,
                     "seeds": int(stats["count"].iloc[i])})
    return pd.DataFrame(rows).sort_values("width").reset_index(drop=True)


@dataclass
class Verdict:
    parametrization: str
    table: pd.DataFrame  # raw losses
    best: pd.DataFrame  # best_per_width
    # |fit log2 lr at the widest - at the narrowest|; None when not judged (see `why_not`)
    drift_octaves: float | None
    wider_is_better: bool  # loss at the optimum decreases with every width step
    why_not: str | None = None  # why there is no drift figure: an optimum on the grid edge, ...

    def summary(self) -> dict:
        return {"parametrization": self.parametrization, "drift_octaves": self.drift_octaves,
                "judged": self.drift_octaves is not None, "why_not": self.why_not,
                "wider_is_better": self.wider_is_better,
                "best": self.best.to_dict(orient="records")}

    @property
    def drift_text(self) -> str:
        return f"{self.drift_octaves:.2f}" if self.drift_octaves is not None else f"not judged: {self.why_not}"


def verdict(doc: dict, parametrization: str) -> Verdict:
    """Judge one parametrization's grid. An optimum on the edge of the grid is only a bound
    (the true one may lie beyond it), so there is no drift figure then: widen the grid."""
    table = loss_table(doc)
    best = best_per_width(table)
    losses = best["loss_at_best"].to_numpy()
    wider = bool(np.all(np.diff(losses) < 0))
    why = why_not_judged(best, "width")
    if why:
        return Verdict(parametrization, table, best, None, wider, why)
    drift = abs(best["fit_log2_lr"].iloc[-1] - best["fit_log2_lr"].iloc[0])
    return Verdict(parametrization, table, best, float(drift), wider)


def why_not_judged(best: pd.DataFrame, axis: str) -> str | None:
    """Why a drift figure cannot be read off `best` (rows of best_per_width, one per `axis`
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


@dataclass
class ValidationResult:
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    figure: str | None = None
    table_md: str | None = None
    # parametrization -> why its grid was not judged (missing points); empty when complete
    incomplete: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"figure": self.figure, "table": self.table_md, "incomplete": self.incomplete,
                **{p: v.summary() for p, v in self.verdicts.items()}}


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


def check_grid(widths: list[int], log2_lrs: list[float], seeds: list[int]) -> None:
    """At least 2 widths and 3 learning rates, at least one seed, no value twice."""
    if len(widths) < 2 or len(log2_lrs) < 3 or not seeds:
        raise UserError("validate needs at least 2 widths, 3 learning rates and 1 seed")
    for what, values in (("--widths", widths), ("--log2-lr", log2_lrs), ("--seeds", seeds)):
        if len(set(values)) != len(values):
            raise UserError(f"{what} lists a value twice: {', '.join(f'{v:g}' for v in values)}")


def validate(cfg: Config, widths: list[int], log2_lrs: list[float], seeds: list[int],
             parametrizations: tuple[str, ...] = ("sp", "mup"), workers: int = 1,
             out_dir: str | None = None, pack: int | None = None) -> ValidationResult:
    """Run (or resume) the grid for each parametrization and judge the transfer.

    A grid with missing points (trials that kept failing, a worker that died) is not judged:
    `result.incomplete` says which points are missing, and no figure or table is written.

    pack: grid points trained at once as one packed model (sweep.pack). None: on a GPU the
    whole grid split evenly over the workers, so with one worker each width's lr x seed grid is
    one pack; on a CPU, where packing wide models is slower, one at a time
    (`sweep.packing.packs_by_default`)."""
    check_grid(widths, log2_lrs, seeds)
    out = Path(out_dir or cfg.sweep.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ValidationResult()
    for par in parametrizations:
        run = grid_config(cfg, par, log2_lrs, seeds, widths, cfg.sweep.study, out)
        if pack is None:
            pack = math.ceil(run.sweep.n_trials / max(1, workers)) if packs_by_default(run) else 1
        run.sweep.pack = pack
        doc, why = run_grid(run, workers)
        if why:
            result.incomplete[par] = why
            continue
        result.verdicts[par] = verdict(doc, par)
        table = result.verdicts[par].table
        atomic_write_text(out / f"validate_{par}.csv", table.to_csv(index=False))
    if result.incomplete:
        return result
    result.figure = str(plot_validation(result.verdicts, out / "validate.png"))
    result.table_md = str(atomic_write_text(out / "validate.md", validation_markdown(result.verdicts)))
    return result


def run_grid(run: Config, workers: int = 1) -> tuple[dict | None, str | None]:
    """Run (or resume) one grid study: (its best document, None), or (None, why it cannot be
    judged) when points are missing. A study holding another grid's points is refused."""
    params = search_space(run)
    open_study(run, params, check_first=lambda study: _refuse_another_grid(study, params))
    study = tune(run, workers=workers, depth_experiment=True)
    why = _incomplete(study, params, Path(run.sweep.out_dir) / "trials.csv")
    return (None, why) if why else (best_document(study), None)


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


def _incomplete(study, params: list[SweepParam], trials_csv: Path) -> str | None:
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


def plot_validation(verdicts: dict[str, Verdict], path: Path) -> Path:
    """One panel per parametrization: validation loss vs log2 lr, a curve per width (seed
    mean, band = seed std), each width's fitted optimum marked."""
    from mupsweep.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(verdicts), figsize=(5.2 * len(verdicts), 4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (par, v) in zip(axes, verdicts.items(), strict=True):
        widths = sorted(v.table["width"].unique())
        colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(widths)))
        for color, width in zip(colors, widths, strict=True):
            s = v.table[v.table["width"] == width].groupby("log2_lr")["loss"].agg(["mean", "std"])
            ax.plot(s.index, s["mean"], marker="o", ms=3, color=color, label=f"width {width}")
            if s["std"].notna().any():
                ax.fill_between(s.index, s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                                color=color, alpha=0.15)
            b = v.best[v.best["width"] == width].iloc[0]
            ax.axvline(b["fit_log2_lr"], color=color, ls=":", lw=1)
        name = {"mup": "μP", "sp": "SP"}.get(par, par)
        ax.set_title(f"{name}: optimum drifts {v.drift_octaves:.2f} octaves"
                     if v.drift_octaves is not None else f"{name}: not judged (see table)")
        ax.set_xlabel("log2 learning rate")
        ax.set_yscale("log")
    axes[0].set_ylabel("validation loss")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return path


def validation_markdown(verdicts: dict[str, Verdict]) -> str:
    lines = ["| parametrization | width | best log2 lr (grid) | best log2 lr (fit) | loss at best | seed std |",
             "|---|---|---|---|---|---|"]
    for par, v in verdicts.items():
        for r in v.best.itertuples():
            lines.append(f"| {par} | {r.width} | {r.best_log2_lr:g} | {r.fit_log2_lr:.2f} | "
                         f"{r.loss_at_best:.4f} | {r.seed_std:.4f} |")
    lines += ["", "| parametrization | drift (octaves, fit) | wider is better |", "|---|---|---|"]
    for par, v in verdicts.items():
        lines.append(f"| {par} | {v.drift_text} | {'yes' if v.wider_is_better else 'no'} |")
    return "\n".join(lines) + "\n"
