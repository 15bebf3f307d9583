"""SIGTERM (what Slurm, Kubernetes, `timeout` and most schedulers send) stops `tune` and `demo`
as Ctrl-C does: the workers stop (none outlives the command), the running trials are failed
as "interrupted" and queued again, best.json and trials.csv are written with what there is,
the last line says what to do, and the exit code is 143 (128 + SIGTERM). A scheduler may
signal the parent alone or the whole process group; both are handled. Real processes, real
signals, real training: each command is frozen (SIGSTOP) mid-trial before it is signalled,
so no sleep races the work on a fast or a loaded machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finish, frozen_mid_trial
from optuna.trial import TrialState
from test_tune import FAST, assert_exact_budget, load

from mupsweep.sweep.retry import INTERRUPTED
from mupsweep.sweep.summary import study_summary

# Trials long enough that both workers' first trials overlap (one worker may start seconds
# after the other; at 160 steps, on an idle machine, the first worker had run both trials
# before the second started) and are mid-trial when the signal lands: the first evaluation
# (the progress marker the tests wait for, with the command frozen) comes at step 10 of 1000.
LONG = ["train.steps=1000", "train.eval_every=10", "sweep.pruner=none"]
EXIT_SIGTERM = 128 + signal.SIGTERM
RESUME = "re-run the same command to continue"


STARTED: list[subprocess.Popen] = []  # every command's group is SIGKILLed after its test


def popen(*args: str) -> subprocess.Popen:
    """`mupsweep ARGS` in a process group of its own (its workers join it), as a shell runs it;
    one torch thread per process (two workers share the CI's 2 cores)."""
    proc = subprocess.Popen([sys.executable, "-m", "mupsweep.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    STARTED.append(proc)
    return proc


def kill_leftovers() -> None:
    """A failed test leaves no worker training on (what the tests check, where they pass)."""
    while STARTED:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(STARTED.pop().pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    kill_leftovers()


def left_in_group(pgid: int, timeout: float = 10) -> list[str]:
    """The processes of the command's group (workers, multiprocessing's helpers) still there
    `timeout` s after it ended, as "pid cmdline"; those are then killed. [] when none."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        time.sleep(0.2)
    left = [f"{p.name} {(p / 'cmdline').read_text().replace(chr(0), ' ')[:120]}"
            for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return left or ["(gone while listed)"]


def _pgid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rpartition(")")[2].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def assert_stopped(proc: subprocess.Popen, stderr: str, last_line: str,
                   left: list[str] | None = None) -> None:
    """Exit 143, no process of its group left, the last line says what to do, no traceback."""
    left = left_in_group(proc.pid) if left is None else left
    assert proc.returncode == EXIT_SIGTERM, (proc.returncode, left, stderr[-3000:])
    assert not left, f"processes outlived the command: {left}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(last_line) and lines[-1].endswith(RESUME), stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]


def assert_requeued(storage: str, running: list, out: Path, name: str = "mupsweep") -> dict:
    """The trials that ran are FAIL "interrupted" and queued again with their parameters; the
    outputs hold them. Returns the interrupted trials by number."""
    study = load(storage, name)
    interrupted = {t.number: t for t in study.trials if t.number in {r.number for r in running}}
    assert len(interrupted) == len(running)
    for t in interrupted.values():
        assert t.state == TrialState.FAIL and t.user_attrs["reason"] == INTERRUPTED, (t.number, t.state)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(w.system_attrs["failed_trial"] for w in waiting) == sorted(interrupted)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study_summary(study)["cost"]["n_failed"] == 0  # interrupted is not failed
    best = json.loads((out / "best.json").read_text())
    assert best["cost"]["n_interrupted"] == len(running) and best["trial"] is None
    assert (out / "trials.csv").read_text().count("\n") == 1 + len(study.trials)
    return interrupted


# --------------------------------------------------------------------------------------------
# tune --workers 2, SIGTERM to the parent alone; then the same command finishes the budget
# --------------------------------------------------------------------------------------------

RUN_2 = [*FAST, *LONG, "sweep.n_trials=2", "--workers", "2"]


@pytest.fixture(scope="module")
def parent_terminated(tmp_path_factory):
    """`tune --workers 2` with SIGTERM sent to its parent alone, mid-trial in both workers."""
    out = tmp_path_factory.mktemp("sigterm") / "sweep"
    storage = f"sqlite:///{out}/study.db"
    proc = popen("tune", *RUN_2, f"sweep.out_dir={out}")
    with frozen_mid_trial(proc, lambda: load(storage), 2, group=True) as running:
        os.kill(proc.pid, signal.SIGTERM)  # the parent only: it must stop its workers
    stderr = finish(proc, timeout=120)
    left = left_in_group(proc.pid)  # and killed: the test below says whether there were any
    return proc, stderr, running, out, storage, left


def test_sigterm_to_the_parent_stops_the_workers_and_requeues_their_trials(parent_terminated):
    proc, stderr, running, out, storage, left = parent_terminated
    assert_stopped(proc, stderr, "interrupted by SIGTERM", left)
    assert len({t.user_attrs["worker"]["pid"] for t in running}) == 2  # both workers were mid-trial
    assert_requeued(storage, running, out)


def test_after_sigterm_the_same_command_finishes_the_budget(parent_terminated):
    _, _, running, out, storage, _ = parent_terminated
    interrupted = {t.number: t for t in running}
    proc = popen("tune", *RUN_2, f"sweep.out_dir={out}")
    stderr = finish(proc, timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    study = load(storage)
    assert_exact_budget(study, 2)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):  # the retries, with their params
        assert t.params == interrupted[t.system_attrs["failed_trial"]].params
        assert "reason" not in t.user_attrs
    assert json.loads((out / "best.json").read_text())["cost"]["n_complete"] == 2


# --------------------------------------------------------------------------------------------
# tune in one process; SIGTERM to the whole group of tune --workers 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_tune_and_keeps_what_ran(tmp_path, workers):
    """workers=1: the one process; workers=2: the whole group, as a scheduler may send it
    (each worker gets it directly, and again from the parent: none is cut short)."""
    out = tmp_path / "sweep"
    storage = f"sqlite:///{out}/study.db"
    proc = popen("tune", *FAST, *LONG, "sweep.n_trials=2", "--workers", str(workers),
                 f"sweep.out_dir={out}")
    with frozen_mid_trial(proc, lambda: load(storage), workers, group=True) as running:
        os.killpg(proc.pid, signal.SIGTERM)
    stderr = finish(proc, timeout=120)
    assert_stopped(proc, stderr, "interrupted by SIGTERM")
    assert_requeued(storage, running, out)


def test_the_parent_requeues_the_trial_of_a_worker_that_could_not(tmp_path):
    """A worker killed mid-trial (out of memory, a scheduler's SIGKILL) cannot re-queue its
    trial, and the other worker is mid-trial too: SIGTERM then leaves no trial RUNNING, as the
    parent re-queues what its stopped workers left (CI once saw one left RUNNING)."""
    out = tmp_path / "sweep"
    storage = f"sqlite:///{out}/study.db"
    proc = popen("tune", *RUN_2, f"sweep.out_dir={out}")
    with frozen_mid_trial(proc, lambda: load(storage), 2, group=True) as running:
        os.kill(running[0].user_attrs["worker"]["pid"], signal.SIGKILL)
        os.kill(proc.pid, signal.SIGTERM)
    stderr = finish(proc, timeout=120)
    assert_stopped(proc, stderr, "interrupted by SIGTERM")
    assert_requeued(storage, running, out)


def test_a_killed_parent_leaves_no_worker_training_alone(tmp_path):
    """SIGKILL (a scheduler's last word) cannot be handled; the workers get SIGTERM when their
    parent dies, re-queue their trials and exit."""
    out = tmp_path / "sweep"
    storage = f"sqlite:///{out}/study.db"
    proc = popen("tune", *RUN_2, f"sweep.out_dir={out}")
    with frozen_mid_trial(proc, lambda: load(storage), 2, group=True) as running:
        os.kill(proc.pid, signal.SIGKILL)
    finish(proc, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not left_in_group(proc.pid, timeout=30), "workers outlived their killed parent"
    study = load(storage)
    for t in running:
        assert study.trials[t.number].user_attrs.get("reason") == INTERRUPTED, study.trials[t.number]
    assert sorted(w.system_attrs["failed_trial"] for w in study.get_trials(states=(TrialState.WAITING,))) \
        == sorted(t.number for t in running)


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def test_sigterm_stops_the_demo_saying_what_it_kept(tmp_path):
    out = tmp_path / "demo"
    storage = f"sqlite:///{out}/sweep/study.db"
    proc = popen("demo", "--quick", "--trials", "2", "--out", str(out))
    with frozen_mid_trial(proc, lambda: load(storage, "demo"), 1, group=True, timeout=300) as running:
        os.kill(proc.pid, signal.SIGTERM)
    stderr = finish(proc, timeout=120)
    assert_stopped(proc, stderr, "interrupted by SIGTERM in stage 2/4 (tune): the study in")
    assert_requeued(storage, running, out / "sweep", "demo")
