"""CompleteP (model.depth_parametrization=completep): Table 1's depth factors where each block
is built, today's muP exactly at the base depth, refusals, and `inspect`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from mupsweep.config import ModelConfig, OptimConfig, compose
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.models import DataSpec, register
from mupsweep.models.dit import DiT
from mupsweep.parametrize import build_model, describe_blocks, describe_parameters, make_optimizer
from mupsweep.train import train

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)
TEXT = {"text_encoder": "hash", "text_dim": 64, "text_len": 16, "pooled_dim": 64}
ARCHS = {"dit": (4, {}), "pixart": (4, TEXT), "mmdit": (4, TEXT), "uvit": (5, {})}


def _cond(arch: str, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if arch in ("dit", "uvit"):
        return {"y": torch.arange(batch) % 10}
    return {"text": torch.randn(batch, 16, 64, generator=g),
            "mask": torch.ones(batch, 16, dtype=torch.bool),
            "pooled": torch.randn(batch, 64, generator=g)}


def _built(arch: str, **kw) -> tuple[torch.nn.Module, ModelConfig]:
    depth, extra = ARCHS[arch]  # extra: the caption keys of a text model
    cfg = ModelConfig(arch=arch, width=64, depth=kw.pop("depth", depth), **extra, **kw)
    torch.manual_seed(0)
    return build_model(cfg, SPEC), cfg


def _three_steps(model: torch.nn.Module, cfg: ModelConfig, arch: str) -> list[torch.Tensor]:
    """Outputs before and after each of three AdamW steps on a fixed batch."""
    opt = make_optimizer(model, cfg, OptimConfig(lr=1e-2, weight_decay=0.1))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([1, 200, 500, 900])
    target = torch.randn(4, 1, 8, 8, generator=g)
    outs = []
    for _ in range(3):
        y = model(x, t, _cond(arch, 4))
        outs.append(y.detach().clone())
        (y - target).square().mean().backward()
        opt.step()
        opt.zero_grad()
    outs.append(model(x, t, _cond(arch, 4)).detach())
    return outs


@pytest.mark.parametrize("arch", list(ARCHS))
def test_completep_at_base_depth_is_todays_mup_bit_for_bit(arch):
    """The issue's contract: at depth == base_depth the model and its optimizer are exactly
    today's muP model: same weights, same forward, same three AdamW steps, to 0 tolerance."""
    depth = ARCHS[arch][0]
    today, cfg_today = _built(arch)
    cp, cfg_cp = _built(arch, depth_parametrization="completep", base_depth=depth)
    for (name, a), b in zip(today.state_dict().items(), cp.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for step, (a, b) in enumerate(zip(_three_steps(today, cfg_today, arch),
                                      _three_steps(cp, cfg_cp, arch), strict=True)):
        assert torch.equal(a, b), (arch, step)
        assert step == 0 or a.abs().mean() > 0  # zero-init readout: 0 before the first step


def test_completep_at_base_depth_trains_like_today(tmp_path):
    """The same through `train()` on real digits: identical validation history."""
    data = load_dataset(compose([]).data)
    base = ["model=dit-tiny", "model.width=32", "train.steps=4", "train.eval_every=2",
            "train.val_size=32", "train.batch_size=16", "train.progress=false",
            "train.save=false", "train.resume=false", "optim.lr=0.01"]
    today = train(compose([*base, f"train.run_dir={tmp_path}/a"]), dataset=data)
    cp = train(compose([*base, f"train.run_dir={tmp_path}/b",
                        "model.depth_parametrization=completep", "model.base_depth=4"]), dataset=data)
    assert [h["validation_loss"] for h in today.history] == [h["validation_loss"] for h in cp.history]
    assert cp.validation_loss < cp.initial_validation_loss


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_table1_factors_per_parameter(alpha):
    """Depth 8 on base 2 (m_L = 4), width 128 on base 32 (m_N = 4): residual x 4^-alpha,
    lr x 4^(alpha-1) and eps x 4^-alpha inside blocks, on top of muP's width factors; weight
    decay keeps muP's x m_N only; nothing outside the blocks changes."""
    lr, eps, wd = 1e-3, 1e-8, 0.1
    cfg = ModelConfig(width=128, depth=8, depth_parametrization="completep", base_depth=2,
                      depth_alpha=alpha)
    model = build_model(cfg, SPEC)
    opt = make_optimizer(model, cfg, OptimConfig(lr=lr, eps=eps, weight_decay=wd))
    assert [b["residual_mult"] for b in describe_blocks(model)] == [4.0**-alpha] * 8
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for row in describe_parameters(model, cfg, opt):
        in_block = row["name"].startswith("blocks.")
        assert row["residual_block"] == in_block, row
        width = 1 / 4 if row["role"] == "hidden" else 1.0
        depth_lr = 4.0 ** (alpha - 1) if in_block else 1.0
        assert row["lr"] == pytest.approx(lr * width * depth_lr), row
        assert row["depth_lr_mult"] == pytest.approx(depth_lr), row
        assert row["eps"] == pytest.approx(eps * (4.0**-alpha if in_block else 1.0)), row
        assert row["residual_mult"] == (4.0**-alpha if in_block else None), row
        want_wd = wd * 4 if row["role"] == "hidden" else wd
        assert wd_of[id(params[row["name"]])] == pytest.approx(want_wd), row


def test_every_block_parameter_is_tagged_and_nothing_else():
    """PixArt: self/cross-attention, MLP and the per-block table are in blocks; t_block,
    caption projection and final layer are not. U-ViT: the long skips are not. MMDiT: both
    streams are, the last block's pre-only caption stream too."""
    rows = {a: describe_parameters(m, c, make_optimizer(m, c, OptimConfig()))
            for a, (m, c) in ((a, _built(a, depth_parametrization="completep", base_depth=2))
                              for a in ("pixart", "uvit", "mmdit"))}
    tagged = {a: {r["name"] for r in rs if r["residual_block"]} for a, rs in rows.items()}
    assert "blocks.0.scale_shift_table" in tagged["pixart"]
    assert "blocks.3.cross_attn.kv_linear.weight" in tagged["pixart"]
    assert not {n for n in tagged["pixart"] if not n.startswith("blocks.")}
    assert "out_blocks.1.norm1.weight" in tagged["uvit"]
    assert not {n for n in tagged["uvit"] if "skip_linear" in n}
    assert not {n for n in tagged["uvit"] if not n.startswith(("in_blocks", "mid_block", "out_blocks"))}
    assert "joint_blocks.3.context_block.qkv.weight" in tagged["mmdit"]
    assert "joint_blocks.3.x_block.ln_q" in tagged["mmdit"]
    assert not {n for n in tagged["mmdit"] if not n.startswith("joint_blocks.")}


def test_inspect_shows_depth_factors():
    proc = run_cli("inspect", "model.depth=8", "model.depth_parametrization=completep",
                   "model.base_depth=2", "model.depth_alpha=0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    qkv = rows["blocks.7.attn.qkv.weight"]
    assert (qkv["residual_mult"], qkv["depth_lr_mult"], qkv["eps"]) == (0.5, 0.5, 5e-09)
    assert rows["final_layer.linear.weight"]["residual_mult"] is None
    assert "8 residual blocks, each branch added x 0.5" in " ".join(proc.stderr.split())


class _IgnoresDepth(DiT):
    """A model whose blocks never learn their multiplier: completep must refuse it."""

    def __init__(self, image_size, in_channels, num_classes, width, depth, head_dim,
                 residual_mult=1.0):  # taken, never passed on: branches added x 1 at any depth
        super().__init__(image_size, in_channels, num_classes, width, depth, head_dim)


register("test-ignores-depth", _IgnoresDepth)


def test_model_without_completep_is_refused():
    cfg = ModelConfig(arch="test-ignores-depth", depth=8, depth_parametrization="completep",
                      base_depth=2)
    with pytest.raises(UserError, match="does not implement model.depth_parametrization=completep"):
        build_model(cfg, SPEC)
    build_model(dataclasses.replace(cfg, depth=2), SPEC)  # m_L = 1: nothing to scale


@pytest.mark.parametrize(("override", "needle"), [
    ("model.parametrization=sp", "completep needs model.parametrization=mup"),
    ("model.depth_alpha=2", "model.depth_alpha=2.0 must be a number in [0.5, 1]"),
    ("model.base_depth=0", "model.base_depth=0 must be an integer >= 1"),
])
def test_bad_depth_config_is_one_line(override, needle):
    proc = run_cli("train", "model.depth_parametrization=completep", override)
    assert_one_line_error(proc, needle)


def test_unknown_depth_parametrization_is_one_line():
    assert_one_line_error(run_cli("inspect", "model.depth_parametrization=deep"),
                          "model.depth_parametrization='deep': use none or completep")
