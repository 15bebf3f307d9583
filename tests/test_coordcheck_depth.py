"""The depth coordinate check (`coord-check --depths`): CompleteP passes and today's muP
(depth_parametrization=none) fails, at one tolerance, for DiT and for a text model (PixArt-α),
on real digits at depths 2..16."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, run_cli

from mupsweep.config import compose
from mupsweep.coordcheck import coord_check

DEPTHS = [2, 4, 8, 16]
# What `coord-check --depths 2,4,8,16` runs by default: width 64 (m_N = 2), 3 seeds, 4 steps.
# (At the base width 32 with 2 seeds completep's t_embedder grew with depth by step 4, slope
# 0.31: with m_N = 1 the coord lr 1e-2 moves the D -> D timestep layer fast. Not loosened.)
SMALL: list[str] = []


def _both(model: str, out) -> dict:
    return {par: coord_check(compose([f"model={model}", *SMALL, f"model.depth_parametrization={par}"]),
                             out_dir=str(out), depths=DEPTHS)
            for par in ("none", "completep")}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return _both("dit-tiny", tmp_path_factory.mktemp("coord-depth-dit"))


@pytest.fixture(scope="module")
def pixart(tmp_path_factory, request):
    mp = pytest.MonkeyPatch()  # captions are encoded into this session's cache, never ~/.cache
    mp.setenv("MUPSWEEP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "text-cache"))
    request.addfinalizer(mp.undo)
    return _both("pixart-tiny", tmp_path_factory.mktemp("coord-depth-pixart"))


def _slope(r, module: str, step: int) -> float:
    s = r.slopes
    return s[(s["module"] == module) & (s["step"] == step)]["slope"].item()


def test_dit_completep_passes_across_depth(dit):
    r = dit["completep"]
    assert r.passed and r.axis == "depth", r.slopes
    assert set(r.table["depth"]) == set(DEPTHS)
    # only modules every depth has; the stream and its per-step update are measured
    assert {"x_embedder", "blocks.1.mlp", "final_layer", "output", "stream",
            "stream_update"} <= set(r.table["module"])
    assert "blocks.2.attn" not in set(r.table["module"])
    assert abs(_slope(r, "stream_update", 2)) < 0.3
    assert abs(_slope(r, "stream", 1)) < 0.3
    assert r.plot_path.endswith("coord_depth_completep.png")


def test_dit_none_fails_across_depth(dit):
    r = dit["none"]
    assert not r.passed
    # at init each block adds to the stream: it grows ~ sqrt(depth)
    assert _slope(r, "stream", 1) > 0.35
    # every block's update adds to the stream's: ~ x2 per doubling of depth
    assert _slope(r, "stream_update", 2) > 0.6
    assert r.max_abs_slope > 2 * dit["completep"].max_abs_slope


def test_pixart_completep_passes_across_depth(pixart):
    r = pixart["completep"]
    assert r.passed, r.slopes
    assert {"blocks.1.cross_attn", "t_block", "stream_update"} <= set(r.table["module"])
    assert abs(_slope(r, "stream_update", 2)) < 0.3


def test_pixart_none_fails_across_depth(pixart):
    r = pixart["none"]
    assert not r.passed
    assert _slope(r, "stream_update", 2) > 0.6
    assert r.max_abs_slope > 2 * pixart["completep"].max_abs_slope


def test_cli_depth_check_exit_code_and_both(tmp_path):
    """The verdict (exit code) is the requested parametrization's; --both runs the other."""
    proc = run_cli("coord-check", "--depths", "2,8", "--both", "--json", "model.width=32",
                   "coord.seeds=1", f"coord.out_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr  # none was asked for, and fails
    none, completep = json.loads(proc.stdout)
    assert (none["parametrization"], none["axis"], none["passed"]) == ("none", "depth", False)
    assert (completep["parametrization"], completep["passed"]) == ("completep", True)
    assert "coordinate check [none]: slope of log2 mean|act| vs log2 depth" in " ".join(proc.stderr.split())
    assert (tmp_path / "coord_depth_none.png").is_file()


def test_cli_bad_depths_are_one_line(tmp_path):
    assert_one_line_error(run_cli("coord-check", "--depths", "2,x"), "--depths", "integers")
    assert_one_line_error(run_cli("coord-check", "--depths", "4,4"), "--depths='4,4' lists a value twice")
