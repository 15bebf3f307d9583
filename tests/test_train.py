"""The training loop on real digits: learns, is deterministic, resumes exactly, runs DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_one_line_error, run_cli

from mupsweep.config import compose
from mupsweep.train import train


def test_training_lowers_validation_loss_substantially(tmp_path):
    cfg = compose([*TINY, "train.steps=200", "train.eval_every=100", f"train.run_dir={tmp_path}"])
    r = train(cfg)
    assert r.initial_validation_loss > 0.9  # eps-prediction starts near mse(0, noise) = 1
    assert r.validation_loss < 0.35 * r.initial_validation_loss, r.history
    assert [h["step"] for h in r.history] == [0, 100, 200]
    assert (tmp_path / "last.pt").exists() and (tmp_path / "config.yaml").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum("validation_loss" in line for line in lines) == 3


def test_validation_loss_is_deterministic(tmp_path):
    a = train(compose([*TINY, "train.steps=5", f"train.run_dir={tmp_path}/a"]))
    b = train(compose([*TINY, "train.steps=5", f"train.run_dir={tmp_path}/b"]))
    assert a.validation_loss == b.validation_loss
    c = train(compose([*TINY, "train.steps=5", "train.seed=1", f"train.run_dir={tmp_path}/c"]))
    assert c.validation_loss != a.validation_loss


def test_lr_schedule_scales_mup_groups_relatively(tmp_path):
    """Warmup + cosine must keep hidden lr / m relative to the base lr in every group."""
    from mupsweep.data import load_dataset
    from mupsweep.group_adamw import lr_lambda
    from mupsweep.parametrize import build_model, data_spec_of, make_optimizer

    cfg = compose(["model.width=128", "optim.warmup_steps=4", "optim.schedule=cosine",
                   "train.steps=20"])
    model = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    opt = make_optimizer(model, cfg.model, cfg.optim)
    ratios = sorted({g["lr"] / cfg.optim.lr for g in opt.param_groups})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    for _ in range(10):
        opt.step()
        sched.step()
        factor = lr_lambda(cfg)(sched.last_epoch)
        assert sorted({g["lr"] / (cfg.optim.lr * factor) for g in opt.param_groups}) == \
            pytest.approx(ratios)
    assert ratios == pytest.approx([0.25, 1.0])


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    common = [*TINY, "train.steps=300", "train.eval_every=50", "train.ckpt_every=25"]
    straight = run_cli("train", *common, f"train.run_dir={tmp_path}/straight", "--json")
    assert straight.returncode == 0, straight.stderr
    expected = json.loads(straight.stdout)

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mupsweep.cli", "train", *common,
                             f"train.run_dir={run_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ})
    ckpt = run_dir / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert killed_at < 300, "the run finished before it could be killed"

    resumed = run_cli("train", *common, f"train.run_dir={run_dir}", "train.resume=true", "--json")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["steps"] == 300
    assert got["validation_loss"] == pytest.approx(expected["validation_loss"], rel=1e-6, abs=1e-7)
    assert [h["step"] for h in got["history"]] == [h["step"] for h in expected["history"]]
    steps = [json.loads(x).get("step") for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics.jsonl must not repeat steps after a resume"


class _RunsCodeWhenUnpickled:
    """Unpickling this calls open(path, "w"): any code could run there instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_checkpoint_holding_pickled_objects_is_refused_without_running_them(tmp_path):
    """A checkpoint from elsewhere must not run code: resume reads tensors and plain values
    only, and anything else is a one-line error."""
    run_dir = tmp_path / "run"
    train(compose([*TINY, "train.steps=2", f"train.run_dir={run_dir}"]))
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["note"] = _RunsCodeWhenUnpickled(marker)
    torch.save(ckpt, run_dir / "last.pt")
    proc = run_cli("train", *TINY, "train.steps=3", f"train.run_dir={run_dir}", "train.resume=true")
    assert not marker.exists(), "loading the checkpoint ran code"
    # the way out it names: train.resume=false no longer is one (a directory that holds a run
    # is refused without resume), so the message names another run directory instead
    assert_one_line_error(proc, "last.pt", "another train.run_dir")


@pytest.mark.parametrize("preset, steps, learned", [
    ("dit-tiny", 30, 0.8),
    # text model: caption templates are drawn for the whole global batch, then sliced
    ("mmdit-tiny", 20, 0.9),
])
def test_ddp_two_gloo_processes_match_single_process(tmp_path, preset, steps, learned):
    common = [*TINY, f"model={preset}", f"train.steps={steps}", f"train.eval_every={steps}",
              "train.batch_size=32"]
    single = run_cli("train", *common, f"train.run_dir={tmp_path}/one", "--json")
    assert single.returncode == 0, single.stderr
    ddp = run_cli("train", *common, f"train.run_dir={tmp_path}/two", "--json",
                  "--nproc-per-node", "2", env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr
    a, b = json.loads(single.stdout), json.loads(ddp.stdout)
    assert b["steps"] == steps
    assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=2e-3)
    assert b["validation_loss"] < learned * b["initial_validation_loss"]


def test_ema_run_writes_samples(tmp_path):
    cfg = compose(["model=dit-tiny", "train.progress=false", "train.steps=20", "train.ema_decay=0.9",
                   "train.samples=10", "diffusion.sample_steps=5", f"train.run_dir={tmp_path}"])
    r = train(cfg)
    assert Path(r.samples_path).stat().st_size > 500
    assert torch.load(tmp_path / "last.pt", weights_only=False)["ema"] is not None


def test_diverged_run_exits_1_and_still_prints_its_result(tmp_path):
    proc = run_cli("train", *TINY, "optim.lr=10", "train.steps=20", f"train.run_dir={tmp_path}", "--json")
    assert proc.returncode == 1, proc.stderr
    assert "diverged" in proc.stderr and "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert result["diverged"] and result["reason"]
    # the weights it stopped with were never evaluated: no earlier loss may stand for them
    assert result["validation_loss"] is None  # inf, written as null


@pytest.mark.parametrize("parametrization, hidden_mult", [("mup", 1 / 4), ("sp", 1.0)])
def test_metrics_log_base_and_each_roles_lr_after_the_schedule(tmp_path, parametrization, hidden_mult):
    """At width 128 (4 x the base width) muP's hidden lr is lr / 4, and every group follows
    warmup + cosine; "lr" is the base lr, not whichever group comes first."""
    from mupsweep.group_adamw import lr_lambda

    cfg = compose([*TINY, "model.width=128", f"model.parametrization={parametrization}",
                   "optim.lr=1e-3", "optim.warmup_steps=3", "optim.schedule=cosine", "train.steps=8",
                   "train.log_every=1", "train.eval_every=8", f"train.run_dir={tmp_path}"])
    train(cfg)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 9))
    for r in logged:
        lr = 1e-3 * lr_lambda(cfg)(r["step"])  # the optimizer's lr for the next step
        assert r["lr"] == pytest.approx(lr, rel=1e-9)
        assert r["lr_hidden"] == pytest.approx(lr * hidden_mult, rel=1e-9)
        assert r["lr_input"] == r["lr_output"] == r["lr_vector"] == pytest.approx(lr, rel=1e-9)
