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


def test_report_gives_no_verdict_before_an_optimum_is_placed(tmp_path):
    """3 trials over 2 widths cannot place an optimum per width: the report says so, not
    'Spread 0.00 octaves ... transfer looks reliable'. With the lrs bracketing each width's
    best, the verdict is given."""
    import copy
    import json

    from test_tune import FAST

    proc = run_cli("tune", *FAST, "sweep.proxy_widths=[32,64]", "sweep.n_trials=3",
                   "sweep.pruner=none", f"sweep.out_dir={tmp_path}/sweep", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    report = run_cli("report", f"{tmp_path}/sweep/best.json", "-o", str(tmp_path / "r"))
    assert report.returncode == 0, report.stderr
    assert "No verdict on transfer" in report.stdout and "looks reliable" not in report.stdout

    placed = copy.deepcopy(doc)  # the same trials at lrs 2^-9, 2^-8, 2^-7, the middle best
    for t, log2_lr, loss in zip(placed["trials"], (-9, -8, -7), (0.5, 0.4, 0.6), strict=True):
        t["hparams"]["optim.lr"] = 2.0**log2_lr
        t["value"], t["losses"] = loss, {"32": loss, "64": loss}
    (tmp_path / "placed.json").write_text(json.dumps(placed))
    report = run_cli("report", str(tmp_path / "placed.json"), "-o", str(tmp_path / "r2"))
    assert report.returncode == 0, report.stderr
    assert "Spread 0.00 octaves: the widths agree" in report.stdout


def test_uvit_under_completep_is_refused_before_compute_is_spent(cli, tmp_path):
    """U-ViT fails the depth coordinate check under completep (its long skips): tune and a
    transfer to another depth refuse it, naming the check's figure, where tune ran and
    transfer --depth wrote a target in silence."""
    import json

    from test_tune import FAST

    proc = cli("tune", *FAST, "model=uvit-tiny", "model.depth=3", "model.depth_parametrization=completep",
               f"sweep.out_dir={tmp_path}/uvit")
    assert_one_line_error(proc, "model.arch=uvit", "out_blocks.0.skip_linear", "0.48")
    assert not (tmp_path / "uvit").exists()

    sweep = run_cli("tune", *FAST, "sweep.n_trials=1", "sweep.pruner=none",
                    f"sweep.out_dir={tmp_path}/dit", "--json")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    doc = json.loads(sweep.stdout)
    doc["base_config"]["model"].update(arch="uvit", depth=3, depth_parametrization="completep")
    (tmp_path / "uvit.json").write_text(json.dumps(doc))
    assert_one_line_error(cli("transfer", str(tmp_path / "uvit.json"), "--depth", "5", "-o",
                              str(tmp_path / "t.yaml")), "target depth 5 != proxy depth 3",
                          "skip_linear")
    assert not (tmp_path / "t.yaml").exists()
    proc = cli("transfer", str(tmp_path / "uvit.json"), "--width", "64", "-o", str(tmp_path / "t.yaml"))
    assert proc.returncode == 0, proc.stderr  # across width it still transfers


def test_a_preset_of_your_own_starts_from_a_packaged_one_anywhere(cli, tmp_path):
    """`mupsweep preset mine --from dit-s-2` writes ./configs/model/mine.yaml from any
    directory (the README's `cp mupsweep/configs/...` worked only inside the repository)."""
    import yaml

    proc = cli("preset", "mine", "--from", "dit-s-2")
    assert proc.returncode == 0, proc.stderr
    assert "model=mine" in proc.stderr
    path = tmp_path / "configs" / "model" / "mine.yaml"
    path.write_text(path.read_text().replace("depth: 12", "depth: 3"))
    shown = cli("train", "model=mine", "--cfg")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["model"]["depth"] == 3
    assert_one_line_error(cli("preset", "mine", "--from", "dit-s-2"), "exists")
    assert_one_line_error(cli("preset", "x", "--from", "dit-s2"), "did you mean dit-s-2")
    proc = cli("preset", "mypaper", "--from", "paper-dit-xl-2", "--group", "experiment")
    assert proc.returncode == 0 and "+experiment=mypaper" in proc.stderr
    shown = cli("tune", "+experiment=mypaper", "data.root=x.npz", "--cfg")
    assert yaml.safe_load(shown.stdout)["sweep"]["proxy_widths"] == [144, 288, 576]


def test_help_names_the_run_directory_and_transfer_lists_config_groups():
    train_help = run_cli("train", "--help", env={"COLUMNS": "200"})
    assert "runs/train/DATE_TIME" in train_help.stdout and "runs/train/_" not in train_help.stdout
    transfer_help = run_cli("transfer", "--help", env={"COLUMNS": "200"})
    assert "Config groups" in transfer_help.stdout and "--config-dir" in transfer_help.stdout


def test_a_search_space_in_hydras_sweeper_syntax(cli, tmp_path):
    """What Hydra's Optuna sweeper users write is a search space here: on the command line
    (`optim.lr='tag(log, interval(1e-4, 1e-2))'`) and as a config's hydra.sweeper.params; the
    trials store real values (the dashboard shows lr, not log2 lr). Elsewhere it is refused."""
    import optuna
    from test_tune import FAST

    proc = cli("tune", *FAST, "sweep.n_trials=2", "sweep.pruner=none", "sweep.sampler=random",
               f"sweep.out_dir={tmp_path}/a", "optim.lr=tag(log, interval(1e-4, 1e-2))",
               "model.init_mult=choice(0.5,2.0)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="mupsweep", storage=f"sqlite:///{tmp_path}/a/study.db")
    for t in study.trials:
        assert set(t.params) == {"optim.lr", "model.init_mult"}
        assert 1e-4 <= t.params["optim.lr"] <= 1e-2 and t.params["model.init_mult"] in (0.5, 2.0)
        assert t.user_attrs["hparams"]["optim.lr"] == t.params["optim.lr"]

    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "hp.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        "      optim.lr: tag(log, interval(1e-4, 1e-2))\n      train.seed: range(0, 3)\n")
    shown = cli("tune", "+experiment=hp", "--cfg")
    assert shown.returncode == 0, shown.stderr
    import yaml

    params = {p["name"]: p for p in yaml.safe_load(shown.stdout)["sweep"]["params"]}
    assert params["optim.lr"]["log"] and params["optim.lr"]["low"] == 1e-4
    assert params["train.seed"]["choices"] == [0, 1, 2]
    assert_one_line_error(cli("train", "optim.lr=interval(1e-4,1e-2)"), "is a sweep", "mupsweep tune")


def test_the_readmes_pipeline_line_runs(tmp_path):
    """tune -> transfer -> train in one shell line, exactly as the README shows it."""
    import os
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    line = next(x for x in readme.splitlines() if re.match(r"mupsweep tune .*\| mupsweep train --config -$", x))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs" / "train").iterdir())
    assert len(runs) == 1 and "width: 128" in (runs[0] / "config.yaml").read_text()
    assert (runs[0] / "last.pt").is_file()


def test_make_setup_remembers_the_torch_choice(tmp_path):
    """`make setup TORCH=cpu` after a set-up for another torch sets the venv up anew ("Nothing
    to be done" before: the stamp did not record the choice), and the default (auto) picks the
    torch this machine's venv was made with, so it has nothing to do. Dry runs (make -n)."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).parent.parent
    if shutil.which("make") is None or not list((repo / ".venv").glob(".installed-*")):
        import pytest

        pytest.skip("needs make and a venv set up by it (make test does both)")
    chosen = next((repo / ".venv").glob(".installed-*")).name.removeprefix(".installed-")
    other = "cpu" if chosen != "cpu" else "pinned"
    dry = subprocess.run(["make", "-n", "-C", str(repo), "setup", f"TORCH={other}"],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "setting up .venv anew" in dry.stdout and "Nothing to be done" not in dry.stdout
    same = subprocess.run(["make", "-n", "-C", str(repo), "setup", f"TORCH={chosen}"],
                          capture_output=True, text=True, timeout=120)
    assert "pip install" not in same.stdout, same.stdout
