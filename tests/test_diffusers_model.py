"""diffusers' DiTTransformer2DModel as a model (model=diffusers-dit): built from config at every
width and depth, converted to muP by mupsweep (coordinate check: muP passes, SP fails), trained,
saved in diffusers' save_pretrained layout and loaded back by diffusers alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mupsweep.config import compose
from mupsweep.coordcheck import coord_check
from mupsweep.data import load_dataset
from mupsweep.parametrize import (
    build_model,
    data_spec_of,
    describe_parameters,
    make_conditioner,
    make_optimizer,
)
from mupsweep.train import train

diffusers = pytest.importorskip("diffusers")  # the .[diffusers] extra (in .[dev])

QUIET = ["train.progress=false", "train.samples=0"]
CHECK = ["coord.widths=[32,64,128,256]", "coord.seeds=2", "coord.steps=3", "coord.batch_size=16"]


def test_roles_of_diffusers_dit():
    cfg = compose(["model=diffusers-dit", "model.width=128"])
    model = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    assert isinstance(model.inner, diffusers.DiTTransformer2DModel)
    rows = {r["name"]: r for r in describe_parameters(model, cfg.model, make_optimizer(model, cfg.model, cfg.optim))}
    assert [n for n, r in rows.items() if r["role"] == "output"] == ["inner.proj_out_2.weight"]
    assert rows["inner.transformer_blocks.0.attn1.to_q.weight"]["lr_mult"] == pytest.approx(32 / 128)
    assert rows["inner.pos_embed.proj.weight"]["role"] == "input"
    assert model.attention_scale == (1.0, 16) and model.inline_attention == []
    assert len(model.tracked_modules()) == cfg.model.depth + 1  # every block and the readout


@pytest.mark.parametrize("preset", ["diffusers-dit", "diffusers-pixart", "diffusers-sd3"])
@pytest.mark.parametrize("parametrization,passes", [("mup", True), ("sp", False)])
def test_coord_check_of_diffusers_transformers(preset, parametrization, passes):
    """Measured: muP 0.18 / 0.08 / 0.05, SP 1.11 / 0.87 / 1.00 (DiT / PixArt / SD3)."""
    result = coord_check(compose([f"model={preset}", f"model.parametrization={parametrization}",
                                  *CHECK]), plot=False)
    assert result.passed is passes, (result.max_abs_slope, result.worst)
    if not passes:
        assert result.max_abs_slope > 0.6


def test_trained_model_loads_in_diffusers(tmp_path):
    cfg = compose(["model=diffusers-dit", "model.output_mult=0.5", "train.steps=3",
                   "train.eval_every=3", f"train.run_dir={tmp_path}/run", *QUIET])
    result = train(cfg)
    assert result.own_format == f"{tmp_path}/run/model"
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(f"{tmp_path}/run/model").eval()
    trained = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    trained.load_state_dict(torch.load(f"{tmp_path}/run/last.pt", weights_only=True)["model"])
    trained.eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        theirs = loaded(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
        assert torch.allclose(theirs, trained(x, t, {"y": y}), atol=1e-5)


def test_diffusers_dit_through_tune_transfer_and_two_process_train(tmp_path):
    """tune --workers 2 (the coordinate check first) -> transfer -> train --nproc-per-node 2."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mupsweep.cli", *args], capture_output=True,
                              text=True, timeout=900, cwd=tmp_path, env={**os.environ})

    tune = cli("tune", "model=diffusers-dit", *CHECK, "sweep.n_trials=2", "sweep.sampler=random",
               "sweep.pruner=none", "sweep.proxy_widths=[32,64]", f"sweep.out_dir={tmp_path}/sweep",
               "train.steps=4", "train.eval_every=4", "train.val_size=32", "train.batch_size=16",
               *QUIET, "--workers", "2", "--json")
    assert tune.returncode == 0, tune.stderr[-2000:]
    assert json.loads(tune.stdout)["cost"]["n_complete"] == 2
    moved = cli("transfer", f"{tmp_path}/sweep/best.json", "--width", "128", "--steps", "3",
                "-o", f"{tmp_path}/target.yaml")
    assert moved.returncode == 0, moved.stderr[-2000:]
    run = cli("train", "--config", f"{tmp_path}/target.yaml", "--nproc-per-node", "2",
              f"train.run_dir={tmp_path}/target", *QUIET, "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["steps"] == 3
    assert (tmp_path / "target" / "model" / "config.json").is_file()


@pytest.mark.parametrize("preset,cls", [("diffusers-pixart", "PixArtTransformer2DModel"),
                                        ("diffusers-sd3", "SD3Transformer2DModel")])
def test_text_transformers_take_captions_and_save_for_diffusers(preset, cls, tmp_path):
    cfg = compose([f"model={preset}", "train.steps=2", "train.eval_every=2",
                   f"train.run_dir={tmp_path}/run", *QUIET])
    model = build_model(cfg.model, make_conditioner(cfg, load_dataset(cfg.data)).data_spec)
    assert model.conditioning == "text" and model.inline_attention == []
    result = train(cfg)
    assert result.validation_loss < result.initial_validation_loss
    loaded = getattr(diffusers, cls).from_pretrained(f"{tmp_path}/run/model")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
