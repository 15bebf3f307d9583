"""The README's main job, shrunk: every stage runs and leaves its files; a re-run resumes."""

from __future__ import annotations

from pathlib import Path

import optuna

from mupsweep.demo import QUICK, REALISTIC_TARGET_STEPS, TARGET_WIDTH, run_demo


def test_demo_runs_every_stage(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary = run_demo(tmp_path, n_trials=2, proxy_steps=6, target_steps=6, target_width=64)
    assert summary["target"]["width"] == 64  # demo --quick's smaller target
    assert summary["coord_check_mup"]["passed"] and not summary["coord_check_sp"]["passed"]
    assert summary["tune"]["cost"]["n_complete"] + summary["tune"]["cost"]["n_pruned"] == 2
    assert summary["target"]["steps"] == 6
    assert 0 < summary["tuning_cost_pct_of_target_flops"]
    # the share for a run of realistic length: in proportion to the target's steps
    assert summary["tuning_cost_pct_at_realistic_length"] == \
        summary["tuning_cost_pct_of_target_flops"] * 6 / REALISTIC_TARGET_STEPS
    for path in (summary["target"]["config"], summary["target"]["samples"], summary["report"],
                 summary["coord_check_mup"]["plot"]):
        assert Path(path).stat().st_size > 0

    # Re-running continues: the study has its trials and the target run its steps, so nothing
    # is trained again (and the target directory is resumed, not refused as taken).
    metrics = (tmp_path / "target" / "metrics.jsonl").read_text()
    again = run_demo(tmp_path, n_trials=2, proxy_steps=6, target_steps=6, target_width=64)
    assert again["target"]["steps"] == 6
    assert again["target"]["validation_loss"] == summary["target"]["validation_loss"]
    assert (tmp_path / "target" / "metrics.jsonl").read_text() == metrics


def test_quick_demo_is_the_same_job_smaller():
    """`demo --quick` (about a minute on 2 cores, measured) shrinks every stage's size."""
    assert QUICK["n_trials"] < 12 and QUICK["proxy_steps"] < 300 and QUICK["target_steps"] < 1200
    assert QUICK["target_width"] < TARGET_WIDTH
