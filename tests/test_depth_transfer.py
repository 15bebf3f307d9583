"""Tune on a proxy that is narrow AND shallow, transfer across width and depth
(model.depth_parametrization=completep), and `validate --depths`: the real CLI on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, run_cli

from mupsweep.config import compose
from mupsweep.errors import UserError
from mupsweep.sweep.summary import load_summary
from mupsweep.transfer import transfer
from mupsweep.validate import validate

PROXY = ["model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
         "train.eval_every=3", "train.val_size=32", "train.batch_size=16", "sweep.proxy_widths=[32]",
         "sweep.n_trials=3", "sweep.sampler=random", "sweep.pruner=none"]


def _tune(out, depth_parametrization: str) -> str:
    proc = run_cli("tune", *PROXY, f"model.depth_parametrization={depth_parametrization}",
                   f"sweep.out_dir={out}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out / "best.json")


@pytest.fixture(scope="module")
def completep_best(tmp_path_factory) -> str:
    return _tune(tmp_path_factory.mktemp("tune-completep"), "completep")


@pytest.fixture(scope="module")
def none_best(tmp_path_factory) -> str:
    return _tune(tmp_path_factory.mktemp("tune-none"), "none")


@pytest.fixture(scope="module")
def none_dir(none_best) -> str:
    return str(Path(none_best).parent)


def test_shallow_proxy_transfers_to_a_deep_wide_target_that_trains(tmp_path, completep_best):
    target = tmp_path / "target.yaml"
    proc = run_cli("transfer", completep_best, "--width", "256", "--depth", "16", "-o",
                   str(target), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert not any("depth" in w for w in out["warnings"]), out["warnings"]
    m = yaml.safe_load(target.read_text())["model"]
    assert (m["width"], m["depth"], m["base_depth"], m["depth_parametrization"]) == (256, 16, 2, "completep")
    prov = out["provenance"]
    assert (prov["proxy_depth"], prov["target_depth"], prov["base_depth"]) == (2, 16, 2)
    # the cost ledger: per image the proxy is a small share of the target
    assert 0 < prov["proxy_flops_pct"]["32"] < 5
    assert "per image, the proxy (width 32, depth 2) costs" in " ".join(proc.stderr.split())

    # the target really is CompleteP at m_L = 8: every branch x 1/8, and it trains
    rows = json.loads(run_cli("inspect", "--config", str(target), "--json").stdout)
    assert {r["residual_mult"] for r in rows if r["residual_block"]} == {0.125}
    run = run_cli("train", "--config", str(target), "train.steps=2", "train.progress=false",
                  "train.samples=0", f"train.run_dir={tmp_path}/run", "--json")
    assert run.returncode == 0, run.stderr


def test_preset_from_a_shallow_proxy(completep_best):
    # dit-xl-2 learns sigma, the proxy did not: a named override accepts that change
    r = transfer(load_summary(completep_best), preset="dit-xl-2", overrides=["model.learn_sigma=true"])
    m = r.config.model
    assert (m.depth, m.base_depth, m.width, m.learn_sigma) == (28, 2, 1152, True)
    assert not any("model.depth" in w for w in r.warnings), r.warnings
    assert r.provenance["proxy_flops_pct"]["32"] < 0.1


def test_depth_warning_stays_under_none(none_best):
    r = transfer(load_summary(none_best), width=256, depth=16)
    assert r.config.model.depth_parametrization == "none"
    assert any("proxy model.depth=2 but target model.depth=16" in w
               and "depth_parametrization=completep" in w for w in r.warnings), r.warnings


def test_changed_base_depth_or_parametrization_warns(completep_best):
    doc = load_summary(completep_best)
    r = transfer(doc, width=256, depth=16, overrides=["model.base_depth=4"])
    assert any("proxy base depth 2 but target model.base_depth=4" in w for w in r.warnings)
    r = transfer(doc, width=256, overrides=["model.depth_parametrization=none"])
    assert any("model.depth_parametrization=completep but target none" in w for w in r.warnings)
    assert any("model.depth=2 but target" not in w for w in r.warnings)


def test_study_of_another_depth_parametrization_is_refused(none_dir):
    """The none study's storage, asked to continue under completep: its trials would mix."""
    again = run_cli("tune", *PROXY, "model.depth_parametrization=completep",
                    f"sweep.out_dir={none_dir}")
    assert_one_line_error(again, "depth_parametrization", "use another --study name")


# --------------------------------------------------------------------------------------------
# validate --depths
# --------------------------------------------------------------------------------------------

GRID = ["model=dit-tiny", "train.steps=4", "train.eval_every=4", "train.val_size=32",
        "--log2-lr=-10:-8", "--json"]


def test_validate_depths_writes_figure_and_table(tmp_path):
    proc = run_cli("validate", *GRID, f"sweep.out_dir={tmp_path}", "--depths", "2,4",
                   "--seeds", "0,1", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert (tmp_path / "validate_depth.png").stat().st_size > 10_000
    md = (tmp_path / "validate_depth.md").read_text()
    assert "deeper is better" in md and "base depth 2" in md
    for par in ("none", "completep"):
        v = doc[par]
        assert [(b["width"], b["depth"]) for b in v["best"]] == [(64, 2), (64, 4)]
        assert all(b["seeds"] == 2 and -10 <= b["fit_log2_lr"] <= -8 for b in v["best"])
    # at the base depth completep is today's muP: the same losses, to the last bit
    assert doc["none"]["best"][0]["loss_at_best"] == doc["completep"]["best"][0]["loss_at_best"]
    assert doc["none"]["best"][1]["loss_at_best"] != doc["completep"]["best"][1]["loss_at_best"]


def test_validate_joint_width_and_depth(tmp_path):
    proc = run_cli("validate", *GRID, f"sweep.out_dir={tmp_path}", "--widths", "32,64",
                   "--depths", "2,4", "--depth-parametrizations", "completep", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"completep", "figure"} and "none" not in doc
    assert [(b["width"], b["depth"]) for b in doc["completep"]["best"]] == [(32, 2), (64, 4)]


@pytest.mark.parametrize(("args", "needle"), [
    (["--widths", "32", "--depths", "2,4"], "one width per depth"),
    (["--depths", "2,4", "--depth-parametrizations", "deep"], "--depth-parametrizations"),
])
def test_validate_depths_bad_input(tmp_path, args, needle):
    assert_one_line_error(run_cli("validate", *GRID[:-1], f"sweep.out_dir={tmp_path}", *args),
                          needle)


def test_validate_depths_refuses_before_training(tmp_path):
    cfg = compose(["model=dit-tiny", f"sweep.out_dir={tmp_path}"])
    with pytest.raises(UserError, match="increasing depths"):
        validate(cfg, [64, 64], [-10, -9, -8], [0], depths=[4, 2])
    with pytest.raises(UserError, match="not muP"):
        validate(compose(["model.parametrization=sp"]), [64, 64], [-10, -9, -8], [0], depths=[2, 4])
    assert not list(tmp_path.iterdir())  # nothing was trained or written
