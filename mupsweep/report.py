"""Pictures and tables of results: coordinate-check plots, sweep plots and the sweep report
(`mupsweep report`), and the output-folder checks the commands that write them share.

matplotlib comes from `mupsweep.plots.pyplot` (loaded on first use, Agg backend).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mupsweep.drift import drift_octaves
from mupsweep.errors import UserError
from mupsweep.plots import pyplot
from mupsweep.sweep.summary import (
    DRIFT_TOLERANCE_OCTAVES,
    complete_trials,
    lr_by_width,
    objective_of,
    sign_of,
    why_not_placed,
    width_losses,
)
from mupsweep.util import atomic_write, atomic_write_text, is_full, os_reason, output_dir_problem


def check_output_dir(path: str | Path | None, what: str) -> Path:
    """The output folder `path`, or a UserError of one line naming `what` (the option or key)
    when it can never be written: empty, a file, under a file, not writable
    (`mupsweep.util.output_dir_problem`). Call it before any work; it creates nothing."""
    problem = output_dir_problem(path, what)
    if problem:
        raise UserError(problem)
    return Path(path)


def make_output_dir(path: str | Path, what: str) -> Path:
    """check_output_dir, then mkdir -p, with one line when that still fails."""
    out = check_output_dir(path, what)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {out}: cannot create the folder: {os_reason(e)}") from None
    return out


def plot_coord_check(table, widths: list[int], path: Path, title: str, axis: str = "width") -> Path:
    """One panel per recorded step: mean |activation| vs width (or `axis`: depth), log-log, a
    line per module."""
    plt = pyplot()
    steps = sorted(table["step"].unique())
    modules = list(dict.fromkeys(table["module"]))
    # one look per module: 20 colours x 3 line styles x markers (matplotlib's default cycle has
    # 10 colours, so modules 1 and 11 looked the same)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    looks = {m: dict(color=colors[i % 20], ls=("-", "--", ":")[(i // 20) % 3],
                     marker="osD^v<>ph*"[i % 10]) for i, m in enumerate(modules)}
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps) + 1.8, 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, step in zip(axes, steps, strict=True):
        sub = table[table["step"] == step]
        for module, g in sub.groupby("module", sort=False):
            g = g.groupby(axis)["l1"].mean()
            ax.plot(g.index, g.values, ms=3.5, lw=1.2, label=module, **looks[module])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {step}")
        ax.set_xlabel(axis)
    axes[0].set_ylabel("mean |activation|")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False,
               ncol=1 if len(labels) <= 20 else 2)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / (3.2 * len(steps) + 1.8), 1))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Sweep report: what `mupsweep report` writes from a study summary (see mupsweep.sweep.summary)
# --------------------------------------------------------------------------------------------


def lr_points(best_doc: dict) -> tuple[dict[int, list[tuple[float, float, dict]]], list[str]]:
    """Per proxy width: (lr, loss, other HPs) of every complete trial, sorted by lr; and the
    other HPs whose values differ between trials (then points at two lrs are not one curve)."""
    widths = [int(w) for w in best_doc.get("proxy_widths", [])]
    points: dict[int, list[tuple[float, float, dict]]] = {w: [] for w in widths}
    others: dict[str, set] = {}
    for t in complete_trials(best_doc):
        hp = dict(t.get("hparams") or {})
        lr = hp.pop("optim.lr", None)
        if not isinstance(lr, int | float) or lr <= 0:
            continue
        for k, v in hp.items():
            others.setdefault(k, set()).add(repr(v))
        for w, loss in width_losses(t, widths).items():
            points.setdefault(w, []).append((float(lr), loss, hp))
    varying = sorted(k for k, v in others.items() if len(v) > 1)
    return {w: sorted(p, key=lambda x: x[0]) for w, p in points.items() if p}, varying


def plot_lr_vs_loss(best_doc: dict, path: Path) -> Path:
    """The objective (validation loss unless the study names another metric) vs log2 lr per
    proxy width, each width's best marked (a star).

    Under muP the minima line up across widths: the picture that shows transfer works. When
    only the lr varies (a grid, or the demo) each width is one curve; when other HPs vary too
    (the default search space), points at two lrs differ in more than the lr, so they are not
    joined: one panel per width, each point coloured by the first other HP that varies."""
    plt = pyplot()
    points, varying = lr_points(best_doc)
    par = best_doc.get("parametrization", "?")
    objective, sign = objective_of(best_doc), sign_of(best_doc)
    title = f"{best_doc.get('study', 'study')} ({par}): {objective} vs lr per proxy width (* = best)"
    if not varying or not points:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(1, len(points))))
        for color, (w, pts) in zip(colors, sorted(points.items()), strict=False):
            curve: dict[float, float] = {}
            for lr, loss, _ in pts:  # repeats of one lr (seeds): the best
                if lr not in curve or sign * loss < sign * curve[lr]:
                    curve[lr] = loss
            x = [math.log2(lr) for lr in curve]
            y = list(curve.values())
            ax.plot(x, y, marker="o", ms=4, lw=1.5, color=color, label=f"width {w}")
            i = int(np.argmin(sign * np.asarray(y)))
            ax.plot([x[i]], [y[i]], marker="*", ms=16, color=color, markeredgecolor="black", zorder=5)
        if not points:
            ax.text(0.5, 0.5, "no complete trials with optim.lr", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel(objective.replace("_", " "))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if points:
            ax.legend(frameon=False)
        fig.tight_layout()
    else:
        key = varying[0]
        fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points) + 1.0, 4.4),
                                 sharey=True, squeeze=False, layout="constrained")
        axes = list(axes[0])

        def shade(v) -> float:
            return math.log2(v) if isinstance(v, int | float) and v > 0 else float("nan")

        all_c = [shade(hp.get(key)) for pts in points.values() for _, _, hp in pts]
        finite = [c for c in all_c if math.isfinite(c)] or [0.0]
        norm = plt.Normalize(min(finite), max(finite))
        for ax, (w, pts) in zip(axes, sorted(points.items()), strict=True):
            x = [math.log2(lr) for lr, _, _ in pts]
            y = [loss for _, loss, _ in pts]
            sc = ax.scatter(x, y, c=[shade(hp.get(key)) for _, _, hp in pts], cmap="viridis",
                            norm=norm, s=28, edgecolors="none")
            i = int(np.argmin(sign * np.asarray(y)))
            ax.plot([x[i]], [y[i]], marker="*", ms=16, color="none", markeredgecolor="black",
                    zorder=5)
            ax.set_title(f"width {w}")
            ax.set_xlabel("log2 learning rate")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(objective.replace("_", " "))
        others = ", ".join(varying[1:])
        fig.colorbar(sc, ax=axes, label=f"log2 {key}")
        fig.suptitle(title + (f"\nalso varying, not shown: {others}" if others else ""), fontsize=10)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def plot_history(best_doc: dict, path: Path) -> Path:
    """Objective per trial number (complete trials as dots; pruned ones as crosses at the last
    loss they reported, which is how far they got) and the best-so-far line: how fast the
    sweep found its optimum. Failed trials have no loss and are counted in the legend."""
    plt = pyplot()
    (xs, ys), (px, py), failed = history_points(best_doc)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if xs:
        ax.plot(xs, ys, "o", ms=5, alpha=0.7, label="complete trial")
        sign = sign_of(best_doc)
        best_so_far = sign * np.minimum.accumulate(sign * np.asarray(ys))
        ax.step(xs, best_so_far, where="post", color="C3", lw=2, label="best so far")
    if px:
        ax.plot(px, py, "x", color="gray", label="pruned (last reported loss)")
    if failed:  # no loss to draw: failed, or pruned before any report (older best.json too)
        ax.plot([], [], " ", label=f"{failed} failed / no loss reported")
    done = xs
    if xs or px or failed:
        ax.legend(frameon=False)
    if not done:
        ax.text(0.5, 0.5, "no complete trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective ({objective_of(best_doc).replace('_', ' ')})")
    ax.set_title(f"{best_doc.get('study', 'study')}: optimization history")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return Path(path)


def history_points(best_doc: dict) -> tuple[tuple[list, list], tuple[list, list], int]:
    """(numbers, values) of the complete trials, (numbers, last reported losses) of the pruned
    ones that reported any, and how many trials have no loss to draw."""
    done = sorted(complete_trials(best_doc), key=lambda t: t.get("number", 0))
    others = [t for t in best_doc.get("trials", []) if t not in done]
    pruned = [t for t in others if t.get("state") == "PRUNED" and _finite(t.get("last_reported"))]
    return (([t.get("number", i) for i, t in enumerate(done)], [float(t["value"]) for t in done]),
            ([t.get("number", 0) for t in pruned], [float(t["last_reported"]) for t in pruned]),
            len(others) - len(pruned))


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


REPORT_FILES = ("lr_vs_loss.png", "history.png", "report.md")


def write_report(best_doc: dict, out_dir: str | Path, top: int = 20, what: str = "-o") -> Path:
    """Write lr_vs_loss.png, history.png and report.md (summary, per-width best lr, cost and
    the top `top` trials by value) into out_dir; return the markdown path. `what` names the
    option that chose out_dir in errors.

    Each file is replaced whole (written beside it, then renamed), so a failed write (a full
    disk, a size limit) is one line naming the file, and every file there stays as it was or
    is the new one, never half of one; the study is only read."""
    if top < 0:
        raise UserError(f"--top {top}: give the number of trials to list (0 or more)")
    out_dir = make_output_dir(out_dir, what)
    path = out_dir / REPORT_FILES[0]
    try:
        lr_png = plot_lr_vs_loss(best_doc, path)
        path = out_dir / REPORT_FILES[1]
        hist_png = plot_history(best_doc, path)
        path = out_dir / REPORT_FILES[2]
        return atomic_write_text(path, _report_markdown(best_doc, lr_png, hist_png, top))
    except OSError as e:
        done = REPORT_FILES[:REPORT_FILES.index(path.name)]
        kept = (f"{', '.join(done)} written, the rest as before" if done
                else "the files there are as they were")
        again = "; free space and run report again" if is_full(e) else ""
        raise UserError(f"cannot write {path}: {os_reason(e)}; {kept} (each file is replaced "
                        f"whole){again}") from None


def _report_markdown(best_doc: dict, lr_png: Path, hist_png: Path, top: int) -> str:
    """report.md's text."""
    d = best_doc
    lines = [f"# Sweep report: {d.get('study', '?')}", "",
             f"- parametrization: **{d.get('parametrization')}**",
             f"- proxy widths: {', '.join(map(str, d.get('proxy_widths', [])))}",
             f"- objective: {objective_of(d)} ({d.get('direction') or 'minimize'})",
             f"- best trial: {_best_line(d)}",
             f"- storage: {d.get('storage')}"]
    cost = d.get("cost") or {}
    if cost:
        measuring = (f" ({_fmt(cost['eval_time_s'])} s of it measuring {objective_of(d)})"
                     if cost.get("eval_time_s") else "")
        lines.append(f"- cost: {_fmt(cost.get('flops'))} FLOPs, {_fmt(cost.get('wall_time_s'))} s{measuring}; "
                     f"{_fmt(cost.get('n_complete'))} complete, {_fmt(cost.get('n_pruned'))} pruned, "
                     f"{_fmt(cost.get('n_failed'))} failed")
    lines += ["", "## Best hyperparameters", ""]
    lines += _md_table(["key", "value", "log2"], [
        [k, v, math.log2(v) if isinstance(v, int | float) and v > 0 else None]
        for k, v in d.get("hparams", {}).items()])

    rows = lr_by_width(d)
    lines += ["", "## Best learning rate per proxy width", ""]
    lines += _md_table(["width", "best lr", "log2 lr", objective_of(d), "trials"],
                       [[r["width"], r["lr"], r["log2_lr"], r["loss"], r["trials"]] for r in rows])
    spread, unplaced = drift_octaves(r["log2_lr"] for r in rows), why_not_placed(rows)
    if spread is not None and unplaced:
        lines += ["", f"No verdict on transfer: {unplaced}. Run more trials (or a wider lr "
                  "range) before reading the spread between widths."]
    elif spread is not None:
        verdict = "agree (transfer looks reliable)" if spread <= DRIFT_TOLERANCE_OCTAVES else "**disagree: transfer looks unreliable**"
        lines += ["", f"Spread {spread:.2f} octaves: the widths {verdict}."]

    lines += ["", f"![loss vs lr per width]({lr_png.name})", "", f"![history]({hist_png.name})"]

    widths = [str(w) for w in d.get("proxy_widths", [])]
    hp_keys = sorted({k for t in d.get("trials", []) for k in (t.get("hparams") or {})})
    ranked = sorted(complete_trials(d), key=lambda t: sign_of(d) * t["value"])[:top]
    lines += ["", f"## Top {len(ranked)} trials by value", ""]
    lines += _md_table(
        ["trial", objective_of(d), *hp_keys, *(f"w{w}" for w in widths), "FLOPs", "wall s"],
        [[t.get("number"), t.get("value"), *((t.get("hparams") or {}).get(k) for k in hp_keys),
          *((t.get("losses") or {}).get(w) for w in widths), t.get("flops"), t.get("wall_time_s")]
         for t in ranked])
    return "\n".join(lines) + "\n"


def _best_line(d: dict) -> str:
    """"7, value 0.1373", or why there is none: "no complete trial (5 pruned, 0 failed)"."""
    if d.get("trial") is not None and d.get("value") is not None:
        return f"{_fmt(d['trial'])}, value {_fmt(d['value'])}"
    states = [t.get("state") for t in d.get("trials", [])]
    cost = d.get("cost") or {}
    pruned = cost.get("n_pruned", states.count("PRUNED"))
    failed = cost.get("n_failed", states.count("FAIL"))
    return f"none: no complete trial ({pruned} pruned, {failed} failed)"
