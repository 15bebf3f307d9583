"""`mupsweep tune` never gives a wrong answer in silence: re-runs draw new points, a study
refuses trials of another budget, a sweep with nothing to transfer says so, no file or stream
holds the storage password, bad input stops before any worker starts, and Ctrl-C or a killed
worker loses nothing. Real storages, real worker processes, real signals, real training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import assert_one_line_error, finish, frozen_mid_trial, run_cli
from optuna.trial import TrialState
from test_tune import FAST, assert_exact_budget, load

from mupsweep.config import compose, to_dict
from mupsweep.errors import UserError
from mupsweep.sweep.retry import INTERRUPTED, SURPLUS
from mupsweep.sweep.study import open_study
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import shortfall, tune, write_outputs
from mupsweep.sweep.workers import EXIT_BAD_INPUT, run_worker_processes

# Trials long enough to signal mid-trial (about 7 s each on one core).
LONG = ["train.steps=400", "train.eval_every=50", "sweep.pruner=none"]


def hp_sets(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials if t.params]


def cfg_of(out: Path, *overrides: str):
    return compose([*FAST, f"sweep.out_dir={out}", *overrides])


def popen_tune(out: Path, *overrides: str) -> subprocess.Popen:
    """`mupsweep tune` in a process group of its own (its workers join it), as a shell runs it."""
    return subprocess.Popen([sys.executable, "-m", "mupsweep.cli", "tune", *FAST, f"sweep.out_dir={out}",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


# --------------------------------------------------------------------------------------------
# 4. A re-run, a resumed study or another worker draws new points; the same seed repeats them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_draws_new_points(tmp_path, sampler):
    resumed = [f"sweep.sampler={sampler}", "sweep.pruner=none"]
    tune(cfg_of(tmp_path / "a", *resumed, "sweep.n_trials=2"))
    tune(cfg_of(tmp_path / "a", *resumed, "sweep.n_trials=4"))
    study = tune(cfg_of(tmp_path / "a", *resumed, "sweep.n_trials=6"))
    assert len(set(hp_sets(study))) == 6, hp_sets(study)
    # Reproducible: the same seed in one go draws the same points, trial by trial.
    fresh = tune(cfg_of(tmp_path / "b", *resumed, "sweep.n_trials=6"))
    assert hp_sets(fresh) == hp_sets(study)


def test_a_resumed_grid_runs_every_point_once(tmp_path):
    """Grid trial n runs point n of one order fixed by sweep.seed: a per-trial (or per-worker)
    seed would reorder the grid under later trials and run it with repeats and gaps."""
    grid = ["sweep.sampler=grid", "sweep.pruner=none",
            "sweep.params=[{name:optim.lr,type:categorical,choices:[0.001,0.002,0.003,0.004]}]"]
    tune(cfg_of(tmp_path, *grid, "sweep.n_trials=2"))
    study = tune(cfg_of(tmp_path, *grid, "sweep.n_trials=4"))
    assert sorted(t.params["optim.lr"] for t in study.trials) == [0.001, 0.002, 0.003, 0.004]


def test_another_tune_command_with_the_same_seed_draws_new_points(tmp_path):
    out = tmp_path / "sweep"
    procs = [popen_tune(out, "sweep.n_trials=4", "sweep.sampler=random", "sweep.heartbeat_s=2")
             for _ in range(2)]
    for p in procs:
        stderr = finish(p)
        assert p.returncode == 0, stderr[-3000:]
    study = load(f"sqlite:///{out}/study.db")
    assert_exact_budget(study, 4)
    assert len(set(hp_sets(study))) == len(hp_sets(study)), hp_sets(study)


# --------------------------------------------------------------------------------------------
# 5. A study refuses trials whose losses would not be comparable
# --------------------------------------------------------------------------------------------


def test_another_budget_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "sweep"
    assert run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=1").returncode == 0
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=2", "train.steps=5",
                   "train.batch_size=8")
    assert_one_line_error(proc, "train.steps 6 -> 5", "train.batch_size 16 -> 8", "--study")
    assert len(load(f"sqlite:///{out}/study.db").trials) == 1  # nothing added
    best = json.loads((out / "best.json").read_text())
    assert best["base_config"]["train"]["steps"] == 6


def test_every_key_that_changes_a_loss_is_in_the_signature(tmp_path):
    """No trial runs here: open_study alone creates, checks and refuses."""
    storage = f"sqlite:///{tmp_path}/study.db"
    open_study(cfg_of(tmp_path, f"sweep.storage={storage}"))
    refused = {  # none of these was in the hand-written signature before
        "model.mlp_ratio=2.0": "model.mlp_ratio 4.0 -> 2.0",
        "diffusion.beta_end=0.03": "diffusion.beta_end",
        "data.max_items=500": "data.max_items None -> 500",
        "train.val_seed=7": "train.val_seed 1234 -> 7",
        "optim.weight_decay=0.1": "optim.weight_decay",
        "train.eval_every=2": "train.eval_every 3 -> 2",
        "sweep.params=[{name:optim.lr,low:-12,high:-8,log2:true}]": "sweep.params",
    }
    for override, needle in refused.items():
        with pytest.raises(UserError, match="use another --study") as e:
            open_study(cfg_of(tmp_path, f"sweep.storage={storage}", override))
        assert needle in str(e.value), (override, str(e.value))
    # What cannot change a trial's loss may differ: budget, seed, sampler, where outputs go,
    # how a run is shown or run, and the swept keys' base values.
    open_study(cfg_of(tmp_path / "elsewhere", f"sweep.storage={storage}", "sweep.n_trials=99",
                      "sweep.seed=5", "sweep.sampler=random", "sweep.pruner=none", "sweep.heartbeat_s=3",
                      "train.log_every=1", "train.device=cpu", "train.samples=4", "optim.lr=0.1",
                      "model.width=128", "diffusion.sample_steps=10"))


def test_a_study_made_before_the_full_signature_is_checked_against_its_base_config(tmp_path):
    """Studies made by earlier versions recorded the whole base config beside a 7-key
    "model_signature"; the signature is derived from that base config, so they still open
    when the config matches and are refused when it does not."""
    storage = f"sqlite:///{tmp_path}/study.db"
    old_cfg = cfg_of(tmp_path, f"sweep.storage={storage}", "train.steps=60")
    study = optuna.create_study(study_name="mupsweep", storage=storage)
    m = old_cfg.model
    for key, value in {"base_config": to_dict(old_cfg), "parametrization": m.parametrization,
                       "proxy_widths": [32], "storage": storage,
                       "model_signature": {"arch": m.arch, "parametrization": m.parametrization,
                                           "depth": m.depth, "head_dim": m.head_dim,
                                           "patch_size": m.patch_size, "proxy_widths": [32],
                                           "data": "digits"}}.items():
        study.set_user_attr(key, value)
    with pytest.raises(UserError, match="train.steps 60 -> 6"):
        open_study(cfg_of(tmp_path, f"sweep.storage={storage}"))
    open_study(old_cfg)  # the same config continues the study


def test_a_study_mupsweep_did_not_make_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    foreign = optuna.create_study(study_name="mupsweep", storage=storage)
    foreign.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(UserError, match="not made by mupsweep tune"):
        open_study(cfg_of(tmp_path, f"sweep.storage={storage}"))


def test_a_sqlite_file_in_a_new_folder_is_created_there(tmp_path):
    db = tmp_path / "new" / "dir" / "x.db"
    open_study(cfg_of(tmp_path / "out", f"sweep.storage=sqlite:///{db}"))
    assert db.is_file() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 11b. A sweep with nothing to transfer says so and exits 1; best.json is still written
# --------------------------------------------------------------------------------------------


def test_every_trial_diverged_exits_1_saying_why(tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=2", "sweep.sampler=grid",
                   "sweep.pruner=none", "sweep.params=[{name:optim.lr,type:categorical,choices:[1.0,4.0]}]",
                   "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "all 2 trials were pruned or diverged (2 diverged" in proc.stderr
    assert "nothing to transfer; lower the lr range" in proc.stderr
    assert "Traceback" not in proc.stderr
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] is None and best["cost"]["n_pruned"] == 2
    assert json.loads(proc.stdout) == best  # --json prints the document it has, whatever the exit
    assert (out / "trials.csv").is_file()


# --------------------------------------------------------------------------------------------
# 13. No file, stream or attribute holds the storage password
# --------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_the_storage_password_is_written_nowhere(tmp_path, postgres_url):
    secret = "s3cr3t-pw-4711"  # the trust-auth server accepts any password
    url = postgres_url.replace("postgres@", f"postgres:{secret}@")
    out = tmp_path / "sweep"
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=3", "sweep.proxy_widths=[32,48]",
                   "--storage", url, "--study", "pw", "--workers", "2", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["storage"] == url.replace(secret, "***")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and (out / "trials.csv").is_file()
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert secret not in proc.stdout and secret not in proc.stderr
    study = load(postgres_url, "pw")
    stored = json.dumps([study.user_attrs, [(t.user_attrs, t.system_attrs) for t in study.trials]],
                        default=str)
    assert secret not in stored


# --------------------------------------------------------------------------------------------
# 15. Bad input is found before any worker starts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["data=image_folder", "data.root={empty}"], "{empty}"),
    (["model.patch_size=3"], "not divisible by patch 3"),
])
def test_bad_input_stops_tune_before_any_worker_starts(tmp_path, args, needle):
    empty = tmp_path / "images"
    empty.mkdir()
    out = tmp_path / "sweep"
    args = [a.format(empty=empty) for a in args]
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", *args, "--workers", "2", timeout=120)
    assert_one_line_error(proc, needle.format(empty=empty))
    assert not out.exists()  # no study created, no trial started


# --------------------------------------------------------------------------------------------
# 17. Ctrl-C and a killed worker
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 1])
def test_ctrl_c_fails_and_requeues_the_running_trials(tmp_path, workers):
    out = tmp_path / "sweep"
    storage = f"sqlite:///{out}/study.db"
    run = [*LONG, "sweep.n_trials=2", "--workers", str(workers)]
    proc = popen_tune(out, *run)
    with frozen_mid_trial(proc, lambda: load(storage), workers, group=True) as running:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    stderr = finish(proc, timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == "interrupted; re-run the same command to continue", stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]

    study = load(storage)
    interrupted = {t.number: t for t in study.trials if t.number in {r.number for r in running}}
    for t in interrupted.values():
        assert t.state == TrialState.FAIL and t.user_attrs["reason"] == INTERRUPTED
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(w.system_attrs["failed_trial"] for w in waiting) == sorted(interrupted)
    assert study_summary(study)["cost"]["n_failed"] == 0  # interrupted is not failed
    if workers == 1:
        return  # the resume below is the same for both

    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", *run, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(storage)
    assert_exact_budget(study, 2)
    for t in study.trials:
        if t.state == TrialState.COMPLETE:  # the retries, with the interrupted trials' params
            original = interrupted[t.system_attrs["failed_trial"]]
            assert t.params == original.params
            assert "reason" not in t.user_attrs


def test_a_killed_worker_leaves_the_others_going_and_the_outputs_written(tmp_path):
    """SIGKILL one of two workers mid-trial (journal storage: no heartbeat, the dead pid is
    seen at once): the other fails and retries its trial, meets the budget, and the parent
    writes best.json and trials.csv, exits 0 and says what happened."""
    out = tmp_path / "sweep"
    journal = tmp_path / "study.journal"
    proc = popen_tune(out, *LONG, "sweep.n_trials=3", "--storage", str(journal), "--workers", "2")
    with frozen_mid_trial(proc, lambda: load(str(journal)), 2, group=True) as running:
        victim = running[0]
        os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"pid {victim.user_attrs['worker']['pid']}) was killed by SIGKILL" in stderr
    study = load(str(journal))
    assert_exact_budget(study, 3)
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL and "died" in dead.user_attrs["reason"]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == dead.params
    assert "reason" not in retried[0].user_attrs  # not the dead trial's
    best = json.loads((out / "best.json").read_text())
    assert best["cost"]["n_complete"] == 3
    assert (out / "trials.csv").read_text().count("\n") == 1 + len(study.trials)


def test_when_every_worker_is_killed_the_outputs_are_written_and_the_shortfall_said(tmp_path):
    out = tmp_path / "sweep"
    journal = tmp_path / "study.journal"
    proc = popen_tune(out, *LONG, "sweep.n_trials=3", "--storage", str(journal), "--workers", "2")
    with frozen_mid_trial(proc, lambda: load(str(journal)), 2, group=True) as running:
        for t in running:
            os.kill(t.user_attrs["worker"]["pid"], signal.SIGKILL)
    stderr = finish(proc)
    assert proc.returncode == 1, stderr[-3000:]
    assert "sweep incomplete: 0/3 trials finished (worker 0" in stderr
    assert stderr.count("was killed by SIGKILL") == 2 and "re-run the same command" in stderr
    assert "Traceback" not in stderr
    assert json.loads((out / "best.json").read_text())["trial"] is None
    assert (out / "trials.csv").is_file()


def test_a_worker_that_meets_bad_input_reports_one_line(tmp_path):
    """The parent checks everything first; should a worker still meet bad input (data gone
    after the check), it hands its one line to the parent instead of a traceback."""
    empty = tmp_path / "images"
    empty.mkdir()
    cfg = cfg_of(tmp_path / "sweep", "data=image_folder", f"data.root={empty}", "sweep.n_trials=1")
    open_study(cfg)
    exits = run_worker_processes(cfg, 2, on_poll=lambda: None)
    assert [e.exitcode for e in exits] == [EXIT_BAD_INPUT] * 2
    assert all(str(empty) in e.describe() and "\n" not in e.describe() for e in exits)


def test_a_command_built_on_tune_exits_1_when_its_sweep_has_nothing(tmp_path):
    proc = run_cli("validate", "model=dit-tiny", "model.depth=2", "train.steps=4", "train.eval_every=2",
                   "train.val_size=32", "train.batch_size=16", "train.samples=0",
                   f"sweep.out_dir={tmp_path}", "--widths", "32,64", "--log2-lr", "0:2",
                   "--parametrizations", "mup", timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "all 3 trials were pruned or diverged" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# Counting and writing the outputs
# --------------------------------------------------------------------------------------------


def test_surplus_and_interrupted_trials_are_not_counted_as_failed(tmp_path):
    study = optuna.create_study()
    for reason in (SURPLUS, INTERRUPTED, "RuntimeError: boom"):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"reason": reason}))
    cost = study_summary(study)["cost"]
    assert (cost["n_failed"], cost["n_surplus"], cost["n_interrupted"]) == (1, 1, 1)


def test_a_shortfall_names_the_last_real_failure_not_an_interrupt():
    doc = {"trial": None, "trials": [
        {"state": "FAIL", "reason": "RuntimeError: boom"},
        {"state": "FAIL", "reason": INTERRUPTED}, {"state": "FAIL", "reason": SURPLUS}]}
    assert shortfall(doc, budget=2) == ("sweep incomplete: 0/2 trials finished: trials keep "
                                        "failing, the last with: RuntimeError: boom")


def test_trials_csv_is_replaced_not_rewritten_in_place(tmp_path):
    """A reader (or a crash) never sees half a trials.csv: it is written beside and renamed."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0, params={"x": 0.5},
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    write_outputs(study, tmp_path)
    before = (tmp_path / "trials.csv").stat().st_ino
    write_outputs(study, tmp_path)
    assert (tmp_path / "trials.csv").stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "trials.csv"]
