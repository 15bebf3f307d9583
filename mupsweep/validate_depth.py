"""Does the optimum stay put across depth? `mupsweep validate --depths`: a grid over log2 lr at
several depths (width fixed), or at (width, depth) shapes that grow together, under
model.depth_parametrization=none (today's muP) and completep.

Each (depth parametrization, shape) is one ordinary grid study (`tune.tune` with one proxy
width: same storage, workers, resume), in its own folder under the output directory and one
SQLite file for all of them (unless sweep.storage names another storage). Per shape: the grid
argmin and fitted optimum of log2 lr and the loss there (`validate.best_per_width`); per depth
parametrization: the drift of the optimum from the first shape to the last, and whether the
loss at the optimum falls with every depth step ("deeper is better"). Figure: one panel of
loss vs log2 lr per depth parametrization, and the loss at the optimum vs depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mupsweep.config import Config, check_config
from mupsweep.errors import UserError
from mupsweep.util import atomic_write_text
from mupsweep.validate import best_per_width, grid_config, loss_table, run_grid, why_not_judged


@dataclass
class DepthVerdict:
    depth_parametrization: str
    table: pd.DataFrame  # raw losses: width, depth, log2_lr, seed, loss
    best: pd.DataFrame  # one row per shape: width, depth, best/fit log2 lr, loss at best, seed std
    # |fit log2 lr at the last shape - at the first|; None when not judged (see `why_not`)
    drift_octaves: float | None
    deeper_is_better: bool  # loss at the optimum falls with every step in depth
    why_not: str | None = None  # why there is no drift figure: an optimum on the grid edge, ...

    def summary(self) -> dict:
        return {"depth_parametrization": self.depth_parametrization,
                "drift_octaves": self.drift_octaves, "judged": self.drift_octaves is not None,
                "why_not": self.why_not, "deeper_is_better": self.deeper_is_better,
                "best": self.best.to_dict(orient="records")}

    @property
    def drift_text(self) -> str:
        return f"{self.drift_octaves:.2f}" if self.drift_octaves is not None else f"not judged: {self.why_not}"


@dataclass
class DepthValidationResult:
    verdicts: dict[str, DepthVerdict] = field(default_factory=dict)
    base_depth: int = 0
    figure: str | None = None
    table_md: str | None = None
    # "PARAMETRIZATION wW dD" -> why that grid was not judged (missing points); empty when complete
    incomplete: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"figure": self.figure, "table": self.table_md, "base_depth": self.base_depth,
                "incomplete": self.incomplete,
                **{p: v.summary() for p, v in self.verdicts.items()}}


def shape_config(cfg: Config, depth_parametrization: str, width: int, depth: int, base_depth: int,
                 log2_lrs: list[float], seeds: list[int], out: Path) -> Config:
    """The grid study of one depth parametrization at one (width, depth)."""
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


def validate_depths(cfg: Config, shapes: list[tuple[int, int]], log2_lrs: list[float],
                    seeds: list[int], depth_parametrizations: tuple[str, ...] = ("none", "completep"),
                    workers: int = 1, out_dir: str | None = None) -> DepthValidationResult:
    """Run (or resume) the grid at every (width, depth) in `shapes` for each depth
    parametrization; base depth = model.base_depth, or the smallest depth when it is not set."""
    depths = [d for _, d in shapes]
    if len(shapes) < 2 or len(log2_lrs) < 3:
        raise UserError("validate --depths needs at least 2 depths and 3 learning rates")
    if depths != sorted(depths) or len(set(depths)) != len(depths):
        raise UserError(f"--depths={','.join(map(str, depths))}: give increasing depths")
    if cfg.model.parametrization != "mup":
        raise UserError("validate --depths compares depth parametrizations of muP; "
                        f"model.parametrization={cfg.model.parametrization} is not muP")
    base_depth = cfg.model.base_depth if cfg.model.base_depth is not None else min(depths)
    out = Path(out_dir or cfg.sweep.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {par: [shape_config(cfg, par, w, d, base_depth, log2_lrs, seeds, out) for w, d in shapes]
            for par in depth_parametrizations}  # every config checked before any training
    result = DepthValidationResult(base_depth=base_depth)
    for par, configs in runs.items():
        tables, bests = [], []
        for run in configs:
            doc, why = run_grid(run, workers)
            if why:  # a grid with missing points is never judged
                result.incomplete[f"{par} w{run.model.width} d{run.model.depth}"] = why
                continue
            table = loss_table(doc).assign(depth=run.model.depth)
            tables.append(table)
            bests.append(best_per_width(table).assign(depth=run.model.depth))
        if len(tables) < len(configs):
            continue
        result.verdicts[par] = depth_verdict(par, pd.concat(tables, ignore_index=True),
                                             pd.concat(bests, ignore_index=True))
        atomic_write_text(out / f"validate_depth_{par}.csv",
                          result.verdicts[par].table.to_csv(index=False))
    if result.incomplete:
        return result
    result.figure = str(plot_depth_validation(result.verdicts, out / "validate_depth.png"))
    md = depth_validation_markdown(result.verdicts, base_depth)
    result.table_md = str(atomic_write_text(out / "validate_depth.md", md))
    return result


def depth_verdict(par: str, table: pd.DataFrame, best: pd.DataFrame) -> DepthVerdict:
    """Judge one depth parametrization: as `validate.verdict`, an optimum on the grid edge or a
    shape where every lr diverged gives no drift figure."""
    best = best.sort_values("depth").reset_index(drop=True)
    deeper = bool(np.all(np.diff(best["loss_at_best"].to_numpy()) < 0))
    why = why_not_judged(best, "depth")
    if why:
        return DepthVerdict(par, table, best, None, deeper, why)
    drift = abs(best["fit_log2_lr"].iloc[-1] - best["fit_log2_lr"].iloc[0])
    return DepthVerdict(par, table, best, float(drift), deeper)


def plot_depth_validation(verdicts: dict[str, DepthVerdict], path: Path) -> Path:
    """One panel per depth parametrization (validation loss vs log2 lr, a curve per shape,
    seed std as the band, fitted optimum dotted), and the loss at the optimum vs depth."""
    from mupsweep.report import _pyplot

    plt = _pyplot()
    n = len(verdicts)
    fig, axes = plt.subplots(1, n + 1, figsize=(5.0 * (n + 1), 4))
    joint = any(v.best["width"].nunique() > 1 for v in verdicts.values())
    lr_axes = axes[:n]
    for ax, (par, v) in zip(lr_axes, verdicts.items(), strict=True):
        shapes = list(v.best[["width", "depth"]].itertuples(index=False))
        colors = plt.cm.viridis(np.linspace(0.1, 0.9, len(shapes)))
        for color, (width, depth) in zip(colors, shapes, strict=True):
            sel = v.table[(v.table["width"] == width) & (v.table["depth"] == depth)]
            s = sel.groupby("log2_lr")["loss"].agg(["mean", "std"])
            label = f"w{width} d{depth}" if joint else f"depth {depth}"
            ax.plot(s.index, s["mean"], marker="o", ms=3, color=color, label=label)
            if s["std"].notna().any():
                ax.fill_between(s.index, s["mean"] - s["std"].fillna(0),
                                s["mean"] + s["std"].fillna(0), color=color, alpha=0.15)
            b = v.best[(v.best["width"] == width) & (v.best["depth"] == depth)].iloc[0]
            ax.axvline(b["fit_log2_lr"], color=color, ls=":", lw=1)
        ax.set_title(f"{par}: optimum drifts {v.drift_octaves:.2f} octaves"
                     if v.drift_octaves is not None else f"{par}: drift not judged")
        ax.set_xlabel("log2 learning rate")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    lr_axes[0].set_ylabel("validation loss")
    lr_axes[-1].sharey(lr_axes[0])
    ax = axes[-1]
    for par, v in verdicts.items():
        ax.errorbar(v.best["depth"], v.best["loss_at_best"], yerr=v.best["seed_std"], marker="o",
                    capsize=3, label=par)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("depth" + (" (width grows with it)" if joint else ""))
    ax.set_ylabel("validation loss at the optimum")
    ax.set_title("deeper is better?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def depth_validation_markdown(verdicts: dict[str, DepthVerdict], base_depth: int) -> str:
    lines = ["| depth parametrization | width | depth | best log2 lr (grid) | best log2 lr (fit) | "
             "loss at best | seed std |", "|---|---|---|---|---|---|---|"]
    for par, v in verdicts.items():
        for r in v.best.itertuples():
            lines.append(f"| {par} | {r.width} | {r.depth} | {r.best_log2_lr:g} | "
                         f"{r.fit_log2_lr:.2f} | {r.loss_at_best:.4f} | {r.seed_std:.4f} |")
    lines += ["", f"base depth {base_depth}", "",
              "| depth parametrization | drift (octaves, fit) | deeper is better | "
              "loss at best, first -> last |", "|---|---|---|---|"]
    for par, v in verdicts.items():
        first, last = v.best["loss_at_best"].iloc[0], v.best["loss_at_best"].iloc[-1]
        lines.append(f"| {par} | {v.drift_text} | {'yes' if v.deeper_is_better else 'no'} | "
                     f"{first:.4f} -> {last:.4f} |")
    return "\n".join(lines) + "\n"
