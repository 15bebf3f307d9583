"""`validate` and grid sweeps never give a wrong answer in silence: each grid point runs exactly
once whatever the number of workers or machines, a grid with missing points is not judged, an
optimum on the grid edge is reported as such, and the lr grid stays inside [LOW, HIGH]."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import time

import optuna
import pytest
from conftest import assert_one_line_error, run_cli
from test_tune import FAST, load, tune_cli

from mupsweep.config import compose
from mupsweep.errors import UserError
from mupsweep.sweep.space import search_space
from mupsweep.sweep.study import enqueue_grid, open_study
from mupsweep.validate import (
    grid_config,
    judge,
    loss_table,
    parse_log2_grid,
    validation_markdown,
    why_incomplete,
)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TINY_GRID = ["model=dit-tiny", "train.steps=4", "train.eval_every=4", "train.val_size=32"]


def finished_points(study: optuna.Study) -> collections.Counter:
    """How many COMPLETE or PRUNED trials ran each point."""
    return collections.Counter(tuple(sorted(t.params.items())) for t in study.trials
                               if t.state in FINISHED)


# --------------------------------------------------------------------------------------------
# Each grid point exactly once
# --------------------------------------------------------------------------------------------


def test_validate_with_three_workers_runs_each_point_once(tmp_path):
    """The issue's command: 3 workers on a 3-point grid ran 2^-8 twice and never 2^-7 (Optuna's
    GridSampler shuffles the grid with each worker's own seed). At this budget (4 steps) the
    optimum lies above 2^-6: the verdict must say so, not print a drift of 0.00."""
    out = tmp_path / "v"
    proc = run_cli("validate", *TINY_GRID, f"sweep.out_dir={out}", "--widths", "32,64",
                   "--log2-lr=-8:-6", "--seeds", "0", "--workers", "3", "--parametrizations", "mup",
                   "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = finished_points(load(f"sqlite:///{out}/study.db", "mupsweep-mup"))
    assert points == {(("optim.lr:log2", e), ("train.seed", 0)): 1 for e in (-8.0, -7.0, -6.0)}
    v = json.loads(proc.stdout)["mup"]
    assert [b["best_log2_lr"] for b in v["best"]] == [-6.0, -6.0]  # measured: the top edge
    assert v["drift_octaves"] is None and not v["judged"]
    assert v["why_not"] == "optimum at the grid edge 2^-6 (width 32, 64): widen --log2-lr"
    assert "not judged: optimum at the grid edge 2^-6" in proc.stderr


def test_grid_tune_joined_by_a_second_machine_runs_each_point_once(tmp_path):
    """A second `tune` on the same study with another sweep.seed (the README's advice for a
    machine joining a study) drew an already-run point under GridSampler; enqueued points
    cannot repeat. Resuming is idempotent: nothing is enqueued twice."""
    out = tmp_path / "sweep"
    grid = ["sweep.sampler=grid", "sweep.pruner=none",
            "sweep.params=[{name:optim.lr,type:float,log2:true,low:-9,high:-7,step:1}]"]
    tune_cli(out, *grid, "sweep.n_trials=2", "sweep.seed=0")
    tune_cli(out, *grid, "sweep.n_trials=3", "sweep.seed=1")
    study = load(f"sqlite:///{out}/study.db")
    assert finished_points(study) == {(("optim.lr:log2", e),): 1 for e in (-9.0, -8.0, -7.0)}
    proc = tune_cli(out, *grid, "sweep.n_trials=3", "sweep.seed=2")  # finished: runs nothing
    assert "trial 3" not in proc.stderr
    assert len(load(f"sqlite:///{out}/study.db").trials) == 3  # and enqueues nothing


POP = """
import json, sys, time
import optuna
from mupsweep.config import compose
from mupsweep.sweep.storage import open_for_tune, parse_storage
url, n, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
storage = open_for_tune(compose(["sweep.heartbeat_s=0"]), parse_storage(url))
study = optuna.load_study(study_name="pop", storage=storage)
while time.time() < start:  # all processes pop at once
    time.sleep(0.001)
popped = []
while (number := study.ask().number) < n:  # past n: the queue is empty, a new trial was made
    popped.append(number)
print(json.dumps(popped))
"""


def test_sqlite_pops_each_enqueued_trial_once(tmp_path):
    """The grid rests on Optuna's queue handing each WAITING trial to one worker. On SQLite it
    did not (the driver ran the state check outside the transaction): 4 processes popping 60
    trials took 17 of them twice. mupsweep's SQLite storage makes the pop one transaction."""
    url = f"sqlite:///{tmp_path}/pop.db"
    study = optuna.create_study(study_name="pop", storage=url)
    n = 60
    for i in range(n):
        study.enqueue_trial({"x": i})
    start = time.time() + 5
    procs = [subprocess.Popen([sys.executable, "-c", POP, url, str(n), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    popped = collections.Counter()
    for proc in procs:
        popped.update(json.loads(proc.communicate(timeout=120)[0]))
    assert popped == collections.Counter(range(n))  # each once, none lost


def test_duplicate_seed_choices_do_not_loop(tmp_path):
    """A grid that lists a value twice has fewer distinct points than its product of lengths:
    the budget is the distinct points, so the sweep ends instead of waiting for a point that
    does not exist."""
    out = tmp_path / "sweep"
    tune_cli(out, "sweep.sampler=grid", "sweep.pruner=none", "sweep.n_trials=5",
             "sweep.params=[{name:optim.lr,type:categorical,choices:[0.001,0.001,0.002]}]",
             timeout=120)
    assert sum(finished_points(load(f"sqlite:///{out}/study.db")).values()) == 2


# --------------------------------------------------------------------------------------------
# A grid with missing points is not judged
# --------------------------------------------------------------------------------------------


def _grid_study(out, overrides: list[str], done: list[float]) -> None:
    """The validate study of `overrides` (mup, widths 32/64, seed 0), with a finished trial at
    each log2 lr of `done` (repeats allowed: the shape an older, inexact grid left behind)."""
    cfg = compose([*TINY_GRID, f"sweep.out_dir={out}", "sweep.heartbeat_s=0", *overrides])
    run = grid_config(cfg, "mup", [-8.0, -7.0, -6.0], [0], [32, 64], cfg.sweep.study, out)
    study = open_study(run, search_space(run))
    for e in done:
        study.enqueue_trial({"optim.lr:log2": e, "train.seed": 0})
        trial = study.ask()
        trial.suggest_float("optim.lr:log2", -8.0, -6.0, step=1.0)
        trial.suggest_categorical("train.seed", [0])
        trial.set_user_attr("hparams", {"optim.lr": 2.0**e, "train.seed": 0})
        trial.set_user_attr("losses", {"32": 0.5 + 0.01 * (e + 7) ** 2, "64": 0.4 + 0.01 * (e + 7) ** 2})
        study.tell(trial, 0.45)


def test_grid_with_repeated_points_is_refused_not_judged(tmp_path):
    """3 trials on 2 distinct points (what the old sampler left): the budget is spent, 2^-7 was
    never run. Exit 1, naming the missing point and what to do; no verdict, no figure."""
    out = tmp_path / "v"
    _grid_study(out, [], done=[-8.0, -8.0, -6.0])
    proc = run_cli("validate", *TINY_GRID, f"sweep.out_dir={out}", "--widths", "32,64",
                   "--log2-lr=-8:-6", "--seeds", "0", "--parametrizations", "mup", "--json",
                   timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    why = json.loads(proc.stdout)["incomplete"]["mup"]
    assert "is missing 1 of 3 points (2^-7 seed 0)" in why and "another sweep.study" in why
    assert "not judged" in proc.stderr and "2^-7 seed 0" in proc.stderr
    assert "drift" not in proc.stderr and not (out / "validate.png").exists()


def test_grid_with_failed_points_says_re_run(tmp_path):
    """A point whose trials failed (not diverged: an error, a dead worker) is missing, and a
    re-run completes it: the message says so."""
    out = tmp_path / "v"
    _grid_study(out, [], done=[-8.0, -6.0])
    cfg = compose([*TINY_GRID, f"sweep.out_dir={out}", "sweep.heartbeat_s=0"])
    run = grid_config(cfg, "mup", [-8.0, -7.0, -6.0], [0], [32, 64], cfg.sweep.study, out)
    params = search_space(run)
    study = open_study(run, params)
    assert enqueue_grid(study, params) == 1  # only the missing point
    assert enqueue_grid(study, params) == 0  # idempotent
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    why = why_incomplete(study, params, out / "mup" / "trials.csv")
    assert why is not None and "missing 1 of 3 points (2^-7 seed 0)" in why
    assert why.endswith(f"reasons in {out}/mup/trials.csv); re-run to complete the grid")


def test_study_of_another_grid_is_refused(tmp_path):
    """Same study name, another --log2-lr: its old points would fill this grid's budget."""
    out = tmp_path / "v"
    _grid_study(out, [], done=[-8.0, -7.0, -6.0])
    proc = run_cli("validate", *TINY_GRID, f"sweep.out_dir={out}", "--widths", "32,64",
                   "--log2-lr=-9:-7", "--seeds", "0", "--parametrizations", "mup", timeout=120)
    assert_one_line_error(proc, "holds trials of another grid (2^-6 seed 0)", "another sweep.study")


# --------------------------------------------------------------------------------------------
# Judging: the grid edge, every run diverged
# --------------------------------------------------------------------------------------------


def _doc(losses_by_lr: dict[float, dict[str, float]]) -> dict:
    trials = [{"number": i, "state": "COMPLETE", "hparams": {"optim.lr": 2.0**e}, "losses": losses}
              for i, (e, losses) in enumerate(losses_by_lr.items())]
    return {"study": "s", "proxy_widths": [32, 256], "trials": trials}


def test_optimum_on_the_grid_edge_is_not_a_drift_figure():
    monotone = _doc({e: {"32": 1 + 0.1 * e, "256": 0.9 + 0.1 * e} for e in (-8.0, -7.0, -6.0)})
    v = judge(loss_table(monotone), "mup")  # the lowest loss at 2^-8 at both widths
    assert v.drift_octaves is None
    assert v.why_not == "optimum at the grid edge 2^-8 (width 32, 256): widen --log2-lr"
    assert "| mup | not judged: optimum at the grid edge 2^-8" in validation_markdown({"mup": v})

    bowl = _doc({e: {"32": 0.2 + 0.01 * (e + 7) ** 2, "256": 0.1 + 0.01 * (e + 7.25) ** 2}
                 for e in (-9.0, -8.0, -7.0, -6.0, -5.0)})
    v = judge(loss_table(bowl), "mup")
    assert v.why_not is None and v.drift_octaves == pytest.approx(0.25)


def test_every_lr_diverged_is_not_an_optimum():
    doc = _doc({e: {"32": 0.2 + (e + 7) ** 2, "256": math.nan} for e in (-8.0, -7.0, -6.0)})
    v = judge(loss_table(doc), "sp")
    assert v.drift_octaves is None and "every lr diverged at width 256" in v.why_not


def test_failed_trials_are_not_counted_as_diverged():
    """A FAIL trial (an error, a dead worker) left partial losses: its missing width did not
    diverge, and a surplus trial's point is counted once."""
    doc = _doc({e: {"32": 0.2 + (e + 7) ** 2, "256": 0.1 + (e + 7) ** 2} for e in (-8.0, -7.0, -6.0)})
    doc["trials"].append({"number": 3, "state": "FAIL", "hparams": {"optim.lr": 2.0**-7},
                          "losses": {"32": 5.0}})
    doc["trials"].append({"number": 4, "state": "COMPLETE", "hparams": {"optim.lr": 2.0**-7},
                          "losses": {"32": 9.0, "256": 9.0}})  # a repeat: the first one counts
    v = judge(loss_table(doc), "mup")
    assert list(v.best["best_log2_lr"]) == [-7.0, -7.0] and list(v.best["seeds"]) == [1, 1]


# --------------------------------------------------------------------------------------------
# The lr grid: inside [LOW, HIGH], bad input is one line
# --------------------------------------------------------------------------------------------


def test_log2_grid_stays_inside_low_high():
    assert parse_log2_grid("-10:-8") == ([-10.0, -9.0, -8.0], None)
    grid, note = parse_log2_grid("-12:-5:2")
    assert grid == [-12.0, -10.0, -8.0, -6.0]  # not -4: HIGH is -5
    assert note == "--log2-lr -12:-5:2: the grid is -12, -10, -8, -6 (HIGH -5 is not on it)"
    grid, note = parse_log2_grid("-1:0:0.1")
    assert len(grid) == 11 and grid[-1] == 0.0 and note is None  # no float drift past HIGH
    for bad in ("nan:inf", "-5:-12", "-12:-5:0", "-12:-5:-1", "-12", "a:b", "-12:-5:1:2"):
        with pytest.raises(UserError, match="LOW:HIGH"):
            parse_log2_grid(bad)


@pytest.mark.parametrize("args, needle", [
    (["--log2-lr", "nan:inf"], "--log2-lr='nan:inf'"),
    (["--log2-lr=-5:-12"], "LOW < HIGH"),
    (["--log2-lr=-12:-5:1e-9"], "at most 1000"),
    (["--seeds", "0,0"], "--seeds='0,0' lists a value twice"),
    (["--widths", "32"], "at least 2 widths"),
])
def test_validate_bad_input_is_one_line(tmp_path, args, needle):
    proc = run_cli("validate", *FAST[:1], f"sweep.out_dir={tmp_path}", *args, timeout=60)
    assert_one_line_error(proc, needle)
