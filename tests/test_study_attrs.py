"""What Optuna's own tools show of a mupsweep study: the objective is named validation_loss,
the user attributes stay short (the base config is a system attribute, out of `optuna
studies` and optuna-dashboard), and best.json / transfer still get the whole base config."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
from conftest import run_cli

from mupsweep.config import compose, to_dict
from mupsweep.sweep.study import BASE_CONFIG_ATTR, open_study, study_base_config
from mupsweep.sweep.summary import load_summary_from_storage

FAST = ["model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
        "train.eval_every=3", "train.val_size=32", "train.batch_size=16", "sweep.proxy_widths=[32]"]


def test_the_study_names_its_metric_and_keeps_the_base_config_out_of_user_attrs(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    proc = run_cli("tune", *FAST, f"sweep.out_dir={tmp_path}", "sweep.n_trials=2",
                   "--storage", storage, "--study", "s")
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.metric_names == ["validation_loss"]
    assert "base_config" not in study.user_attrs
    assert len(json.dumps(study.user_attrs)) < 300  # what `optuna studies` prints
    listed = subprocess.run([sys.executable, "-m", "optuna.cli", "studies", "--storage", storage],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "'arch'" not in listed.stdout, listed.stdout

    base = study_base_config(study)
    assert base["model"]["arch"] == "dit" and base["train"]["steps"] == 6
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["base_config"] == base == load_summary_from_storage(storage, "s")["base_config"]
    out = tmp_path / "t.yaml"
    assert run_cli("transfer", str(tmp_path / "best.json"), "--width", "64", "-o",
                   str(out)).returncode == 0
    assert run_cli("transfer", "--storage", storage, "--study", "s", "--width", "64", "-o",
                   str(tmp_path / "u.yaml")).returncode == 0
    assert out.read_text() == (tmp_path / "u.yaml").read_text().replace("u.yaml", "t.yaml")
    printed = run_cli("transfer", str(tmp_path / "best.json"), "--width", "64", "--cfg")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == out.read_text()  # --cfg: the same YAML, on stdout, no file


def test_a_study_that_keeps_its_base_config_in_user_attrs_still_opens(tmp_path):
    """Studies made before the base config moved to a system attribute."""
    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = compose([*FAST, f"sweep.out_dir={tmp_path}", f"sweep.storage={storage}"])
    old = optuna.create_study(study_name="mupsweep", storage=storage)
    old.set_user_attr("base_config", to_dict(cfg))
    old.set_user_attr("parametrization", "mup")
    old.set_user_attr("proxy_widths", [32])
    study = open_study(cfg)  # the same config continues it
    assert study_base_config(study)["train"]["steps"] == 6
    assert BASE_CONFIG_ATTR not in str(study.user_attrs)
    assert study.metric_names == ["validation_loss"]
