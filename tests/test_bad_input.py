"""Bad input is refused where the config is composed: one line naming the key, its value and
what is valid, exit 2, before anything is trained; the boundary values are still accepted.

The tables run the CLI's own entry point in this process (conftest's `cli` fixture): the same
code as `mupsweep ...` without an interpreter start per case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import TINY, assert_one_line_error

from mupsweep.config import compose
from mupsweep.train import train

# Short enough that a value accepted by mistake costs seconds, not a 300-step run.
BASE = [*TINY, "train.steps=2", "train.eval_every=2"]


# --------------------------------------------------------------------------------------------
# Every section of the config: ranges, NaN / inf, names, relations
# --------------------------------------------------------------------------------------------

BAD = [
    # model
    ("model.mlp_ratio=-1", "model.mlp_ratio=-1.0 must be a finite number > 0"),
    ("model.mlp_ratio=0.01", "model.mlp_ratio=0.01 gives an MLP of no units"),
    ("model.class_dropout=2", "model.class_dropout=2.0 must be a number in [0, 1]"),
    ("model.init_mult=inf", "model.init_mult=inf must be a finite number > 0"),
    ("model.output_mult=nan", "model.output_mult=nan"),
    ("model.delta_width=-32", "model.delta_width=-32 must be an integer >= 1"),
    ("model.depth=0", "model.depth=0 must be an integer >= 1"),
    # data
    ("data.val_fraction=1", "data.val_fraction=1.0 must be a number in (0, 1)"),
    ("data.split_seed=-1", "data.split_seed=-1 must be an integer in [0, 2147483647]"),
    ("data.max_items=1", "data.max_items=1 must be an integer >= 2"),
    ("data.latent_scale=0", "data.latent_scale=0.0 must be a finite number > 0"),
    # diffusion
    ("diffusion.num_timesteps=0", "diffusion.num_timesteps=0 must be an integer >= 2"),
    ("diffusion.beta_end=5", "diffusion.beta_end=5.0 must be a number in (0, 1)"),
    ("diffusion.beta_start=0.05", "diffusion.beta_start=0.05 must be < diffusion.beta_end=0.02"),
    ("diffusion.sample_steps=0", "diffusion.sample_steps=0 must be an integer >= 1"),
    ("diffusion.sample_steps=2000", "diffusion.sample_steps=2000 is more than diffusion.num_timesteps=1000"),
    ("diffusion.cfg_scale=-inf", "diffusion.cfg_scale=-inf must be a finite number >= 0"),
    # optim
    ("optim.lr=inf", "optim.lr=inf must be a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.beta2=2.0", "optim.beta2=2.0 must be a number in [0, 1)"),
    ("optim.beta1=-0.1", "optim.beta1=-0.1 must be a number in [0, 1)"),
    ("optim.eps=0", "optim.eps=0.0 must be a finite number > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be a finite number >= 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be a number in [0, 1]"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number >= 0"),
    ("optim.warmup_steps=3", "optim.warmup_steps=3 is more than train.steps=2"),
    # train
    ("train.log_every=0", "train.log_every=0 must be an integer >= 1"),
    ("train.diverge_factor=nan", "train.diverge_factor=nan must be a finite number > 1"),
    ("train.diverge_factor=1", "train.diverge_factor=1.0 must be a finite number > 1"),
    ("train.ema_decay=1", "train.ema_decay=1.0 must be a number in [0, 1)"),
    ("train.ckpt_every=-1", "train.ckpt_every=-1 must be an integer >= 0"),
    ("train.samples=-1", "train.samples=-1 must be an integer >= 0"),
    ("train.seed=-1", "train.seed=-1 must be an integer in [0, 2147483647]"),
    ("train.device=gpu", "train.device='gpu': use auto, cpu, cuda or cuda:N"),
    ("train.run_dir=", "train.run_dir is empty"),
    # coord
    ("coord.steps=0", "coord.steps=0 must be an integer >= 1"),
    ("coord.seeds=0", "coord.seeds=0 must be an integer >= 1"),
    ("coord.lr=nan", "coord.lr=nan must be a finite number > 0"),
    ("coord.tolerance=0", "coord.tolerance=0.0 must be a finite number > 0"),
    ("coord.widths=[32]", "coord.widths=[32] must list two or more distinct positive widths"),
    ("coord.widths=[32,32]", "coord.widths=[32, 32] must list two or more"),
    # sweep
    ("sweep.n_trials=0", "sweep.n_trials=0 must be an integer >= 1"),
    ("sweep.n_trials=-1", "sweep.n_trials=-1 must be an integer >= 1"),
    ("sweep.proxy_widths=[]", "sweep.proxy_widths=[] must list one or more distinct positive widths"),
    ("sweep.proxy_widths=[64,64]", "sweep.proxy_widths=[64, 64]"),
    ("sweep.heartbeat_s=-1", "sweep.heartbeat_s=-1 must be an integer >= 0"),
    ("sweep.max_retry=-1", "sweep.max_retry=-1 must be an integer >= 0"),
    ("sweep.grace_s=5", "sweep.grace_s=5 must be more than sweep.heartbeat_s=10"),
    ("sweep.seed=-1", "sweep.seed=-1 must be an integer in [0, 2147483647]"),
    ("sweep.study=", "sweep.study is empty"),
]


@pytest.mark.parametrize("override, needle", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_exit_2(cli, tmp_path, override, needle):
    assert_one_line_error(cli("train", *BASE, override), needle)
    assert not (tmp_path / "runs").exists(), "nothing may be trained on a bad value"


def test_every_bad_value_is_named_in_the_one_line(cli):
    proc = cli("train", *BASE, "optim.lr=inf", "sweep.max_retry=-1", "train.log_every=0")
    assert_one_line_error(proc, "optim.lr=inf", "sweep.max_retry=-1", "train.log_every=0")


GOOD = [  # the edges of the ranges above, which must stay accepted
    "optim.beta2=0.0", "optim.beta1=0.0", "model.class_dropout=1.0", "model.class_dropout=0.0",
    "train.diverge_factor=1.001", "optim.warmup_steps=2",
    "diffusion.num_timesteps=2 diffusion.sample_steps=2",
    "diffusion.sample_steps=1000", "sweep.heartbeat_s=0", "sweep.max_retry=0", "sweep.n_trials=1",
    "train.steps=0", "train.ckpt_every=0", "train.samples=0", "optim.min_lr_ratio=0.0",
    "optim.min_lr_ratio=1.0", "diffusion.beta_end=0.999", "train.seed=2147483647",
    "model.mlp_ratio=0.03125", "coord.widths=[32,64]", "sweep.grace_s=11", "diffusion.cfg_scale=0",
    "optim.weight_decay=0", "data.max_items=2", "train.ema_decay=0.0", "train.device=cuda:1",
]


@pytest.mark.parametrize("override", GOOD)
def test_boundary_value_is_accepted(override):
    compose([*BASE, *override.split()])


def test_boundary_values_train(tmp_path):
    """Accepted edges are not only accepted: a run on them trains and samples."""
    r = train(compose([*BASE, "model.class_dropout=1.0", "optim.beta2=0.0", "optim.warmup_steps=2",
                       "diffusion.num_timesteps=2", "diffusion.sample_steps=2",
                       "model.mlp_ratio=0.03125", "optim.min_lr_ratio=0.0", "optim.schedule=cosine",
                       "train.samples=4", f"train.run_dir={tmp_path}/run"]))
    assert r.steps == 2 and not r.diverged and Path(r.samples_path).stat().st_size > 0


# --------------------------------------------------------------------------------------------
# The command line and the run directory's path
# --------------------------------------------------------------------------------------------


def test_nproc_per_node_zero_is_refused(cli):
    assert_one_line_error(cli("train", *BASE, "--nproc-per-node", "0"), "--nproc-per-node=0")


@pytest.mark.parametrize("where, needle", [
    ("/proc/mupsweep-run", "/proc/mupsweep-run"),
    ("FILE", "is a file, not a directory"),
    ("FILE/run", "FILE/run"),
])
def test_run_dir_that_cannot_be_a_directory(cli, tmp_path, where, needle):
    (tmp_path / "FILE").write_text("not a directory")
    where, needle = where.replace("FILE", str(tmp_path / "FILE")), needle.replace("FILE", str(tmp_path / "FILE"))
    assert_one_line_error(cli("train", *BASE, f"train.run_dir={where}"), needle)


# --------------------------------------------------------------------------------------------
# --config: a whole resolved config, never an empty or cut-off file
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """config.yaml of a real (2-step) run."""
    run_dir = tmp_path_factory.mktemp("run") / "r"
    train(compose([*BASE, f"train.run_dir={run_dir}"]))
    return run_dir / "config.yaml"


def test_empty_config_file_is_refused(cli, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert_one_line_error(cli("train", "--config", str(tmp_path / "empty.yaml")),
                          "missing model, data, diffusion, optim, train, coord, sweep, provenance")


def test_truncated_config_file_is_refused(cli, tmp_path, run_config):
    lines = run_config.read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("train:")) + 3
    (tmp_path / "cut.yaml").write_text("\n".join(lines[:cut]) + "\n")  # valid YAML, cut short
    assert_one_line_error(cli("train", "--config", str(tmp_path / "cut.yaml")),
                          str(tmp_path / "cut.yaml"), "missing coord, sweep, provenance")


def test_config_without_provenance_is_refused(cli, tmp_path, run_config):
    doc = yaml.safe_load(run_config.read_text())
    del doc["provenance"]
    (tmp_path / "noprov.yaml").write_text(yaml.safe_dump(doc))
    assert_one_line_error(cli("train", "--config", str(tmp_path / "noprov.yaml")), "missing provenance")


def test_a_runs_own_config_file_trains(cli, tmp_path, run_config):
    proc = cli("train", "--config", str(run_config), f"train.run_dir={tmp_path}/again", "--json")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "again" / "last.pt").exists()


def test_a_config_written_before_the_eval_section_trains(cli, tmp_path, run_config):
    """A config.yaml from before `eval` existed (no such section) takes its defaults."""
    old = yaml.safe_load(run_config.read_text())
    del old["eval"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    proc = cli("train", "--config", str(tmp_path / "old.yaml"), f"train.run_dir={tmp_path}/old", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["metrics"].keys() == {"validation_loss"}
