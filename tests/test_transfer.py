"""`mupsweep transfer`: study summary -> target config that `mupsweep train --config` accepts.

The study summaries here come from real `train()` runs (a 3 lr x 2 width grid on dit-tiny, the
shape `mupsweep tune` writes), except the drift tests, where only the transfer logic is under
test and the losses are synthetic.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import subprocess
import sys
import tempfile

import pytest
import yaml
from conftest import assert_one_line_error, run_cli

from mupsweep.config import compose, to_dict
from mupsweep.errors import UserError
from mupsweep.sweep.storage import redact_url
from mupsweep.sweep.summary import lr_by_width
from mupsweep.transfer import transfer

PROXY_WIDTHS = [32, 64]
LRS = [2.0**-10, 2.0**-7, 2.0**-4]


@functools.lru_cache(maxsize=1)
def real_best_doc() -> dict:
    """A study summary built the way tune builds it, from 6 real short training runs.

    Cached per process, so test_report.py reuses the same runs."""
    from mupsweep.data import load_dataset
    from mupsweep.train import train

    base = ["model=dit-tiny", "train.steps=10", "train.batch_size=32", "train.eval_every=10",
            "train.val_size=64", "train.progress=false", "train.save=false",
            "train.samples=0", "train.resume=false", "sweep.proxy_widths=[32,64]"]
    base_cfg = compose(base)
    dataset = load_dataset(base_cfg.data)  # once, as tune does, not once per run
    run_dir = tempfile.mkdtemp(prefix="mupsweep-transfer-")
    trials = []
    for number, lr in enumerate(LRS):
        losses, flops, wall = {}, 0.0, 0.0
        for w in PROXY_WIDTHS:
            cfg = compose([*base, f"model.width={w}", f"optim.lr={lr}",
                           f"train.run_dir={run_dir}/t{number}_w{w}"])
            r = train(cfg, dataset=dataset)
            losses[str(w)], flops, wall = r.validation_loss, flops + r.flops, wall + r.wall_time_s
        trials.append({"number": number, "state": "COMPLETE",
                       "value": sum(losses.values()) / len(losses), "hparams": {"optim.lr": lr},
                       "losses": losses, "flops": flops, "wall_time_s": wall, "reason": ""})
    best = min(trials, key=lambda t: t["value"])
    return {
        "study": "test-transfer", "storage": "sqlite:///runs/sweep/optuna.db",
        "parametrization": "mup", "value": best["value"], "trial": best["number"],
        "hparams": dict(best["hparams"]), "proxy_widths": list(PROXY_WIDTHS),
        "base_config": to_dict(base_cfg),
        "cost": {"flops": sum(t["flops"] for t in trials),
                 "wall_time_s": sum(t["wall_time_s"] for t in trials),
                 "n_complete": len(trials), "n_pruned": 0, "n_failed": 0},
        "trials": trials,
    }


@pytest.fixture
def doc() -> dict:
    return copy.deepcopy(real_best_doc())


@pytest.fixture
def best_json(tmp_path, doc) -> str:
    path = tmp_path / "best.json"
    path.write_text(json.dumps(doc))
    return str(path)


def synthetic_doc(best_log2_lr: dict[int, float]) -> dict:
    """A doc whose per-width loss is a parabola in log2 lr, minimal at best_log2_lr[width]."""
    doc = copy.deepcopy(real_best_doc())
    trials = []
    for number, e in enumerate(range(-12, -3)):
        losses = {str(w): 0.2 + 0.01 * (e - m) ** 2 for w, m in best_log2_lr.items()}
        trials.append({"number": number, "state": "COMPLETE",
                       "value": sum(losses.values()) / len(losses),
                       "hparams": {"optim.lr": 2.0**e}, "losses": losses})
    trials.append({"number": len(trials), "state": "PRUNED", "value": None,
                   "hparams": {"optim.lr": 2.0**-20}, "losses": {}})
    doc.update(proxy_widths=list(best_log2_lr), trials=trials,
               hparams={"optim.lr": 2.0**-9})
    return doc


# --------------------------------------------------------------------------------------------
# The main path: transfer, then train the written config with the real CLI
# --------------------------------------------------------------------------------------------


def test_transfer_writes_config_that_trains(tmp_path, best_json, doc):
    target = tmp_path / "target.yaml"
    proc = run_cli("transfer", best_json, "--width", "128", "-o", str(target), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["config_path"] == str(target.resolve())
    assert "tuning =" in proc.stderr and "% of one target run" in proc.stderr

    written = yaml.safe_load(target.read_text())
    assert written["model"]["width"] == 128
    assert written["model"]["base_width"] == doc["base_config"]["model"]["base_width"]
    assert written["optim"]["lr"] == doc["hparams"]["optim.lr"]  # the tuned lr, exactly
    prov = written["provenance"]
    assert prov["trial"] == doc["trial"] and prov["proxy_widths"] == PROXY_WIDTHS
    assert prov["hparams"] == doc["hparams"]
    assert prov["tuning_cost_pct"] > 0 and prov["target_train_flops"] > prov["sweep_cost"]["flops"] / 1e6
    assert prov == out["provenance"]

    run = run_cli("train", "--config", str(target), "train.steps=5", "train.progress=false",
                  "train.samples=0", f"train.run_dir={tmp_path}/run", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["steps"] == 5 and math.isfinite(result["validation_loss"])
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["provenance"]["trial"] == doc["trial"]  # provenance travels with the run


def test_pipeline_from_stdin(tmp_path, best_json):
    """`cat best.json | mupsweep transfer - ... --json`: stdout is exactly one JSON document."""
    target = tmp_path / "t.yaml"
    with open(best_json) as f:
        proc = subprocess.run([sys.executable, "-m", "mupsweep.cli", "transfer", "-", "--width",
                               "128", "-o", str(target), "--json"], stdin=f, capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"config_path", "warnings", "provenance"} and target.is_file()


def test_library_applies_hparams_preset_and_steps(doc):
    doc["hparams"] = {"optim.lr": 2.0**-8, "model.init_mult": 0.5, "model.output_mult": 2.0}
    # dit-s-2 learns sigma and the dit-tiny proxy does not: accepted by name (else refused,
    # tests/test_transfer_trust.py)
    accept = ["model.learn_sigma=true"]
    r = transfer(doc, preset="dit-s-2", steps=1000, overrides=accept)
    m = r.config.model
    assert (m.width, m.depth, m.learn_sigma) == (384, 12, True)  # from the preset
    assert (m.head_dim, m.base_width) == (16, 32)  # the proxy's, not the preset's 64/256
    assert (r.config.optim.lr, m.init_mult, m.output_mult) == (2.0**-8, 0.5, 2.0)
    assert r.config.train.steps == 1000 and r.config.train.run_dir is None  # a new one per run
    assert any("preset dit-s-2 sets model.head_dim=64" in w for w in r.warnings)
    assert any("model.depth=4 but target model.depth=12" in w for w in r.warnings)
    # an explicit width wins over the preset's
    assert transfer(doc, preset="dit-s-2", width=256, overrides=accept).config.model.width == 256


# --------------------------------------------------------------------------------------------
# Checks: SP, things width transfer does not cover, lr drift
# --------------------------------------------------------------------------------------------


def test_sp_study_refused_then_forced(tmp_path, doc):
    doc["parametrization"] = "sp"
    doc["base_config"]["model"]["parametrization"] = "sp"
    path = tmp_path / "sp.json"
    path.write_text(json.dumps(doc))
    refused = run_cli("transfer", str(path), "--width", "128", "-o", str(tmp_path / "t.yaml"))
    assert_one_line_error(refused, "do not transfer across width under SP", "--force")
    assert not (tmp_path / "t.yaml").exists()

    forced = run_cli("transfer", str(path), "--width", "128", "-o", str(tmp_path / "t.yaml"),
                     "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: " in forced.stderr and "under SP" in forced.stderr
    assert (tmp_path / "t.yaml").is_file()


def test_depth_override_warns(tmp_path, best_json):
    proc = run_cli("transfer", best_json, "--width", "128", "model.depth=6", "-o",
                   str(tmp_path / "t.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads(proc.stdout)["warnings"]
    assert any("model.depth=4 but target model.depth=6" in w for w in warnings)
    assert "warning: proxy model.depth=4" in proc.stderr


def test_base_width_and_batch_size_mismatch_warn(doc):
    r = transfer(doc, width=128, overrides=["model.base_width=64", "train.batch_size=64"])
    assert any("model.base_width=32 but target model.base_width=64" in w and "base shapes" in w
               for w in r.warnings)
    assert any("train.batch_size" in w for w in r.warnings)
    assert not transfer(doc, width=128).warnings or all(
        "model." not in w and "batch" not in w for w in transfer(doc, width=128).warnings)


def test_override_of_tuned_value_warns(doc):
    r = transfer(doc, width=128, overrides=["optim.lr=0.1"])
    assert r.config.optim.lr == 0.1
    assert any("replaces the tuned optim.lr" in w for w in r.warnings)


def test_drift_warning_fires_on_two_octaves():
    r = transfer(synthetic_doc({64: -10.0, 128: -8.0}), width=512)
    assert r.unreliable and r.drift_octaves == pytest.approx(2.0)
    assert any(w.startswith("transfer looks unreliable") for w in r.warnings)
    assert [row["log2_lr"] for row in r.drift] == [-10.0, -8.0]


def test_no_drift_warning_when_widths_agree():
    r = transfer(synthetic_doc({64: -9.0, 128: -9.0, 256: -9.0}), width=512)
    assert not r.unreliable and r.drift_octaves == 0.0
    assert not any("unreliable" in w for w in r.warnings)


def test_drift_table_printed_by_cli(tmp_path):
    path = tmp_path / "drift.json"
    path.write_text(json.dumps(synthetic_doc({64: -10.0, 128: -8.0})))
    proc = run_cli("transfer", str(path), "--width", "512", "-o", str(tmp_path / "t.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "best lr per proxy width" in proc.stderr and "transfer looks unreliable" in proc.stderr


def test_lr_by_width_on_real_runs(doc):
    rows = lr_by_width(doc)
    assert [r["width"] for r in rows] == PROXY_WIDTHS and all(r["trials"] == 3 for r in rows)
    for r in rows:  # each row's lr really is the argmin of that width's losses
        best = min(doc["trials"], key=lambda t: t["losses"][str(r["width"])])
        assert r["lr"] == best["hparams"]["optim.lr"]


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    proc = run_cli("transfer", str(tmp_path / "nope.json"), "--width", "128", "-o", "t.yaml")
    assert_one_line_error(proc, "not found", "nope.json")


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    assert_one_line_error(run_cli("transfer", str(path), "--width", "128", "-o", "t.yaml"),
                          "is not valid JSON")


def test_doc_missing_keys(tmp_path, doc):
    del doc["base_config"], doc["hparams"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(doc))
    assert_one_line_error(run_cli("transfer", str(path), "--width", "128", "-o", "t.yaml"),
                          "missing key(s) hparams, base_config")


def test_no_output_and_no_target(best_json):
    assert_one_line_error(run_cli("transfer", best_json, "--width", "128"), "-o")
    with pytest.raises(UserError, match="no target"):
        transfer(real_best_doc())


def test_bad_width_and_unknown_preset(doc):
    with pytest.raises(UserError, match="not divisible by model.head_dim"):
        transfer(doc, width=100)
    with pytest.raises(UserError, match="preset 'dit-zz' is unknown"):
        transfer(doc, preset="dit-zz")
    doc["hparams"]["optim.no_such"] = 1.0
    with pytest.raises(UserError, match="optim.no_such"):
        transfer(doc, width=128)


def test_unreachable_storage_hides_password(tmp_path):
    url = "postgresql://mupsweep:hunter2@127.0.0.1:9/optuna"
    proc = run_cli("transfer", "--storage", url, "--study", "s", "--width", "128", "-o",
                   str(tmp_path / "t.yaml"))
    assert_one_line_error(proc, "cannot open storage", "mupsweep:***@127.0.0.1")
    assert "hunter2" not in proc.stderr
    assert redact_url(url) == "postgresql://mupsweep:***@127.0.0.1:9/optuna"
    assert redact_url("sqlite:///runs/x.db") == "sqlite:///runs/x.db"


def test_transfer_from_storage(tmp_path, doc):
    """--storage/--study: the same real trials, stored the way `mupsweep tune` stores them."""
    import optuna

    url = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(study_name="stored", storage=url)
    for key in ("base_config", "parametrization", "proxy_widths"):
        study.set_user_attr(key, doc[key])
    for t in doc["trials"]:
        study.add_trial(optuna.trial.create_trial(
            params={"optim.lr:log2": math.log2(t["hparams"]["optim.lr"])},
            distributions={"optim.lr:log2": optuna.distributions.FloatDistribution(-12, -2)},
            value=t["value"], user_attrs={"hparams": t["hparams"], "losses": t["losses"],
                                          "flops": t["flops"], "wall_time_s": t["wall_time_s"]}))
    proc = run_cli("transfer", "--storage", url, "--study", "stored", "--width", "128",
                   "train.steps=7", "-o", str(tmp_path / "t.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    prov = json.loads(proc.stdout)["provenance"]
    assert prov["study"] == "stored" and prov["trial"] == doc["trial"]
    assert prov["hparams"] == doc["hparams"]
    assert yaml.safe_load((tmp_path / "t.yaml").read_text())["train"]["steps"] == 7

    missing = run_cli("transfer", "--storage", url, "--study", "nope", "--width", "128", "-o",
                      str(tmp_path / "u.yaml"))
    assert_one_line_error(missing, "study 'nope' not found")
