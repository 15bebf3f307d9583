"""Logs that are files (SLURM, nohup, CI): `train` prints a plain line every train.log_every
steps while it runs, `tune` one unwrapped line per trial with the count and the best so far."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^step (\d+)/(\d+)  loss [\d.]+  lr [\d.e+-]+  [\d.]+ steps/s  ETA \d+:\d\d:\d\d$")


def test_redirected_train_prints_a_line_per_log_step_while_it_runs(tmp_path):
    """stderr is a pipe here, not a terminal: the lines arrive before the run ends."""
    args = ["model=dit-tiny", "model.depth=2", "model.width=32", "train.samples=0",
            "train.steps=400", "train.log_every=20", "train.eval_every=400",
            f"train.run_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, "-m", "mupsweep.cli", "train", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines, alive_at_first_step = [], None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if alive_at_first_step is None and line.startswith("step "):
                alive_at_first_step = proc.poll() is None
        assert proc.wait(timeout=300) == 0, "\n".join(lines)
    finally:
        proc.kill()
    steps = [m for m in map(LINE.match, lines) if m]
    assert [int(m.group(1)) for m in steps] == list(range(20, 401, 20)), lines
    assert alive_at_first_step, "the first step line came only after the run ended"
    assert lines[0].startswith(f"run dir {tmp_path / 'run'}")


def test_redirected_train_without_progress_prints_no_step_lines(tmp_path):
    proc = run_cli("train", "model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
                   "train.log_every=2", "train.progress=false", f"train.run_dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    assert not any(LINE.match(line) for line in proc.stderr.splitlines())


def test_redirected_tune_prints_one_unwrapped_line_per_trial(tmp_path):
    proc = run_cli("tune", "model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
                   "train.eval_every=3", "train.val_size=32", "train.batch_size=16",
                   "sweep.proxy_widths=[32]", "sweep.n_trials=3", "sweep.pruner=none",
                   f"sweep.out_dir={tmp_path}", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    trial_lines = [line for line in proc.stderr.splitlines() if re.search(r"\] trial \d+ ", line)]
    assert len(trial_lines) == 3, proc.stderr
    for k, line in enumerate(trial_lines, 1):
        assert re.match(rf"\[{k}/3, best \d\.\d{{4}} \(#\d\)  running \d\] trial ", line), line
        assert "optim.lr=" in line and "model.output_mult=" in line  # not wrapped at 80 columns
