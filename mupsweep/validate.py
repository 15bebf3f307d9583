"""Does the optimum stay put? A grid over log2 lr at several widths, in muP and in SP.

`validate(cfg)` runs one grid study per parametrization with the ordinary sweep machinery
(`tune.tune`: same storage, workers, resume), then reads the per-width losses back and
reports, per width: the grid argmin of log2 lr, a least-squares parabola through the grid points
around it, the loss there and its seed noise; the drift of the optimum (octaves) from the
narrowest to the widest width; and whether the loss at the optimum improves with every width
step ("wider is better"). The two-panel figure (SP | muP) is the picture that sells muP.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mupsweep.best import best_document
from mupsweep.config import Config, SweepParam
from mupsweep.errors import UserError
from mupsweep.sweep.packing import packs_by_default
from mupsweep.tune import tune


def loss_table(doc: dict) -> pd.DataFrame:
    """One row per (trial, width): log2_lr, seed, loss (NaN where that run diverged)."""
    rows = []
    for trial in doc["trials"]:
        hp = trial.get("hparams") or {}
        if "optim.lr" not in hp:
            continue
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
                     "seed_std": float(stats["std"].iloc[i]) if stats["count"].iloc[i] > 1 else 0.0,
                     "seeds": int(stats["count"].iloc[i])})
    return pd.DataFrame(rows).sort_values("width").reset_index(drop=True)


@dataclass
class Verdict:
    parametrization: str
    table: pd.DataFrame  # raw losses
    best: pd.DataFrame  # best_per_width
    drift_octaves: float  # |fit log2 lr at the widest - at the narrowest|
    wider_is_better: bool  # loss at the optimum decreases with every width step

    def summary(self) -> dict:
        return {"parametrization": self.parametrization, "drift_octaves": self.drift_octaves,
                "wider_is_better": self.wider_is_better,
                "best": self.best.to_dict(orient="records")}


def verdict(doc: dict, parametrization: str) -> Verdict:
    table = loss_table(doc)
    best = best_per_width(table)
    drift = abs(best["fit_log2_lr"].iloc[-1] - best["fit_log2_lr"].iloc[0])
    losses = best["loss_at_best"].to_numpy()
    return Verdict(parametrization, table, best, float(drift), bool(np.all(np.diff(losses) < 0)))


@dataclass
class ValidationResult:
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    figure: str | None = None
    table_md: str | None = None

    def summary(self) -> dict:
        return {"figure": self.figure, "table": self.table_md,
                **{p: v.summary() for p, v in self.verdicts.items()}}


def grid_config(cfg: Config, parametrization: str, log2_lrs: list[float], seeds: list[int],
                widths: list[int], study: str) -> Config:
    """The sweep config for one parametrization's grid: lr x seed, every width per trial."""
    run = copy.deepcopy(cfg)
    run.model.parametrization = parametrization
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


def validate(cfg: Config, widths: list[int], log2_lrs: list[float], seeds: list[int],
             parametrizations: tuple[str, ...] = ("sp", "mup"), workers: int = 1,
             out_dir: str | None = None, pack: int | None = None) -> ValidationResult:
    """Run (or resume) the grid for each parametrization and judge the transfer.

    pack: grid points trained at once as one packed model (sweep.pack). None: on a GPU the
    whole grid split evenly over the workers, so with one worker each width's lr x seed grid is
    one pack; on a CPU, where packing wide models is slower, one at a time
    (`sweep.packing.packs_by_default`)."""
    if len(widths) < 2 or len(log2_lrs) < 3:
        raise UserError("validate needs at least 2 widths and 3 learning rates")
    out = Path(out_dir or cfg.sweep.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ValidationResult()
    for par in parametrizations:
        run = grid_config(cfg, par, log2_lrs, seeds, widths, cfg.sweep.study)
        if pack is None:
            pack = math.ceil(run.sweep.n_trials / max(1, workers)) if packs_by_default(run) else 1
        run.sweep.pack = pack
        study = tune(run, workers=workers)
        result.verdicts[par] = verdict(best_document(study), par)
        result.verdicts[par].table.to_csv(out / f"validate_{par}.csv", index=False)
    result.figure = str(plot_validation(result.verdicts, out / "validate.png"))
    md = validation_markdown(result.verdicts)
    (out / "validate.md").write_text(md)
    result.table_md = str(out / "validate.md")
    return result


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
        ax.set_title(f"{name}: optimum drifts {v.drift_octaves:.2f} octaves")
        ax.set_xlabel("log2 learning rate")
        ax.set_yscale("log")
    axes[0].set_ylabel("validation loss")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
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
        lines.append(f"| {par} | {v.drift_octaves:.2f} | {'yes' if v.wider_is_better else 'no'} |")
    return "\n".join(lines) + "\n"
