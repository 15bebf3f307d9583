"""Your own model: a DiT file outside the repository (examples/dit_plain.py, copied to a
temporary folder), found by path, sized by model.args, converted to muP by mupsweep itself,
coordinate-checked (muP passes, SP fails), refused by name when it cannot be used, and taken
through coord-check -> tune --workers 2 -> transfer -> train --nproc-per-node 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mupsweep.config import compose
from mupsweep.coordcheck import coord_check, gate
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.parametrize import build_model, data_spec_of, describe_parameters, make_optimizer
from mupsweep.train import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QUIET = ["train.progress=false", "train.samples=0"]
SMALL_CHECK = ["coord.widths=[32,64,128,256]", "coord.seeds=2", "coord.steps=3", "coord.batch_size=16"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    """A folder outside the repository holding the example model files and the preset."""
    for name in ("dit_plain.py", "dit_inline_attention.py"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    shutil.copytree(EXAMPLES / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mupsweep.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ})


def one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_roles_lrs_and_attention_are_derived_from_base_shapes(user_dir):
    cfg = compose(["model=my-dit", "model.width=128"])
    model = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    rows = {r["name"]: r for r in describe_parameters(model, cfg.model, make_optimizer(model, cfg.model, cfg.optim))}
    m = 128 / 32
    assert rows["inner.blocks.0.attn.qkv.weight"]["role"] == "hidden"
    assert rows["inner.blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(1 / m)
    assert rows["inner.blocks.0.attn.qkv.weight"]["init_std"] == pytest.approx(1 / 128**0.5)
    assert rows["inner.x_embedder.proj.weight"]["role"] == "input"
    assert rows["inner.y_embedder.embedding_table.weight"]["init_std"] == pytest.approx(1.0)
    readout = rows["inner.final_layer.linear.weight"]
    assert readout["role"] == "output" and readout["lr_mult"] == 1.0 and readout["init_std"] == 0.0
    assert model.inner.final_layer.linear.mup_multipliers.tolist() == [1.0, m]
    assert model.attention_scale == (1.0, 16) and model.head_dims == [16]  # heads grow, head dim fixed
    assert sum(1 for r in rows.values() if r["role"] == "hidden") == 4 * 5 + 2  # per block 5, t-MLP, final adaLN


def test_head_dim_growing_gets_mups_one_over_d(user_dir):
    """num_heads fixed: the head dim grows with width, and every SDPA call gets
    sqrt(base head dim) / head dim instead of the model's own 1/sqrt(head dim)."""
    cfg = compose(["model=my-dit", "model.width=128", "model.args.num_heads=2"])
    model = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    assert model.attention_scale == (1.0, 16) and model.head_dims == [64]
    from mupsweep.models.automup import AttentionScale

    q, k, v = torch.randn(3, 1, 2, 4, 64)
    with AttentionScale(1.0, 16):
        converted = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    mup_scaled = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=16**0.5 / 64)
    own = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(converted, mup_scaled) and not torch.allclose(converted, own)


def test_trained_weights_load_into_the_users_own_class(user_dir):
    cfg = compose(["model=my-dit", "model.output_mult=2.0", "train.steps=3", "train.eval_every=3",
                   f"train.run_dir={user_dir}/run", *QUIET])
    result = train(cfg)
    assert result.own_format == f"{user_dir}/run/model.pt"
    sys.path.insert(0, str(user_dir))
    try:
        from dit_plain import DiT
    finally:
        sys.path.remove(str(user_dir))
    mine = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
               class_dropout_prob=0.1, num_classes=10, learn_sigma=False).eval()
    mine.load_state_dict(torch.load(f"{user_dir}/run/model.pt", weights_only=True))
    trained = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    trained.load_state_dict(torch.load(f"{user_dir}/run/last.pt", weights_only=True)["model"])
    trained.eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        assert torch.allclose(mine(x, t, y), trained(x, t, {"y": y}), atol=1e-6)
        assert mine(x, t, y).abs().max() > 0  # the readout moved off its zero init


@pytest.mark.parametrize("parametrization,passes", [("mup", True), ("sp", False)])
def test_coord_check_of_the_converted_model(user_dir, parametrization, passes):
    result = coord_check(compose(["model=my-dit", f"model.parametrization={parametrization}",
                                  *SMALL_CHECK]), plot=False)
    assert result.passed is passes, (result.max_abs_slope, result.worst)
    if not passes:  # SP's readout grows about x2 per doubling
        assert result.max_abs_slope > 0.6


@pytest.mark.parametrize("overrides,needle", [
    (["model.arch=nowhere.py:DiT"], "no file nowhere.py"),
    (["model.arch=dit_plain.py:DiTT"], "has no class 'DiTT'"),
    (["model.arch=no_such_pkg.models:DiT"], "no module 'no_such_pkg'"),
    (["+model.args.widht=3"], "cannot take model.args"),
    (["model.args.hidden_size=${model.widht}"], "model.args"),
    (["model.arch=dit", "+model.args.x=1"], "model.args is for your own model class"),
    (["model.arch=dit_plain.py:TimestepEmbedder"], "forward(t) is none that mupsweep can call"),
])
def test_a_bad_model_is_one_line(user_dir, overrides, needle):
    one_line(cli(user_dir, "inspect", "model=my-dit", *overrides), 2, needle)


def test_completep_is_refused_for_a_users_model(user_dir):
    with pytest.raises(UserError, match="cannot find and scale the residual branches"):
        cfg = compose(["model=my-dit", "model.depth_parametrization=completep"])
        build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))


def test_tune_refuses_inline_attention_before_any_trial(user_dir):
    """Attention written inline keeps its own 1/sqrt(d) (muP needs 1/d once the head dim grows,
    and attn_mult cannot reach it): found on meta tensors, tune refuses (exit 1) naming the
    modules, before any training. The same model through SDPA passes the gate."""
    proc = cli(user_dir, "tune", "model=my-dit", "model.arch=dit_inline_attention.py:DiT",
               "model.args.num_heads=1", "sweep.n_trials=2", f"sweep.out_dir={user_dir}/sweep", *QUIET)
    line = one_line(proc, 1, "cannot be converted to muP", "attention computed inline",
                    "blocks.0.attn", "scaled_dot_product_attention")
    assert "Nothing was spent on tune" in line
    assert not (user_dir / "sweep").exists()  # no study, no trial
    plain = compose(["model=my-dit", "model.args.num_heads=2", *SMALL_CHECK])
    assert gate(plain, "tune").passed


def test_own_file_through_the_whole_pipeline(user_dir):
    """coord-check -> tune --workers 2 -> transfer -> train --nproc-per-node 2, the model file
    outside the repository and no change to mupsweep."""
    out = user_dir
    check = cli(out, "coord-check", "model=my-dit", *SMALL_CHECK, f"coord.out_dir={out}/cc", "--json")
    assert check.returncode == 0, check.stderr[-2000:]
    assert [r["passed"] for r in json.loads(check.stdout)] == [True]
    tune = cli(out, "tune", "model=my-dit", *SMALL_CHECK, "sweep.n_trials=2", "sweep.sampler=random",
               "sweep.pruner=none", "sweep.proxy_widths=[32,64]", f"sweep.out_dir={out}/sweep",
               "train.steps=4", "train.eval_every=4", "train.val_size=32", "train.batch_size=16",
               *QUIET, "--workers", "2", "--json")
    assert tune.returncode == 0, tune.stderr[-2000:]
    best = json.loads(tune.stdout)
    assert best["cost"]["n_complete"] == 2
    moved = cli(out, "transfer", f"{out}/sweep/best.json", "--width", "128", "--steps", "3",
                "-o", f"{out}/target.yaml")
    assert moved.returncode == 0, moved.stderr[-2000:]
    run = cli(out, "train", "--config", f"{out}/target.yaml", "--nproc-per-node", "2",
              f"train.run_dir={out}/target", *QUIET, "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["steps"] == 3 and result["own_format"].endswith("model.pt")
    written = (out / "target.yaml").read_text()
    assert "arch: dit_plain.py:DiT" in written and "${model.heads}" in written  # args stay symbolic


def test_an_installed_package_names_its_model_by_entry_point(user_dir, monkeypatch):
    """A package that declares its class in the entry point group `mupsweep.models` (here a
    real distribution on PYTHONPATH: its dist-info's entry_points.txt) is found by that name
    in the command, in spawned tune workers and in torchrun's ranks."""
    site = user_dir / "site"
    (site / "my_dits").mkdir(parents=True)
    shutil.copy(EXAMPLES / "dit_plain.py", site / "my_dits" / "__init__.py")
    info = site / "my_dits-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-dits\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mupsweep.models]\nplain-dit = my_dits:DiT\n")
    preset = (user_dir / "configs" / "model" / "my-dit.yaml").read_text()
    (user_dir / "configs" / "model" / "installed-dit.yaml").write_text(
        preset.replace("arch: dit_plain.py:DiT", "arch: plain-dit"))
    (user_dir / "dit_plain.py").unlink()  # only the installed package has the class now
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    tune = cli(user_dir, "tune", "model=installed-dit", *SMALL_CHECK, "sweep.n_trials=2",
               "sweep.sampler=random", "sweep.pruner=none", "sweep.proxy_widths=[32]",
               f"sweep.out_dir={user_dir}/sweep", "train.steps=2", "train.eval_every=2",
               "train.val_size=32", "train.batch_size=16", *QUIET, "--workers", "2", "--json")
    assert tune.returncode == 0, tune.stderr[-2000:]
    assert json.loads(tune.stdout)["cost"]["n_complete"] == 2
    run = cli(user_dir, "train", "model=installed-dit", "train.steps=2", "train.batch_size=16",
              "train.val_size=32", f"train.run_dir={user_dir}/run", *QUIET,
              "--nproc-per-node", "2", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["steps"] == 2
