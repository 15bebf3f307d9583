"""Run directories: a new one per run, resume only of the same config, one writer at a time
(a lock, taken over from a dead holder), and a directory that stops being writable mid-run
is one line, not a traceback. Real runs, real processes."""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, assert_one_line_error, run_cli

from mupsweep.config import compose
from mupsweep.errors import UserError
from mupsweep.rundir import RunDirLock, new_run_dir
from mupsweep.train import train

SHORT = [*TINY, "train.steps=4", "train.eval_every=2"]


def _train_in_background(run_dir: Path, *args: str, preexec_fn=None) -> subprocess.Popen:
    """A long run (it is stopped by the test), checkpointing every 10 steps."""
    return subprocess.Popen([sys.executable, "-m", "mupsweep.cli", "train", *TINY, "train.steps=100000",
                             "train.ckpt_every=10", f"train.run_dir={run_dir}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ}, preexec_fn=preexec_fn)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared (exit {proc.poll()})"


# --------------------------------------------------------------------------------------------
# A new directory per run; resume only the same config
# --------------------------------------------------------------------------------------------


def test_each_run_gets_its_own_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = train(compose(SHORT)), train(compose(SHORT))
    assert a.run_dir != b.run_dir
    for r in (a, b):
        assert re.fullmatch(r"runs/train/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?", r.run_dir), r.run_dir
        assert (Path(r.run_dir) / "last.pt").exists()
    # the same second twice: a -N suffix, never the same directory
    assert new_run_dir(tmp_path, "x") == tmp_path / "x"
    assert new_run_dir(tmp_path, "x") == tmp_path / "x-1"


@pytest.fixture
def finished(tmp_path) -> Path:
    """A finished 4-step run at lr 1e-3."""
    run_dir = tmp_path / "R"
    train(compose([*SHORT, "optim.lr=1e-3", f"train.run_dir={run_dir}"]))
    return run_dir


def test_finished_run_is_not_resumed_with_other_hps(finished, cli):
    """The issue: a re-run with another lr trained 0 steps, reported the old loss and wrote
    the new lr into config.yaml over weights trained at the old one."""
    config, weights = (finished / "config.yaml").read_text(), (finished / "last.pt").read_bytes()
    for args in (["train", *SHORT, "optim.lr=5e-3", f"train.run_dir={finished}", "train.resume=true"],
                 ["train", "--resume", str(finished), "optim.lr=5e-3"]):
        assert_one_line_error(cli(*args), str(finished), "optim.lr: 0.001 -> 0.005")
    # without resume: taken, and the line says how to resume or where else to go
    assert_one_line_error(cli("train", *SHORT, "optim.lr=1e-3", f"train.run_dir={finished}"),
                          "already holds a run", f"--resume {finished}", "another train.run_dir")
    assert (finished / "config.yaml").read_text() == config
    assert (finished / "last.pt").read_bytes() == weights


def test_resume_may_grow_steps_and_change_what_cannot_change_results(finished, cli):
    proc = run_cli("train", "--resume", str(finished), "train.steps=6", "train.log_every=1",
                   "train.eval_every=3", "train.ckpt_every=5", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps"] == 6 and [h["step"] for h in result["history"]] == [0, 2, 4, 6]
    assert "steps: 6" in (finished / "config.yaml").read_text()
    assert_one_line_error(cli("train", "--resume", str(finished), "train.steps=5"),
                          "train.steps: 6 -> 5 (steps may only grow)")


def test_a_run_saved_before_model_extra_went_still_resumes(finished):
    """Until issue 17 a run saved its architecture's settings in model.extra (a dict) and had
    no model.output_conv / text_* keys. Such a run (config.yaml and the checkpoint's config
    written back in that format) resumes: the saved config is read as today's schema reads
    it, so neither the dict nor a key added since counts as a difference."""
    new_keys = ("output_conv", "text_encoder", "text_file", "text_dim", "text_len", "pooled_dim")

    def as_before(config: dict) -> dict:
        model = {k: v for k, v in config["model"].items() if k not in new_keys}
        return {**config, "model": {**model, "extra": {}}}

    path = finished / "config.yaml"
    path.write_text(yaml.safe_dump(as_before(yaml.safe_load(path.read_text()))))
    ckpt = torch.load(finished / "last.pt", weights_only=False)
    torch.save({**ckpt, "config": as_before(ckpt["config"])}, finished / "last.pt")
    assert "extra: {}" in path.read_text()
    proc = run_cli("train", "--resume", str(finished), "train.steps=6", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 6
    assert "extra" not in path.read_text() and "text_dim: 64" in path.read_text()


def test_checkpoint_of_another_config_is_refused(finished, tmp_path, cli):
    """With no config.yaml beside it, the checkpoint's own config is the one compared."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.pt").write_bytes((finished / "last.pt").read_bytes())
    assert_one_line_error(cli("train", *SHORT, "optim.lr=5e-3", f"train.run_dir={other}",
                              "train.resume=true"), "last.pt", "optim.lr: 0.001 -> 0.005")
    assert not (other / "config.yaml").exists(), "no config may be written over those weights"


def test_resume_of_an_empty_directory_starts_fresh(tmp_path):
    """A requeued job can always pass train.resume=true."""
    r = train(compose([*SHORT, f"train.run_dir={tmp_path}/new", "train.resume=true"]))
    assert r.steps == 4 and (tmp_path / "new" / "last.pt").exists()


# --------------------------------------------------------------------------------------------
# One writer per directory
# --------------------------------------------------------------------------------------------


def test_second_process_on_a_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "R"
    first = _train_in_background(run_dir)
    try:
        _wait_for(run_dir / "metrics.jsonl", first)
        second = run_cli("train", *SHORT, f"train.run_dir={run_dir}", "train.resume=true")
        assert_one_line_error(second, f"pid {first.pid} on {socket.gethostname()}", "in use")
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()
        first.wait()
    # the directory is the first run's alone: its config, its metrics in order
    assert "steps: 100000" in (run_dir / "config.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "R"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from mupsweep.rundir import RunDirLock; "
        "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)"),
        str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
        RunDirLock(run_dir).check_free()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (run_dir / ".lock").read_text()  # left behind by the dead
    r = train(compose([*SHORT, f"train.run_dir={run_dir}"]))
    assert r.steps == 4
    assert (run_dir / ".lock").read_text().startswith(f"pid {os.getpid()} ")


# --------------------------------------------------------------------------------------------
# A directory that stops taking writes mid-run
# --------------------------------------------------------------------------------------------


def _without_root_override() -> None:
    """In the child: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    even root obeys file modes after exec (tests often run as root in containers)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _file_size_limit(limit: int):
    def apply() -> None:  # Python ignores SIGXFSZ, so a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("how", ["read-only directory", "full disk"])
def test_unwritable_run_dir_mid_run_is_one_line(tmp_path, how):
    run_dir = tmp_path / "R"
    if how == "read-only directory":
        proc = _train_in_background(run_dir, preexec_fn=_without_root_override)
        _wait_for(run_dir / "last.pt", proc)
        run_dir.chmod(0o555)
    else:  # config.yaml and metrics fit, a checkpoint (about 4 MB) does not
        proc = _train_in_background(run_dir, preexec_fn=_file_size_limit(200_000))
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        run_dir.chmod(0o755)
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                          "cannot write checkpoint", str(run_dir / "last.pt"))
    if how == "read-only directory":  # the checkpoint before is intact
        assert torch.load(run_dir / "last.pt", weights_only=True)["step"] >= 10


def test_read_only_run_dir_at_start_is_one_line(tmp_path):
    run_dir = tmp_path / "R"
    run_dir.mkdir(mode=0o555)
    proc = subprocess.run([sys.executable, "-m", "mupsweep.cli", "train", *SHORT,
                           f"train.run_dir={run_dir}"], capture_output=True, text=True,
                          preexec_fn=_without_root_override, timeout=120)
    run_dir.chmod(0o755)
    assert_one_line_error(proc, f"cannot write in {run_dir}", "Permission denied")
