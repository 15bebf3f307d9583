"""Bad input: exit 2 with one clear line, never a traceback."""

from __future__ import annotations

import pytest
from conftest import TINY, assert_one_line_error, run_cli


@pytest.mark.parametrize("override, needle", [
    ("model.no_such_key=1", "no_such_key"),
    ("model.width=70", "model.width=70 is not divisible by model.head_dim=16"),
    ("model.base_width=40", "model.base_width=40 is not divisible by model.head_dim=16"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("model.parametrization=ntk", "model.parametrization"),
    ("model=no-such-preset", "unknown model 'no-such-preset'"),
])
def test_bad_config_is_one_line_exit_2(override, needle):
    assert_one_line_error(run_cli("train", *TINY, override), needle)


def test_missing_data_dir(tmp_path):
    proc = run_cli("train", *TINY, "data=fashion_mnist", f"data.root={tmp_path}/nope")
    assert_one_line_error(proc, f"{tmp_path}/nope")


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"this is not a checkpoint")
    proc = run_cli("train", *TINY, "train.steps=2", f"train.run_dir={tmp_path}", "train.resume=true")
    assert_one_line_error(proc, "corrupt", str(tmp_path / "last.pt"))


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "x.yaml")), "not found")


def test_inspect_lists_roles():
    proc = run_cli("inspect", "model.width=128", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    rows = json.loads(proc.stdout)
    roles = {r["name"]: (r["role"], r["lr_mult"]) for r in rows}
    assert roles["blocks.0.attn.qkv.weight"] == ("hidden", 0.25)
    assert roles["final_layer.linear.weight"] == ("output", 1.0)


def test_coord_check_cli_exit_codes(tmp_path):
    args = ["coord.widths=[32,64,128,256]", f"coord.out_dir={tmp_path}"]
    mup = run_cli("coord-check", *args)
    assert mup.returncode == 0
    assert "coordinate check [mup]" in mup.stderr  # rich must not eat "[mup]" as markup
    sp = run_cli("coord-check", "model.parametrization=sp", *args)
    assert sp.returncode == 1 and "FAIL" in sp.stderr
    assert "coordinate check [sp]" in sp.stderr
