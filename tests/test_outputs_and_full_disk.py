"""Output folders checked before any work, and a full disk as one line that says what was kept.

Every output folder (coord-check's coord.out_dir, report's -o, demo's --out) is refused at once
when it can never be written: empty, a file, under a file, read-only (a read-only mount refuses
root too; /proc takes no new files). A disk that fills (a small tmpfs, mounted here as root, or
a file size limit, EFBIG) ends in one line naming the path, and leaves the study's finished
trials, the previous report files and every whole line of an appended log as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import TINY, assert_one_line_error, run_cli

from mupsweep.sweep.storage import StorageFull, parse_storage, storage_failure
from mupsweep.util import append_lines

# The smallest useful trial (as test_tune.py): depth 2, 6 steps of batch 16.
FAST = ["model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
        "train.eval_every=3", "train.val_size=32", "train.batch_size=16", "train.log_every=5",
        "sweep.proxy_widths=[32]"]
# A coordinate check of a few seconds: two widths, two steps, one seed.
COORD = [*TINY, "model.depth=1", "coord.widths=[32,64]", "coord.steps=2", "coord.seeds=1"]
BEST = {"study": "s", "parametrization": "mup", "proxy_widths": [32], "trial": 0, "value": 1.0,
        "hparams": {"optim.lr": 0.01}, "base_config": {}, "storage": "sqlite:///x.db",
        "trials": [{"number": 0, "state": "COMPLETE", "value": 1.0, "hparams": {"optim.lr": 0.01},
                    "losses": {"32": 1.0}},
                   {"number": 1, "state": "COMPLETE", "value": 1.2, "hparams": {"optim.lr": 0.02},
                    "losses": {"32": 1.2}}]}


# --------------------------------------------------------------------------------------------
# Fixtures: a small disk, a read-only folder
# --------------------------------------------------------------------------------------------


def _mount(where: Path, options: str) -> str | None:
    """mount a tmpfs at `where`; None when done, else why not."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount(8)"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk():
    """small_disk(MB) -> a folder on a fresh tmpfs of that size (unmounted after the test).
    Needs root (CI runs as root); elsewhere the test is skipped with the reason: the EFBIG
    tests below cover a full disk through a file size limit, which needs no privilege."""
    mounts: list[Path] = []

    def make(mb: int = 2) -> Path:
        where = Path(tempfile.mkdtemp(prefix="mupsweep-disk-"))
        why = _mount(where, f"size={mb}m")
        if why:
            pytest.skip(f"cannot mount a small tmpfs to fill ({why}); the EFBIG tests cover a full disk")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        _umount(where)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(disk: Path) -> Path:
    """Fill the file system of `disk` to the last block; returns the filler (delete it to free)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 512):  # then the last partial chunk, 512 bytes at a time
            with contextlib.suppress(OSError):
                while f.write(b"\0" * size):
                    pass
    return filler


@pytest.fixture(scope="module")
def read_only_dir():
    """A folder that refuses every write, root's included: a read-only tmpfs (as root), else a
    mode-0555 folder (which only a non-root user obeys)."""
    where = Path(tempfile.mkdtemp(prefix="mupsweep-ro-"))
    mounted = os.geteuid() == 0 and _mount(where, "ro,size=1m") is None
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("as root only a read-only mount refuses writes, and mount failed")
        where.chmod(0o555)
    yield where
    if mounted:
        _umount(where)
    else:
        where.chmod(0o755)
    with contextlib.suppress(OSError):
        where.rmdir()


def _bad_outputs(tmp: Path, ro: Path) -> dict[str, tuple[str, str]]:
    """Name -> (output folder, what the error line must say)."""
    (tmp / "a-file").write_text("not a folder\n")
    return {
        "an existing file": (str(tmp / "a-file"), "is a file, not a folder"),
        "a path under a file": (str(tmp / "a-file" / "sub"), "a-file is a file"),
        "a read-only folder": (str(ro), "is not writable"),
        "a new folder in a read-only one": (str(ro / "new"), "is not writable"),
        "/proc": ("/proc", "is not writable"),
        "a new folder in /proc": ("/proc/mupsweep-out", "is not writable"),
        "a new folder in /sys": ("/sys/mupsweep-out", "is not writable"),
    }


CASES = ["an existing file", "a path under a file", "a read-only folder",
         "a new folder in a read-only one", "/proc", "a new folder in /proc", "a new folder in /sys"]


# --------------------------------------------------------------------------------------------
# 7. Output folders that can never be written: one line, exit 2, before any work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_report_output_refused(cli, tmp_path, read_only_dir, case):
    out, needle = _bad_outputs(tmp_path, read_only_dir)[case]
    best = tmp_path / "best.json"
    best.write_text(json.dumps(BEST))
    proc = cli("report", str(best), "-o", out)
    assert_one_line_error(proc, "-o", needle)


def test_report_output_empty_is_refused(cli, tmp_path):
    """-o "" (an unset shell variable) would write report.md into the current directory."""
    best = tmp_path / "best.json"
    best.write_text(json.dumps(BEST))
    proc = cli("report", str(best), "-o", "")
    assert_one_line_error(proc, "-o", "empty")
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("case", CASES)
def test_coord_check_output_refused_before_training(cli, tmp_path, read_only_dir, case):
    out, needle = _bad_outputs(tmp_path, read_only_dir)[case]
    proc = cli("coord-check", *COORD, f"coord.out_dir={out}", "train.device=cpu")
    assert_one_line_error(proc, "coord.out_dir", needle)


def _demo(cwd: Path, out: str) -> subprocess.CompletedProcess:
    """`mupsweep demo --quick --out OUT` from `cwd`; a demo that starts its work instead of
    refusing OUT is stopped (it would run for minutes) and fails the test."""
    try:
        return subprocess.run([sys.executable, "-m", "mupsweep.cli", "demo", "--quick", "--out", out],
                              cwd=cwd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"demo --out {out!r} was not refused before its work: {e.stderr!r:.300}")


@pytest.mark.parametrize("case", ["an existing file", "a new folder in /proc", "a read-only folder"])
def test_demo_output_refused_before_work(tmp_path, read_only_dir, case):
    out, needle = _bad_outputs(tmp_path, read_only_dir)[case]
    assert_one_line_error(_demo(tmp_path, out), "--out", needle)


def test_demo_output_empty_is_refused(tmp_path):
    assert_one_line_error(_demo(tmp_path, ""), "--out", "empty")
    assert not (tmp_path / "coord_check").exists()


def test_a_good_new_folder_is_not_created_by_the_check(tmp_path):
    from mupsweep.report import check_output_dir

    check_output_dir(tmp_path / "a" / "b", "-o")
    assert list(tmp_path.iterdir()) == []  # and the probe file is gone


# --------------------------------------------------------------------------------------------
# 8. A full disk: one line naming the path, and what was there is kept
# --------------------------------------------------------------------------------------------


def test_full_disk_study_database_is_one_line_and_keeps_the_trials(small_disk):
    """The SQLite study cannot grow: was a 133-line StorageInternalError ("invalid data")."""
    disk = small_disk(3)
    out = disk / "sweep"
    first = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=1", timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    fill(disk)
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=3", timeout=240)
    assert_one_line_error(proc, f"storage sqlite:///{out / 'study.db'} cannot grow",
                          "keeps every finished trial")
    study = optuna.load_study(study_name="mupsweep", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials][:1] == [optuna.trial.TrialState.COMPLETE]


def _tune_config(out: Path, storage: str | None = None):
    from mupsweep.config import compose

    cfg = compose([f"sweep.out_dir={out}", "sweep.heartbeat_s=0"]
                  + ([f"sweep.storage={storage}"] if storage else []))
    return cfg


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_full_disk_inside_a_trial_is_found_behind_optunas_own_errors(small_disk, kind):
    """The disk fills while a trial runs: the trial's write fails, then Optuna's write of its
    FAIL state, then Optuna's "Should not reach" assertion. storage_failure finds the one line
    behind them; the finished trial is kept, and after freeing space the study goes on."""
    from mupsweep.sweep.storage import open_for_tune, storage_spec

    disk = small_disk(2)
    storage = None if kind == "sqlite" else str(disk / "study.journal")
    cfg = _tune_config(disk, storage)
    spec = storage_spec(cfg)
    study = optuna.create_study(study_name="s", storage=open_for_tune(cfg, spec))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    filler: list[Path] = []

    def fills_the_disk(trial: optuna.Trial) -> float:
        filler.append(fill(disk))
        trial.set_user_attr("note", "x" * 20_000)  # more than any slack in the last block
        return 0.0

    with pytest.raises(BaseException) as info:  # noqa: PT011 - Optuna's, whichever it is
        study.optimize(fills_the_disk, n_trials=1)
    full = storage_failure(info.value)
    assert full is not None, repr(info.value)
    assert isinstance(full, StorageFull)
    text = str(full)
    assert "\n" not in text and spec.label in text and "keeps every finished trial" in text
    filler[0].unlink()
    again = optuna.load_study(study_name="s", storage=open_for_tune(cfg, spec))
    assert again.trials[0].state == optuna.trial.TrialState.COMPLETE
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # no torn entry in the way
    again = optuna.load_study(study_name="s", storage=open_for_tune(cfg, spec))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in again.trials) == 2


def test_full_disk_report_keeps_the_previous_files(cli, small_disk, tmp_path):
    disk = small_disk(2)
    best = tmp_path / "best.json"
    best.write_text(json.dumps(BEST))
    out = disk / "report"
    assert cli("report", str(best), "-o", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill(disk)
    doc = dict(BEST, study="another")
    best.write_text(json.dumps(doc))
    proc = cli("report", str(best), "-o", str(out))
    assert_one_line_error(proc, f"cannot write {out / 'lr_vs_loss.png'}", "No space left",
                          "as they were")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_full_disk_coord_check_is_one_line_with_the_verdict(cli, small_disk):
    disk = small_disk(1)
    out = disk / "cc"
    out.mkdir()
    fill(disk)
    proc = cli("coord-check", *COORD, f"coord.out_dir={out}", "train.device=cpu")
    assert_one_line_error(proc, f"cannot write {out / 'coord_mup.csv'}", "No space left",
                          "the check ", "max |slope|")
    assert not any(p.name.startswith(".coord") for p in out.iterdir())  # no temporary left


# --------------------------------------------------------------------------------------------
# Whole lines only: an append that fails leaves no torn last line (metrics.jsonl, journals)
# --------------------------------------------------------------------------------------------


def test_append_lines_on_a_full_disk_leaves_whole_lines(small_disk):
    disk = small_disk(1)
    path = disk / "metrics.jsonl"
    append_lines(path, json.dumps({"step": 1, "loss": 1.0}) + "\n")
    fill(disk)
    with pytest.raises(OSError) as info:
        append_lines(path, json.dumps({"step": 2, "loss": "x" * 20_000}) + "\n")
    assert info.value.errno == 28  # ENOSPC
    assert path.read_text() == json.dumps({"step": 1, "loss": 1.0}) + "\n"


def test_append_lines_past_a_file_size_limit_leaves_whole_lines(tmp_path):
    """EFBIG (RLIMIT_FSIZE; Python ignores SIGXFSZ) is a full disk too, and needs no root."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    code = ("import sys; from mupsweep.util import append_lines, is_full\n"
            "try:\n    append_lines(sys.argv[1], 'y' * 5000 + '\\n')\n"
            "except OSError as e:\n    print(e.errno, is_full(e))\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=60)
    assert proc.stdout.split() == ["27", "True"], proc.stdout + proc.stderr  # EFBIG
    assert path.read_text() == '{"step": 1}\n'


def test_storage_label_hides_the_password_when_full():
    from mupsweep.sweep.storage import storage_full

    label = parse_storage("postgresql://u:secret@h/db").label
    assert "secret" not in str(storage_full(label, OSError(28, "No space left on device")))
