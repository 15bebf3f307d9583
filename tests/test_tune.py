"""`mupsweep tune`: real Optuna storages (SQLite, journal file, PostgreSQL), real worker
processes, real training of tiny proxies. No mocks."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import assert_one_line_error, frozen_mid_trial, run_cli

# The smallest useful trial: depth 2, 6 steps of batch 16, validation on 32 fixed triples.
FAST = ["model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
        "train.eval_every=3", "train.val_size=32", "train.batch_size=16", "train.log_every=5",
        "sweep.proxy_widths=[32]"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def load(storage: str, study: str = "mupsweep") -> optuna.Study:
    if storage.endswith(".journal"):
        backend = optuna.storages.journal.JournalFileBackend(storage)
        return optuna.load_study(study_name=study, storage=optuna.storages.JournalStorage(backend))
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the dev extra installs psycopg2
    storage = storage.replace("postgresql://", "postgresql+psycopg2://")
    return optuna.load_study(study_name=study, storage=storage)


def tune_cli(out: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", *overrides, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_exact_budget(study: optuna.Study, n: int) -> None:
    """Exactly n COMPLETE + PRUNED trials, distinct numbers, none left running."""
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in FINISHED for t in trials) == n, [(t.number, t.state) for t in trials]
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


# --------------------------------------------------------------------------------------------
# A sweep end to end
# --------------------------------------------------------------------------------------------


def test_sweep_writes_best_json_and_trials_csv(tmp_path):
    out = tmp_path / "sweep"
    proc = tune_cli(out, "sweep.n_trials=3", "sweep.proxy_widths=[32,64]", "sweep.sampler=random",
                    "sweep.pruner=none", "--json")
    doc = json.loads(proc.stdout)  # stdout holds exactly one JSON document
    assert "trial 0" in proc.stderr and "best trials" in proc.stderr  # humans read stderr
    assert json.loads((out / "best.json").read_text()) == doc
    assert (out / "trials.csv").read_text().count("\n") == 1 + 3
    assert doc["study"] == "mupsweep" and doc["parametrization"] == "mup"
    assert doc["storage"] == f"sqlite:///{out.resolve()}/study.db"
    assert doc["proxy_widths"] == [32, 64]
    assert doc["base_config"]["model"]["depth"] == 2
    assert set(doc["hparams"]) == {"optim.lr", "model.init_mult", "model.output_mult"}
    assert doc["cost"]["n_complete"] == 3 and doc["cost"]["flops"] > 0
    assert len(doc["trials"]) == 3
    for t in doc["trials"]:
        assert set(t["losses"]) == {"32", "64"}
        assert t["value"] == pytest.approx(sum(t["losses"].values()) / 2)
        assert t["flops"] > 0 and t["wall_time_s"] > 0
        assert 2.0**-14 <= t["hparams"]["optim.lr"] <= 2.0**-6
    best = min(doc["trials"], key=lambda t: t["value"])
    assert (doc["trial"], doc["value"], doc["hparams"]) == (best["number"], best["value"], best["hparams"])


def test_divergent_trial_is_pruned_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "sweep"
    tune_cli(out, "sweep.n_trials=2", "sweep.sampler=grid", "sweep.pruner=none",
             "sweep.params=[{name:optim.lr,type:categorical,choices:[4.0,0.001]}]")
    trials = {t.user_attrs["hparams"]["optim.lr"]: t for t in load(f"sqlite:///{out}/study.db").trials}
    bad, good = trials[4.0], trials[0.001]
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert "diverged" in bad.user_attrs["reason"]
    assert good.state == optuna.trial.TrialState.COMPLETE


def test_resume_reaches_exactly_n_trials(tmp_path):
    out = tmp_path / "sweep"
    url = f"sqlite:///{out}/study.db"
    tune_cli(out, "sweep.n_trials=1")
    assert_exact_budget(load(url), 1)
    tune_cli(out, "sweep.n_trials=3")  # the same study, a larger budget: two more
    assert_exact_budget(load(url), 3)
    proc = tune_cli(out, "sweep.n_trials=3")  # finished: runs nothing
    assert len(load(url).trials) == 3
    assert not re.search(r"^trial \d+ ", proc.stderr, re.M), proc.stderr


# --------------------------------------------------------------------------------------------
# Several workers on one study
# --------------------------------------------------------------------------------------------


def test_two_tune_processes_share_a_sqlite_study(tmp_path):
    """Two independent `tune` commands (as on two machines) on one SQLite file."""
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "mupsweep.cli", "tune", *FAST, f"sweep.out_dir={out}",
            "sweep.n_trials=3", "sweep.heartbeat_s=2"]
    procs = [subprocess.Popen([*args, f"sweep.seed={k}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        assert "locked" not in stderr.lower()
    assert_exact_budget(load(f"sqlite:///{out}/study.db"), 3)


def test_two_worker_processes_on_a_journal_file(tmp_path):
    journal = tmp_path / "study.journal"
    proc = tune_cli(tmp_path / "sweep", "sweep.n_trials=4", "--storage", str(journal),
                    "--workers", "2")
    assert "locked" not in proc.stderr.lower()
    study = load(str(journal))
    assert_exact_budget(study, 4)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials}) == 2  # both did work


@pytest.mark.postgres
def test_two_worker_processes_on_postgresql(tmp_path, postgres_url):
    proc = tune_cli(tmp_path / "sweep", "sweep.n_trials=4", "--storage", postgres_url,
                    "--study", "pg-two-workers", "--workers", "2", "--json")
    assert "locked" not in proc.stderr.lower()
    assert json.loads(proc.stdout)["storage"] == postgres_url
    assert_exact_budget(load(postgres_url, "pg-two-workers"), 4)


# --------------------------------------------------------------------------------------------
# A worker killed mid-trial
# --------------------------------------------------------------------------------------------


def test_killed_worker_trial_fails_and_is_retried(tmp_path):
    """SIGKILL a worker mid-trial: the heartbeat fails its trial after the grace period, it is
    re-queued with the same parameters, and a restart completes exactly n_trials."""
    out = tmp_path / "sweep"
    url = f"sqlite:///{out}/study.db"
    # Long trials, to be killed mid-trial; the restart keeps them (the study refuses another budget).
    hb = ["sweep.heartbeat_s=1", "sweep.grace_s=2", "sweep.n_trials=3", "train.steps=400",
          "train.eval_every=50"]
    proc = subprocess.Popen([sys.executable, "-m", "mupsweep.cli", "tune", *FAST, f"sweep.out_dir={out}", *hb],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with frozen_mid_trial(proc, lambda: load(url)) as running:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = running[0].number
    study = load(url)
    assert study.trials[killed].state == optuna.trial.TrialState.RUNNING  # stale, not yet failed
    before = {t.number for t in study.trials if t.state in FINISHED}

    tune_cli(out, *hb)
    study = load(url)
    assert_exact_budget(study, 3)
    assert study.trials[killed].state == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state in FINISHED
    assert retried[0].params == study.trials[killed].params
    assert before <= {t.number for t in study.trials if t.state in FINISHED}  # nothing lost


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["sweep.sampler=bayes"], ["sweep.sampler='bayes'", "tpe"]),
    (["sweep.pruner=asha"], ["sweep.pruner='asha'", "hyperband"]),
    (["sweep.params=[{name:optim.nope,low:0,high:1}]"], ["optim.nope", "unknown config key"]),
    (["sweep.params=[{name:optim.lr,low:1,high:0.5}]"], ["optim.lr", "low=1.0 must be < high=0.5"]),
    (["sweep.params=[{name:optim.lr,type:categorical}]"], ["optim.lr", "choices"]),
    (["sweep.params=[{name:optim.lr,type:normal,low:0,high:1}]"], ["type='normal'"]),
    (["--study", ""], ["sweep.study is empty"]),
    (["--storage", "postgresql://alice:s3cretpw@127.0.0.1:1/db"],
     ["cannot open storage", "postgresql://alice:***@127.0.0.1:1/db"]),
])
def test_bad_input_is_one_line(tmp_path, args, needles):
    proc = run_cli("tune", *FAST, f"sweep.out_dir={tmp_path}", *args, timeout=60)
    assert_one_line_error(proc, *needles)
    assert "s3cretpw" not in proc.stderr
