"""`mupsweep report`: lr-vs-loss per width, optimization history, Markdown trial table."""

from __future__ import annotations

import copy
import json

from conftest import assert_one_line_error, run_cli
from test_transfer import real_best_doc

from mupsweep.report import plot_history, plot_lr_vs_loss, write_report


def test_write_report_library(tmp_path):
    doc = copy.deepcopy(real_best_doc())
    doc["trials"].append({"number": 3, "state": "PRUNED", "value": None,
                          "hparams": {"optim.lr": 0.5}, "losses": {}})
    md = write_report(doc, tmp_path / "rep")
    text = md.read_text()
    for png in ("lr_vs_loss.png", "history.png"):
        assert (md.parent / png).stat().st_size > 10_000
        assert f"]({png})" in text
    assert "## Top 3 trials by value" in text  # the pruned trial has no value: not ranked
    assert "| trial | validation_loss | optim.lr | w32 | w64 |" in text
    best = min(doc["trials"][:3], key=lambda t: t["value"])
    first_row = text.split("| trial | validation_loss |")[1].splitlines()[2]
    assert first_row.startswith(f"| {best['number']} | {best['value']:.4g} |")
    assert "## Best learning rate per proxy width" in text


def test_plots_without_usable_trials(tmp_path):
    """A sweep whose trials were all pruned still gets (empty) plots, not a crash."""
    doc = copy.deepcopy(real_best_doc())
    for t in doc["trials"]:
        t["state"], t["value"] = "PRUNED", None
    assert plot_lr_vs_loss(doc, tmp_path / "a.png").is_file()
    assert plot_history(doc, tmp_path / "b.png").is_file()


def test_report_cli_from_stdin(tmp_path):
    import subprocess
    import sys

    doc = json.dumps(real_best_doc())
    proc = subprocess.run([sys.executable, "-m", "mupsweep.cli", "report", "-", "-o",
                           str(tmp_path / "r"), "--json"], input=doc, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (tmp_path / "r" / "report.md").is_file() and out["markdown"].endswith("report.md")
    assert (tmp_path / "r" / "lr_vs_loss.png").stat().st_size > 10_000


def test_report_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert_one_line_error(run_cli("report", str(bad), "-o", str(tmp_path / "r")),
                          "expected a JSON object")
    assert_one_line_error(run_cli("report", str(tmp_path / "none.json")), "not found")
