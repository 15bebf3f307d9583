"""Never a wrong answer in silence, round 2: a key that is no hyperparameter is refused in
sweep.params and in a study summary, a tuned value never replaces a command-line choice in
silence, and no file `train` or `transfer` writes holds a storage password.

Real CLI runs (in-process, through the CLI's own entry point) on tiny configs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, assert_one_line_error

from mupsweep.config import compose, to_dict, to_yaml
from mupsweep.sweep.space import search_space
from mupsweep.transfer import transfer

# One trial or run as small as it gets: depth 2, a few steps of batch 8 on 8x8 digits.
FAST = [*TINY, "model.depth=2", "train.steps=4", "train.eval_every=2", "train.val_size=16",
        "train.batch_size=8", "sweep.proxy_widths=[32]", "sweep.n_trials=2"]

SECRET = "PASSWORD"  # the storage password no written file may hold
URL = f"postgresql://u:{SECRET}@127.0.0.1/db"
HIDDEN = "postgresql://u:***@127.0.0.1/db"


def best_doc(hparams: dict, tmp_path: Path, *base: str) -> Path:
    """A study summary of the shape `mupsweep tune` writes, for a dit-tiny proxy at width 32
    (its trials and losses do not matter to the checks under test), in tmp_path/input/."""
    doc = {"study": "s", "storage": "sqlite:///study.db", "parametrization": "mup",
           "value": 0.5, "trial": 0, "hparams": hparams, "proxy_widths": [32],
           "base_config": to_dict(compose([*FAST, *base])), "cost": {}, "trials": []}
    path = tmp_path / "input" / "best.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def assert_no_secret(root: Path, *, skip: Path | None = None) -> list[Path]:
    """No byte of any file under root (except under `skip`, the test's own input) holds the
    password; a checkpoint is also loaded, and its entries must be stored uncompressed, so the
    byte search sees everything. Returns the files searched."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file()
             and not (skip is not None and p.is_relative_to(skip))]
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist()), path
            assert SECRET not in repr(torch.load(path, map_location="cpu", weights_only=True)), path
    return files


# --------------------------------------------------------------------------------------------
# 1. Keys that are not hyperparameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, needles", [
    # the case: every trial trained at proxy width 32, best.json said 48
    ("{name: model.width, type: categorical, choices: [64, 48]}", ["sweep.proxy_widths"]),
    ("{name: model.base_width, type: categorical, choices: [32, 64]}", ["base shapes"]),
    ("{name: model.head_dim, type: categorical, choices: [8, 16]}", ["base shapes"]),
    ("{name: model.parametrization, type: categorical, choices: [mup, sp]}", ["base config"]),
    ("{name: data.max_items, type: int, low: 100, high: 200}", ["loaded once per study"]),
    ("{name: sweep.pack, type: int, low: 1, high: 2}", ["no trial reads"]),
    ("{name: train.val_seed, type: int, low: 0, high: 9}", ["do not compare"]),
    ("{name: diffusion.kind, type: categorical, choices: [ddpm, rectified_flow]}", ["do not compare"]),
    ("{name: train.run_dir, type: categorical, choices: [a, b]}", ["every trial sets it"]),
])
def test_a_key_that_is_no_hyperparameter_is_refused_in_sweep_params(cli, tmp_path, axis, needles):
    proc = cli("tune", *FAST, f"sweep.out_dir={tmp_path / 'sweep'}", f"sweep.params=[{axis}]")
    name = axis.split(",")[0].removeprefix("{name: ")
    assert_one_line_error(proc, f"sweep.params[0] ({name})", "not a hyperparameter", *needles)
    assert not (tmp_path / "sweep" / "study.db").exists()


def test_depth_stays_a_hyperparameter():
    """A swept model.depth really trains at that depth (objective.trial_config keeps it), so it
    stays sweepable; tests/test_packing.py refuses it only in a pack."""
    cfg = compose([*FAST, "sweep.params=[{name: model.depth, type: categorical, choices: [2, 3]}]"])
    assert [p.name for p in search_space(cfg)] == ["model.depth"]


def test_transfer_refuses_a_tuned_width(cli, tmp_path):
    """The issue's best.json: model.width 48 replaced --width 256 in silence."""
    best = best_doc({"optim.lr": 2.0**-8, "model.width": 48}, tmp_path)
    proc = cli("transfer", str(best), "--width", "256", "-o", "t.yaml")
    assert_one_line_error(proc, "model.width=48", "not a hyperparameter", "sweep.params")
    assert not (tmp_path / "t.yaml").exists()


@pytest.mark.parametrize("hparams, args, needles", [
    ({"model.depth": 3}, ["--width", "64", "--depth", "6"],
     ["--depth 6 sets model.depth=6", "tuned model.depth=3"]),
    ({"train.steps": 4}, ["--width", "64", "--steps", "100"],
     ["--steps 100 sets train.steps=100", "tuned train.steps=4"]),
    ({"model.patch_size": 2}, ["--preset", "dit-small-cpu"],
     ["--preset dit-small-cpu sets model.patch_size=4", "tuned model.patch_size=2"]),
    ({"model.depth": 3}, ["--preset", "dit-s-2", "model.learn_sigma=true"],
     ["--preset dit-s-2 sets model.depth=12", "tuned model.depth=3"]),
])
def test_transfer_refuses_a_tuned_value_that_differs_from_the_command_line(
        cli, tmp_path, hparams, args, needles):
    best = best_doc({"optim.lr": 2.0**-8, **hparams}, tmp_path)
    proc = cli("transfer", str(best), *args, "-o", "t.yaml")
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "t.yaml").exists()


def test_transfer_of_a_tuned_depth(tmp_path):
    """No conflict, no refusal: the tuned depth is the target's unless the command line says
    otherwise by name (then the override wins, with a warning); the proxy it is compared with
    is the best trial's, so no depth warning is made up."""
    best = json.loads(best_doc({"optim.lr": 2.0**-8, "model.depth": 3}, tmp_path).read_text())
    kept = transfer(best, width=64)
    assert kept.config.model.depth == 3
    assert not any("model.depth" in w for w in kept.warnings), kept.warnings
    same = transfer(best, width=64, depth=3)  # the same value twice is no conflict
    assert same.config.model.depth == 3
    named = transfer(best, width=64, depth=6, overrides=["model.depth=6"])
    assert named.config.model.depth == 6
    assert any("replaces the tuned model.depth=3" in w for w in named.warnings)


# --------------------------------------------------------------------------------------------
# 3. No file holds a storage password
# --------------------------------------------------------------------------------------------


def test_train_and_resume_write_no_password(cli, tmp_path):
    """config.yaml, last.pt (mid-run and final), metrics, result.json and TensorBoard events;
    the password given as sweep.storage and, in a --config file, in provenance.overrides (as
    an earlier transfer wrote it). A resume with the same config but the password given again
    (or not) continues; one with another config is still refused."""
    given = compose(FAST)
    given.provenance = {"overrides": [f"sweep.storage={URL}"], "note": f"from {URL}"}
    (tmp_path / "input").mkdir()
    config = tmp_path / "input" / "base.yaml"
    config.write_text(to_yaml(given))
    run = tmp_path / "run"
    proc = cli("train", "--config", str(config), f"train.run_dir={run}", f"sweep.storage={URL}",
               "train.ckpt_every=2", "train.tensorboard=true")
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    files = assert_no_secret(tmp_path, skip=tmp_path / "input")
    assert {"config.yaml", "last.pt", "metrics.jsonl", "result.json"} <= {p.name for p in files}
    assert any("tfevents" in p.name for p in files)
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["sweep"]["storage"] == HIDDEN
    assert written["provenance"]["overrides"] == [f"sweep.storage={HIDDEN}"]
    assert written["provenance"]["note"] == f"from {HIDDEN}"
    saved = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["config"]
    assert saved["sweep"]["storage"] == HIDDEN and saved["model"] == written["model"]

    resumed = cli("train", "--resume", str(run), "train.steps=6", f"sweep.storage={URL}")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "result.json").read_text())["steps"] == 6
    again = cli("train", "--resume", str(run), "train.steps=8")  # its own config.yaml, as is
    assert again.returncode == 0, again.stderr
    other = cli("train", "--resume", str(run), "train.steps=10", "optim.lr=0.5")
    assert_one_line_error(other, "another config", "optim.lr")
    assert_no_secret(tmp_path, skip=tmp_path / "input")


def test_transfer_writes_no_password(cli, tmp_path):
    """The target YAML held the password twice (sweep.storage, provenance.overrides), and
    --json printed it; a study summary's own base config may hold one too."""
    best = best_doc({"optim.lr": 2.0**-8}, tmp_path)
    proc = cli("transfer", str(best), "--width", "64", "-o", "t.yaml", "--json",
               f"sweep.storage={URL}")
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert_no_secret(tmp_path, skip=tmp_path / "input")
    target = yaml.safe_load((tmp_path / "t.yaml").read_text())
    assert target["sweep"]["storage"] == HIDDEN
    assert target["provenance"]["overrides"] == [f"sweep.storage={HIDDEN}"]

    doc = json.loads(best.read_text())
    doc["base_config"]["sweep"]["storage"] = URL  # a hand-made document
    assert SECRET not in to_yaml(transfer(doc, width=64).config)
