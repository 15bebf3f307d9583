"""`mupsweep validate` on a tiny grid produces the figure and the table with every field; each
size's optimum and the drift, along width and along depth."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from mupsweep.drift import drift_octaves, parabola_vertex
from mupsweep.validate import (
    DEPTH,
    _loss_range,
    best_lr_per_size,
    judge,
    loss_table,
    plot_validation,
    validation_markdown,
)


def test_validate_tiny_grid_writes_figure_and_table(tmp_path):
    # At 4 steps the optimum lies near 2^-7..2^-6 in both parametrizations (measured): this
    # grid brackets it, so there is a drift figure to check (an optimum on the grid edge has
    # none: tests/test_validate_trust.py).
    proc = run_cli("validate", "model=dit-tiny", "train.steps=4", "train.eval_every=4",
                   "train.val_size=32", f"sweep.out_dir={tmp_path}", "--widths", "32,64",
                   "--log2-lr=-8:-5", "--seeds", "0,1", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert Path(doc["figure"]).stat().st_size > 10_000
    md = Path(doc["table"]).read_text()
    assert "best log2 lr (fit)" in md and "wider is better" in md
    for par in ("sp", "mup"):
        v = doc[par]
        assert set(v) >= {"drift_octaves", "wider_is_better", "best"}
        assert [b["width"] for b in v["best"]] == [32, 64]
        for b in v["best"]:
            assert b["best_log2_lr"] in (-7.0, -6.0)  # inside the grid, not on its edge
            assert -8.0 <= b["fit_log2_lr"] <= -5.0
            assert b["seeds"] == 2 and b["seed_std"] >= 0.0
            assert 0 < b["loss_at_best"] < 2
        assert v["drift_octaves"] == pytest.approx(abs(v["best"][1]["fit_log2_lr"] - v["best"][0]["fit_log2_lr"]))
        # each parametrization has its own sweep outputs: SP's are not overwritten by muP's
        best = json.loads((tmp_path / par / "best.json").read_text())
        assert best["parametrization"] == par and best["study"] == f"mupsweep-{par}"
        assert (tmp_path / par / "trials.csv").read_text().count("\n") == 1 + 4 * 2
        assert (tmp_path / par / "trials" / "00000" / "w32").is_dir()
    assert not (tmp_path / "best.json").exists()


def test_parabola_vertex_recovers_a_known_optimum():
    x = np.arange(-12.0, -4.0)
    y = 0.15 + 0.01 * (x + 7.3) ** 2  # a loss-like bowl: 0.15 at 2^-7.3
    i = int(np.argmin(y))
    vertex, fitted = parabola_vertex(x, y, i)
    assert fitted and vertex == pytest.approx(-7.3)
    # a diverging point next to the optimum (SP's cliff) is left out, not fitted
    cliff = y.copy()
    cliff[x == -5.0] = 1.2
    assert parabola_vertex(x, cliff, i)[0] == pytest.approx(-7.3)
    # at the grid edge there is nothing to fit: the grid point is the answer
    assert parabola_vertex(x, (x + 20) ** 2, 0) == (-12.0, False)


def test_diverged_runs_never_win_and_missing_widths_count_as_diverged():
    doc = {"study": "s", "proxy_widths": [32, 256], "trials": [
        {"hparams": {"optim.lr": 2.0**-8}, "losses": {"32": 0.20, "256": 0.15}},
        {"hparams": {"optim.lr": 2.0**-7}, "losses": {"32": 0.18}},  # pruned: 256 diverged
        {"hparams": {"optim.lr": 2.0**-6}, "losses": {"32": 0.19, "256": math.inf}},
    ]}
    best = best_lr_per_size(loss_table(doc))
    assert best.set_index("width").loc[256, "best_log2_lr"] == -8.0
    assert best.set_index("width").loc[32, "best_log2_lr"] == -7.0


# --------------------------------------------------------------------------------------------
# Drift: one definition, the spread of the per-size optimum, wherever it is read
# --------------------------------------------------------------------------------------------


def test_drift_is_the_spread_of_the_per_size_optimum():
    """An optimum that moves up and back down moved: the narrowest and the widest agreeing
    does not make a middle width that disagrees by two octaves transfer."""
    assert drift_octaves([-7.0, -5.0, -7.0]) == 2.0
    assert drift_octaves([-7.0, -6.5, -6.0]) == pytest.approx(1.0)  # one way: end to end
    assert drift_octaves([-7.0]) is None and drift_octaves([]) is None
    # report and transfer read the per-width best trial, validate the fitted optimum: one figure
    rows = [{"log2_lr": x} for x in (-7.0, -5.0, -7.0)]
    assert drift_octaves(r["log2_lr"] for r in rows) == 2.0
    bowl = {"study": "s", "proxy_widths": [32, 64, 128], "trials": [
        {"number": i, "state": "COMPLETE", "hparams": {"optim.lr": 2.0**e},
         "losses": {"32": 0.2 + 0.01 * (e + 7) ** 2, "64": 0.2 + 0.01 * (e + 5.5) ** 2,
                    "128": 0.2 + 0.01 * (e + 7) ** 2}}
        for i, e in enumerate((-9.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0))]}
    v = judge(loss_table(bowl), "mup")
    assert list(v.best["fit_log2_lr"]) == pytest.approx([-7.0, -5.5, -7.0])
    assert v.drift_octaves == pytest.approx(1.5)


def test_depth_verdict_table_and_figure(tmp_path):
    """Along depth the same verdict, table and figure, with the shape (width, depth) per row,
    the base depth and "deeper is better"."""
    rows = [{"width": 64, "depth": d, "log2_lr": e, "seed": s,
             "loss": 0.2 - 0.01 * d + 0.01 * (e + 7 + 0.1 * d) ** 2 + 0.001 * s}
            for d in (2, 4, 8) for e in (-9.0, -8.0, -7.0, -6.0, -5.0) for s in (0, 1)]
    table = pd.DataFrame(rows)
    verdicts = {"none": judge(table, "none", DEPTH),
                "completep": judge(table.assign(loss=table["loss"] + 0.01), "completep", DEPTH)}
    v = verdicts["none"]
    assert [(b["width"], b["depth"]) for b in v.summary()["best"]] == [(64, 2), (64, 4), (64, 8)]
    assert v.summary()["depth_parametrization"] == "none" and v.summary()["deeper_is_better"]
    assert v.drift_octaves == pytest.approx(0.6, abs=0.05)
    md = validation_markdown(verdicts, base_depth=2)
    assert md.splitlines()[0] == ("| depth parametrization | width | depth | best log2 lr (grid) | "
                                  "best log2 lr (fit) | validation loss at best | seed std |")
    assert "\nbase depth 2\n" in md and "| none | 0.60 | yes | " in md
    assert plot_validation(verdicts, tmp_path / "d.png").stat().st_size > 10_000


def test_the_figure_frames_every_panel_and_not_a_blown_up_point():
    """The panels share one y range that holds every curve's lowest point (the second panel's
    included, which a range copied from the first once cut off) and stops at 3x the worst
    size's optimum, so one run near divergence does not flatten the curves around the optima."""
    def bowl(floor: float, blowup: float) -> pd.DataFrame:
        return pd.DataFrame([{"width": w, "log2_lr": e, "seed": 0,
                              "loss": blowup if e == -4.0 else floor / w ** 0.1 + 0.01 * (e + 7) ** 2}
                             for w in (32, 128) for e in (-9.0, -8.0, -7.0, -6.0, -5.0, -4.0)])
    verdicts = {"mup": judge(bowl(0.2, 0.5), "mup"), "sp": judge(bowl(0.1, 40.0), "sp")}
    low, high = _loss_range(verdicts)
    lowest = min(v.table["loss"].min() for v in verdicts.values())
    assert low < lowest == verdicts["sp"].table["loss"].min()
    worst_best = max(v.best["loss_at_best"].max() for v in verdicts.values())
    assert 3 * worst_best < high < 10 and high == pytest.approx(3 * worst_best * 1.05)
