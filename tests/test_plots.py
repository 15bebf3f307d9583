"""The pictures say what happened: pruned trials at the loss they reached, lr points of trials
that differ in other HPs not joined as one curve, class names on sample grids, a look per
coord-check module, and `inspect` tables not cut at 80 columns."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
from conftest import run_cli
from PIL import Image

from mupsweep.images import label_columns
from mupsweep.report import history_points, lr_points, plot_coord_check, plot_lr_vs_loss
from mupsweep.sweep.summary import study_summary


def study_with_a_pruned_trial() -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    done = study.ask()
    done.set_user_attr("hparams", {"optim.lr": 1e-3})
    done.set_user_attr("losses", {"32": 0.2})
    study.tell(done, 0.2)
    pruned = study.ask()
    pruned.set_user_attr("hparams", {"optim.lr": 1e-1})
    pruned.report(0.9, 1)
    pruned.report(0.7, 2)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return study


def test_history_draws_a_pruned_trial_at_its_last_reported_loss():
    doc = study_summary(study_with_a_pruned_trial())
    assert [t["last_reported"] for t in doc["trials"]] == [None, 0.7, None]
    (xs, ys), (px, py), no_loss = history_points(doc)
    assert (xs, ys) == ([0], [0.2])
    assert (px, py) == ([1], [0.7])  # not at the best value 0.2, where it used to be drawn
    assert no_loss == 1


def doc_of(points: list[tuple[float, float, float]]) -> dict:
    """A study summary with trials (lr, init_mult, loss at width 32)."""
    trials = [{"number": i, "state": "COMPLETE", "value": loss, "losses": {"32": loss},
               "hparams": {"optim.lr": lr, "model.init_mult": init}}
              for i, (lr, init, loss) in enumerate(points)]
    return {"study": "s", "parametrization": "mup", "proxy_widths": [32], "trials": trials}


def test_lr_points_of_trials_that_differ_in_other_hps_are_not_one_curve(tmp_path):
    one_curve = doc_of([(1e-3, 1.0, 0.3), (2e-3, 1.0, 0.2), (4e-3, 1.0, 0.25)])
    assert lr_points(one_curve)[1] == []
    mixed = doc_of([(1e-3, 1.0, 0.3), (2e-3, 0.25, 0.2), (4e-3, 4.0, 0.25)])
    points, varying = lr_points(mixed)
    assert varying == ["model.init_mult"]
    assert [(lr, hp["model.init_mult"]) for lr, _, hp in points[32]] == [(1e-3, 1.0), (2e-3, 0.25),
                                                                        (4e-3, 4.0)]
    for doc in (one_curve, mixed):
        assert plot_lr_vs_loss(doc, tmp_path / "lr.png").stat().st_size > 0


def test_sample_grid_columns_are_named():
    grid = Image.new("L", (10 * 66 + 2, 2 * 66 + 2), 128)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    out = np.asarray(label_columns(grid, names))
    assert out.shape == (grid.height + 14, grid.width)
    strip = out[:14]
    for c in range(10):  # every column has dark text pixels in the strip above it
        assert (strip[:, c * 66 + 2:(c + 1) * 66] < 100).any(), c
    assert (out[14:] == 128).all()  # the images themselves are untouched


def test_coord_check_plot_gives_each_of_16_modules_its_own_look(tmp_path):
    modules = [f"m{i}" for i in range(16)]
    table = pd.DataFrame([{"module": m, "step": 1, "width": w, "seed": 0, "l1": 1.0 + i}
                          for i, m in enumerate(modules) for w in (32, 64)])
    import matplotlib.pyplot as plt

    seen = []
    original = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        seen.extend((tuple(line.get_color()), line.get_linestyle(), line.get_marker())
                    for line in fig.axes[0].get_lines())
        legend = fig.legends[0]
        seen.append(("legend font", legend.get_texts()[0].get_fontsize()))
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = capture
    try:
        plot_coord_check(table, [32, 64], tmp_path / "c.png", "t")
    finally:
        plt.Figure.savefig = original
    looks, legend = seen[:-1], seen[-1]
    assert len(looks) == 16 and len(set(looks)) == 16
    assert len({look[0] for look in looks}) == 16  # 16 colours, not 10 repeating
    assert legend[1] >= 8


def test_inspect_table_is_not_cut_at_80_columns():
    proc = run_cli("inspect", "model.width=128", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert "depth lr x" in proc.stdout  # a whole header, not "d…" (the table is the product: stdout)
    row = next(line for line in proc.stdout.splitlines() if "blocks.0.attn.qkv.weight" in line)
    assert "384x128" in row and "hidden" in row and "0.0005" in row and "0.25" in row
