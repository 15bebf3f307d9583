"""Shared test helpers: run the real CLI in a subprocess, tiny configs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Keep each test process to the 2 cores CI has, and quiet progress bars.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY = ["model=dit-tiny", "train.progress=false", "train.samples=0"]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mupsweep ARGS` as a user would, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "mupsweep.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback, clean stdout."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a command started in a session of its own (start_new_session=True); kill its
    process group if it hangs. Returns its stderr."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@contextlib.contextmanager
def frozen_mid_trial(proc: subprocess.Popen, load_study: Callable[[], object], n: int = 1,
                     group: bool = False, timeout: float = 240) -> Iterator[list]:
    """Hold `proc` (with group=True: its whole process group, workers included) stopped by
    SIGSTOP while n of its trials are mid-trial, and yield those trials. What the caller does
    inside (SIGKILL, SIGINT, SIGTERM) then meets the trials mid-trial on any machine: a fixed
    sleep races the work, and on an idle machine a trial had already finished when it woke.

    Mid-trial means RUNNING with progress reported (an intermediate value), read again while
    the processes are frozen; if a trial finished between the poll and the freeze, the
    processes go on and we wait for the next. SIGCONT on exit delivers what the caller sent."""
    import optuna

    def send(sig: int) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)

    def running_with_progress() -> list:
        try:
            trials = load_study().get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except Exception:  # no study yet, or the database is mid-write: look again
            return []
        return [t for t in trials if t.intermediate_values]

    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline, f"{n} trials never ran at once"
        assert proc.poll() is None, f"the command ended (exit {proc.returncode}) before {n} trials ran"
        if len(running_with_progress()) >= n:
            send(signal.SIGSTOP)
            running = running_with_progress()
            if len(running) >= n:
                break
            send(signal.SIGCONT)
        time.sleep(0.1)
    try:
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError):
            send(signal.SIGCONT)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run `mupsweep ARGS` through the CLI's own entry point in this process, from tmp_path;
    returns what `run_cli` would. For cases refused before any work: no interpreter start."""
    from mupsweep.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL 15 cluster on a free port, run as the postgres OS user; one per test
    session, shared by test_tune.py and test_transfer_trust.py (each test uses its own study)."""
    bin_dir = Path("/usr/lib/postgresql/15/bin")
    if not (bin_dir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries are not installed")
    data = Path(tempfile.mkdtemp(prefix="mupsweep-pg-"))
    as_pg: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as postgres, which owns DIR
        as_pg = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = lambda *cmd: subprocess.run([*as_pg, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
    run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o",
        f"-p {port} -c listen_addresses=127.0.0.1 -k {data}", "-l", str(data / "log"), "start", "-w")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "stop", "-m", "fast"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)
