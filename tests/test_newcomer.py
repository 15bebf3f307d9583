"""What a newcomer tripped on, each kept from coming back: configs through pipes, products on
stdout, Hydra's spellings honoured or refused by name (never ignored), and an install that
keeps the user's torch (the last one is `make check-install`, which CI runs)."""

from __future__ import annotations

import subprocess
import sys

from conftest import TINY, assert_one_line_error, run_cli

QUICK = [*TINY, "train.steps=2", "train.eval_every=2", "train.val_size=16", "train.batch_size=8"]


def test_train_reads_its_config_from_a_pipe(tmp_path):
    """`... --cfg | mupsweep train --config -`: the piped config is the run's (a file check
    said 'config file not found: -')."""
    shown = run_cli("train", *QUICK, "model.depth=3", "--cfg")
    assert shown.returncode == 0, shown.stderr
    proc = subprocess.run([sys.executable, "-m", "mupsweep.cli", "train", "--config", "-",
                           f"train.run_dir={tmp_path}/run"], input=shown.stdout,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "depth: 3" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_config_from_an_empty_pipe_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mupsweep.cli", "train", "--config", "-"],
                          input="", capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "--config -: empty")


def test_a_piped_config_is_named_as_the_user_gave_it(cli, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("model: {width: 64}\n"))
    assert_one_line_error(cli("train", "--config", "-"), "config file stdin is not a complete")


def test_inspect_prints_its_table_on_stdout(cli):
    """`mupsweep inspect | grep hidden` finds the hidden layers (the table went to stderr)."""
    proc = cli("inspect", *TINY)
    assert proc.returncode == 0, proc.stderr
    hidden = [line for line in proc.stdout.splitlines() if " hidden " in line]
    assert len(hidden) >= 8 and "qkv" in "".join(hidden)
    assert " hidden " not in proc.stderr


def test_hydra_cfg_job_is_cfg(cli):
    proc = cli("train", *TINY, "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("model:\n")
    assert_one_line_error(cli("train", *TINY, "--cfg", "hydra"), "--cfg hydra")
