"""What a newcomer meets first in tune and transfer: an lr range that cannot train is refused
before any trial runs, an empty sweep.params never sweeps the default space in silence, every
transferred config trains in a run directory of its own, transfer's --preset says "did you
mean" and finds the user's config groups, and a distributed train says that train.batch_size
is the global batch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, assert_one_line_error, run_cli
from test_tune import FAST

import mupsweep
from mupsweep.config import compose, to_dict
from mupsweep.errors import UserError
from mupsweep.sweep.space import MAX_TRAINABLE_LR, default_params, search_space
from mupsweep.sweep.study import signature
from mupsweep.transfer import transfer, write_config

# --------------------------------------------------------------------------------------------
# A. An optim.lr axis whose every value is above lr = 1 is refused up front
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, shown", [
    ("{name: optim.lr, log2: true, low: 3, high: 6}", "log2 exponents 3..6, lr 8..64"),
    ("{name: optim.lr, type: categorical, choices: [4.0, 8.0]}", "choices 4, 8"),
    ("{name: optim.lr, log: true, low: 2, high: 10}", "(2..10)"),
    ("{name: optim.lr, low: 1.5, high: 3}", "(1.5..3)"),
])
def test_an_lr_axis_entirely_above_1_is_refused_before_any_trial(cli, tmp_path, axis, shown):
    proc = cli("tune", *FAST, f"sweep.out_dir={tmp_path / 'sweep'}", f"sweep.params=[{axis}]")
    assert_one_line_error(proc, "sweep.params[0] (optim.lr)", "every value is above lr = 1", shown,
                          "Adam at lr > 1 moves every weight by more than its own scale each step",
                          "no trial would train", "lower the range below 1")
    assert not (tmp_path / "sweep").exists()  # refused before the study was made


@pytest.mark.parametrize("axis", [
    "{name: optim.lr, type: categorical, choices: [4.0, 0.001]}",  # reaches above 1: the pruner's job
    "{name: optim.lr, type: categorical, choices: [1.0]}",  # lr 1 itself is not above the bound
    "{name: optim.lr, log2: true, low: -2, high: 3}",
    "{name: optim.lr, log2: true, low: 0, high: 1}",
])
def test_an_lr_axis_that_reaches_1_or_below_is_kept(axis):
    assert MAX_TRAINABLE_LR == 1.0
    params = search_space(compose([*FAST, f"sweep.params=[{axis}]"]))
    assert [p.name for p in params] == ["optim.lr"]


# --------------------------------------------------------------------------------------------
# B. sweep.params: not given (None) is the default space; an explicit [] is refused
# --------------------------------------------------------------------------------------------


def test_sweep_params_none_means_the_default_space_everywhere():
    cfg = compose(FAST)
    cfg.sweep.params = None
    assert search_space(cfg) == default_params()
    legacy = copy.deepcopy(cfg)
    legacy.sweep.params = []  # a base config recorded before None meant "not given"
    assert signature(cfg) == signature(legacy)  # an existing study still opens


def test_an_explicitly_empty_sweep_params_is_refused(cli, tmp_path):
    assert search_space(compose(FAST)) == default_params()  # not given: the default space
    proc = cli("tune", *FAST, f"sweep.out_dir={tmp_path / 'sweep'}", "sweep.params=[]")
    assert_one_line_error(proc, "sweep.params=[] sweeps nothing", "drop sweep.params")


# --------------------------------------------------------------------------------------------
# C, D. transfer: a new run directory per target run; --preset's did-you-mean and config_dir
# --------------------------------------------------------------------------------------------


def best_doc(**hparams) -> dict:
    """A study summary of the shape tune writes, without training anything."""
    base = compose(["model=dit-tiny", "model.depth=2", "train.steps=2", "train.eval_every=2",
                    "train.batch_size=16", "train.val_size=32", "train.progress=false",
                    "train.samples=0", "sweep.proxy_widths=[32]"])
    hparams = hparams or {"optim.lr": 2.0**-8}
    return {"study": "s", "storage": "sqlite:///x.db", "parametrization": "mup", "value": 0.5,
            "trial": 0, "hparams": hparams, "proxy_widths": [32], "base_config": to_dict(base),
            "cost": {"flops": 1e9, "wall_time_s": 1.0, "n_complete": 1, "n_pruned": 0,
                     "n_failed": 0},
            "trials": [{"number": 0, "state": "COMPLETE", "value": 0.5, "hparams": hparams,
                        "losses": {"32": 0.5}, "flops": 1e9, "wall_time_s": 1.0, "reason": ""}]}


def test_every_transferred_config_trains_in_a_run_directory_of_its_own(tmp_path):
    target = tmp_path / "target.yaml"
    cfg = transfer(best_doc(), width=64).config
    assert cfg.train.run_dir is None and cfg.train.save
    write_config(cfg, target)
    # Two targets trained from one folder: each its own runs/train/<time>, neither refused.
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "mupsweep.cli", "train", "--config",
                               str(target), "--json"], capture_output=True, text=True,
                              timeout=240, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 2, runs
    # A run directory named on the transfer command line is kept.
    named = transfer(best_doc(), width=64, overrides=[f"train.run_dir={tmp_path}/mine"]).config
    assert named.train.run_dir == f"{tmp_path}/mine"


def test_an_unknown_preset_says_did_you_mean():
    with pytest.raises(UserError, match=r"--preset 'dit-xl2' is unknown; did you mean dit-xl-2\?"):
        transfer(best_doc(), preset="dit-xl2")


def test_transfer_finds_presets_and_groups_in_config_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs here: only config_dir holds the user's preset
    groups = tmp_path / "elsewhere"
    (groups / "model").mkdir(parents=True)
    packaged = (Path(mupsweep.__file__).parent / "configs" / "model" / "dit-tiny.yaml").read_text()
    (groups / "model" / "wide-tiny.yaml").write_text(packaged.replace("width: 64", "width: 128"))
    with pytest.raises(UserError, match="wide-tiny"):
        transfer(best_doc(), preset="wide-tiny")
    cfg = transfer(best_doc(), preset="wide-tiny", config_dir=groups).config
    assert (cfg.model.arch, cfg.model.width) == ("dit", 128)
    with pytest.raises(UserError, match="did you mean wide-tiny"):
        transfer(best_doc(), preset="wide-tiyn", config_dir=groups)


# --------------------------------------------------------------------------------------------
# E. A distributed run says its world size and that train.batch_size is the global batch
# --------------------------------------------------------------------------------------------


def test_a_distributed_train_says_the_batch_is_global(tmp_path):
    proc = run_cli("train", *TINY, "model.depth=2", "train.steps=2", "train.eval_every=2",
                   "train.val_size=32", "train.batch_size=32", f"train.run_dir={tmp_path}/run",
                   "--nproc-per-node", "2", "--json", env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = "world size 2: train.batch_size=32 is the global batch, 16 per rank"
    assert proc.stderr.count(line) == 1, proc.stderr  # rank 0 only
    assert json.loads(proc.stdout)["steps"] == 2
