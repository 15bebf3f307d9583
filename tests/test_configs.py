"""Hydra habits: ./configs and --config-dir on the search path, the shipped experiment files,
--cfg, config groups in --help, "did you mean" for a wrong option or key, python -m mupsweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error

REPO = Path(__file__).resolve().parent.parent


def run_in(cwd: Path, *args: str, module: str = "mupsweep.cli") -> subprocess.CompletedProcess:
    """`python -m mupsweep.cli ARGS` from `cwd` (the search path depends on it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def write_preset(root: Path, width: int = 96) -> None:
    (root / "model").mkdir(parents=True)
    (root / "model" / "mine.yaml").write_text(f"arch: dit\nwidth: {width}\ndepth: 2\nhead_dim: 16\n")


def test_configs_of_the_current_directory_are_on_the_search_path(tmp_path):
    write_preset(tmp_path / "configs")
    proc = run_in(tmp_path, "train", "model=mine", "--cfg")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["width"], cfg["model"]["depth"]) == (96, 2)
    assert not (tmp_path / "runs").exists()  # --cfg runs nothing


def test_a_users_preset_with_a_packaged_name_wins(tmp_path, cli):
    """Hydra users expect their own file to replace the packaged one, not to be ignored."""
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "dit-tiny.yaml").write_text(
        "arch: dit\nwidth: 48\nhead_dim: 16\nbase_width: 32\n")
    assert yaml.safe_load(cli("train", "--cfg").stdout)["model"]["width"] == 48  # the default
    assert yaml.safe_load(cli("train", "model=dit-s-2", "--cfg").stdout)["model"]["width"] == 384


def test_a_users_root_config_replaces_the_defaults_list(tmp_path, cli):
    (tmp_path / "configs").mkdir()
    root = (REPO / "mupsweep" / "config_root" / "config.yaml").read_text()
    (tmp_path / "configs" / "config.yaml").write_text(root.replace("model: dit-tiny", "model: dit-s-2"))
    assert yaml.safe_load(cli("train", "--cfg").stdout)["model"]["width"] == 384


def test_config_dir_option(tmp_path, cli):
    write_preset(tmp_path / "elsewhere", width=112)
    (tmp_path / "elsewhere" / "model" / "mine.yaml").write_text("arch: dit\nwidth: 112\n")
    proc = cli("inspect", "--config-dir", str(tmp_path / "elsewhere"), "model=mine", "--cfg")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["width"] == 112
    assert_one_line_error(cli("train", "--config-dir", str(tmp_path / "nope"), "--cfg"),
                          "--config-dir", "not a directory")


def test_shipped_experiments_compose_from_the_repo():
    proc = run_in(REPO, "tune", "+experiment=paper-dit-xl-2", "data.root=latents.npz", "--cfg")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["width"] == 1152 and cfg["model"]["base_width"] == 288
    assert cfg["sweep"]["proxy_widths"] == [144, 288, 576]
    assert cfg["sweep"]["sampler"] == "grid" and cfg["data"]["name"] == "latents"
    proc = run_in(REPO, "tune", "+experiment=paper-pixart-0.04b", "data.root=latents.npz", "--cfg")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["arch"], cfg["model"]["width"]) == ("pixart", 288)


def test_the_paper_experiments_are_packaged(cli):
    """`+experiment=paper-dit-xl-2` works from any directory (it was unknown outside the
    repository: the experiments lived in its ./configs, not in the package)."""
    proc = cli("tune", "+experiment=paper-dit-xl-2", "data.root=latents.npz", "--cfg")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["sweep"]["proxy_widths"] == [144, 288, 576]


def test_an_unknown_experiment_is_refused_not_ignored(cli):
    """Hydra drops `+experiment=x` in silence when no search path has it."""
    assert_one_line_error(cli("train", "+experiment=paper-dit-xl", "--cfg"), "paper-dit-xl")


@pytest.mark.parametrize("command", ["train", "coord-check", "inspect", "tune", "validate"])
def test_cfg_prints_the_resolved_yaml_and_exits_0(cli, tmp_path, command):
    proc = cli(command, "model=dit-s-2", "optim.lr=0.0005", "--cfg")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["width"] == 384 and cfg["optim"]["lr"] == 0.0005
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_cfg_hides_the_storage_password(cli):
    proc = cli("tune", "--storage", "postgresql://me:hunter2@db/optuna", "--cfg")
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout
    assert yaml.safe_load(proc.stdout)["sweep"]["storage"] == "postgresql://me:***@db/optuna"


def test_cfg_of_a_resume_shows_the_runs_config(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = cli("train", "model=dit-s-2", "--cfg")
    (run / "config.yaml").write_text(first.stdout)
    proc = cli("train", "--resume", str(run), "train.steps=900", "--cfg")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["width"], cfg["train"]["steps"], cfg["train"]["resume"]) == (384, 900, True)


@pytest.mark.parametrize("override, needles", [
    ("model=dit-tny", ["unknown model 'dit-tny'", "did you mean dit-tiny?", "options: diffusers-dit, diffusers-pixart, diffusers-sd3, dit-b-2,"]),
    ("data=digit", ["unknown data 'digit'", "did you mean digits?", "fashion_mnist"]),
    ("model.widht=64", ["unknown key model.widht", "did you mean model.width?", "keys of model:"]),
    ("train.stesp=5", ["unknown key train.stesp", "did you mean train.steps?"]),
    ("modle=dit-tiny", ["unknown config group 'modle'", "did you mean model?"]),
    ("model.no_such_key=1", ["unknown key model.no_such_key (keys of model: arch,"]),
])
def test_a_wrong_name_names_the_valid_ones(cli, override, needles):
    assert_one_line_error(cli("train", override), *needles)


def test_a_wrong_key_in_a_users_preset_names_the_file_and_the_valid_ones(cli, tmp_path):
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "mine.yaml").write_text("arch: dit\nwidht: 96\n")
    assert_one_line_error(cli("train", "model=mine", "--cfg"), "model/mine.yaml: unknown key "
                          "model.widht; did you mean model.width?")


def test_a_wrong_key_in_a_config_file_names_the_valid_ones(cli, tmp_path):
    good = cli("train", "--cfg").stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.replace("  steps:", "  stepz:", 1))
    assert_one_line_error(cli("train", "--config", str(bad)), "unknown key train.stepz",
                          "did you mean train.steps?")


def test_help_lists_the_config_groups_and_the_search_space(tmp_path):
    write_preset(tmp_path / "configs")
    proc = run_in(tmp_path, "train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "model=: diffusers-dit, diffusers-pixart, diffusers-sd3, dit-b-2" in proc.stdout and "dit-tiny" in proc.stdout
    assert "mine" in proc.stdout  # the user's own preset is listed too
    assert "sweep=: default, paper-grid" in proc.stdout
    tune = run_in(tmp_path, "tune", "--help")
    assert "sweep.params" in tune.stdout and "--cfg" in tune.stdout


def test_python_dash_m_mupsweep_and_shell_completion(tmp_path):
    proc = run_in(tmp_path, "--help", module="mupsweep")
    assert proc.returncode == 0, proc.stderr
    assert "coord-check" in proc.stdout and "--install-completion" in proc.stdout
