"""Where the best learning rate sits at one model size, and how far it moves across sizes.

`place_optimum` places one size's optimum on an lr grid (the grid argmin, refined by a
parabola fit around it); `drift_octaves` is the one definition of drift, read by `validate`
(from the fitted optima), by `transfer`'s drift check and by `report` (from each width's best
trial, `mupsweep.sweep.summary.lr_by_width`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


def drift_octaves(log2_lrs: Iterable[float]) -> float | None:
    """How far the best lr moves across model sizes, in octaves: the spread (max - min) of the
    per-size optimum's log2 lr, one value per size. None with fewer than two sizes.

    The spread, not |widest - narrowest|: muP claims the optimum is the same at every size, so
    the figure that tests the claim is the largest disagreement between any two sizes, which
    is also how far off an lr carried from one size to another can be. The distance between
    the end sizes alone reads an optimum that moves up and back down again (a noisy middle
    width) as no drift at all; when the optimum moves one way, the two are the same number."""
    values = [float(x) for x in log2_lrs]
    if len(values) < 2:
        return None
    return max(values) - min(values)


@dataclass(frozen=True)
class Optimum:
    """One size's optimum on an lr grid."""

    index: int  # position of the grid argmin
    best_log2_lr: float  # the grid argmin
    fit_log2_lr: float  # the parabola's vertex around it, or the argmin when nothing was fitted
    fitted: bool
    at_edge: bool  # the argmin is the lowest or highest lr of the grid: only a bound
    all_diverged: bool  # no lr gave a finite loss


def place_optimum(log2_lrs: np.ndarray, losses: np.ndarray) -> Optimum:
    """The optimum of one size from its mean loss at each grid lr (sorted by lr; NaN or inf
    where the runs diverged, which never wins)."""
    x = np.asarray(log2_lrs, dtype=float)
    y = np.where(np.isfinite(losses), losses, np.inf)
    i = int(np.argmin(y))
    fit, fitted = parabola_vertex(x, y, i)
    return Optimum(index=i, best_log2_lr=float(x[i]), fit_log2_lr=fit, fitted=fitted,
                   at_edge=i in (0, len(x) - 1), all_diverged=not np.isfinite(y).any())


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
