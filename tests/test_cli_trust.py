"""The command line never answers with a traceback or a box: usage errors are one line (exit
2), `--json` gets a document whenever one exists and an error object when none does, list flags
are never empty or repeated, and a rank launched by `train --nproc-per-node` that meets bad
input says so in one line, not in torchrun's ChildFailedError traceback."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, assert_one_line_error, run_cli
from test_tune import FAST

# --------------------------------------------------------------------------------------------
# Usage errors: one line naming the flag or command, and where the help is
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["tune", "--workers", "abc"], ["'--workers'", "valid integer", "mupsweep tune --help"]),
    (["train", "--bogus"], ["No such option: --bogus", "mupsweep train --help"]),
    (["trian"], ["No such command 'trian'", "train"]),
    (["coord-check", "--depths"], ["--depths", "requires an argument"]),
    (["validate", "--pack", "1.5"], ["'--pack'"]),
    (["report", "a", "b"], ["unexpected extra argument"]),
])
def test_a_usage_error_is_one_line(cli, args, needles):
    assert_one_line_error(cli(*args), *needles)


@pytest.mark.parametrize("args, needle", [
    (["train", "--nnodes", "abc"], "--nnodes='abc'"),
    (["train", "--nnodes", "2:1"], "--nnodes='2:1'"),
    (["train", "--nnodes", "0"], "--nnodes='0'"),
    (["train", "--node-rank", "-1", "--nnodes", "2"], "--node-rank=-1"),
    (["train", "--nproc-per-node", "0"], "--nproc-per-node=0"),
])
def test_launch_options_torchrun_would_trace_back_on_are_one_line(cli, args, needle):
    assert_one_line_error(cli(*args, *TINY), needle)


# --------------------------------------------------------------------------------------------
# List flags: never empty (that is not the default), never a value twice on any axis
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["validate", "--widths", ""], "--widths='': give comma-separated integers (an empty list"),
    (["validate", "--widths", ","], "--widths=','"),
    (["validate", "--seeds", ""], "--seeds=''"),
    (["validate", "--seeds", "1,1"], "--seeds='1,1' lists a value twice"),
    (["validate", "--depths", "2,4", "--seeds", "0,0"], "--seeds='0,0' lists a value twice"),
    (["validate", "--depths", "2,2,4"], "--depths='2,2,4' lists a value twice"),
    (["validate", "--depths", ""], "--depths=''"),
    (["coord-check", "--depths", "2,4,4"], "--depths='2,4,4' lists a value twice"),
    (["coord-check", "--depths", ""], "--depths=''"),
])
def test_list_flags_are_never_empty_or_repeated(cli, args, needle):
    assert_one_line_error(cli(*args, *TINY), needle)


def test_a_joint_depth_grid_may_repeat_a_width(cli, tmp_path):
    """--widths with --depths is one width per depth: 64,64 is two shapes, not a repeat."""
    proc = cli("validate", *TINY, "--depths", "2,4", "--widths", "32,32", "--seeds", "0",
               "--log2-lr", "-8:-6", "--cfg")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# --json: a document whenever one exists, an error object otherwise
# --------------------------------------------------------------------------------------------


def test_json_bad_input_is_an_error_object_on_stdout(cli):
    proc = cli("train", *TINY, "model.depth=0", "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"error": "model.depth=0 must be an integer >= 1",
                                       "exit_code": 2}
    assert [line for line in proc.stderr.splitlines() if line.strip()] == \
        ["error: model.depth=0 must be an integer >= 1"]


def test_json_usage_error_is_an_error_object_on_stdout(cli):
    proc = cli("tune", "--workers", "abc", "--json")
    assert proc.returncode == 2
    assert "'--workers'" in json.loads(proc.stdout)["error"]


def test_tune_json_prints_its_document_when_every_trial_fails(tmp_path):
    """Every trial diverges (lr 1): exit 1, and best.json's document (value null) on stdout,
    not an empty stdout that makes the next command in a pipe say 'stdin is empty'."""
    out = tmp_path / "sweep"
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=1", "sweep.pruner=none",
                   "sweep.params=[{name:optim.lr,type:categorical,choices:[1.0]}]", "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["value"] is None and doc["trial"] is None
    assert doc == json.loads((out / "best.json").read_text())


# --------------------------------------------------------------------------------------------
# train --nproc-per-node: a rank's bad input is one line
# --------------------------------------------------------------------------------------------


def test_a_ranks_bad_input_is_one_line_not_torchruns_traceback(tmp_path):
    """batch 3 over 2 ranks is refused inside each rank (the world size is known there): one
    line, exit 2, no ChildFailedError, no torchrun banner."""
    proc = run_cli("train", *TINY, "train.steps=2", "train.eval_every=2", "train.batch_size=3",
                   f"train.run_dir={tmp_path}/run", "--nproc-per-node", "2", timeout=180)
    assert_one_line_error(proc, "train.batch_size=3 is not divisible by 2 processes")
