"""The coordinate check must pass muP and fail SP, on real digits at widths 32..256."""

from __future__ import annotations

import pytest

from mupsweep.config import compose
from mupsweep.coordcheck import coord_check

WIDTHS = "coord.widths=[32,64,128,256]"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("coord")
    return {par: coord_check(compose([f"model.parametrization={par}", WIDTHS]), out_dir=str(out))
            for par in ("mup", "sp")}


def test_mup_passes_with_every_slope_small(results):
    r = results["mup"]
    assert r.passed, r.slopes
    assert r.max_abs_slope < 0.3
    # every tracked module at every step was measured at every width
    assert set(r.table["width"]) == {32, 64, 128, 256}
    assert {"x_embedder", "blocks.0.attn", "blocks.3.mlp", "blocks.0.adaLN", "final_layer",
            "output"} <= set(r.table["module"])


def test_sp_fails_with_a_growing_output(results):
    r = results["sp"]
    assert not r.passed
    out = r.slopes[(r.slopes["module"] == "output") & (r.slopes["step"] == 2)]["slope"].item()
    assert out > 0.6, out  # SP readout grows ~x2 per doubling after one Adam step
    assert r.max_abs_slope > 2 * results["mup"].max_abs_slope


def test_plot_written(results):
    from pathlib import Path

    assert Path(results["mup"].plot_path).stat().st_size > 10_000
