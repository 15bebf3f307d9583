"""muP roles, inits and optimizer groups of DiT against docs/design.md section 3."""

from __future__ import annotations

import re

import pytest
import torch

from mupsweep.config import ModelConfig, OptimConfig, compose
from mupsweep.group_setup import make_ema
from mupsweep.models import DataSpec
from mupsweep.models.layers import input_linear
from mupsweep.parametrize import build_model, check_roles, describe_parameters, make_optimizer
from mupsweep.vendor.mup import MuReadout

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)

# docs/design.md section 3, written out for DiT's parameter names.
EXPECTED_ROLES = [
    (r"x_embedder\.proj\.weight", "input"),
    (r"t_embedder\.mlp\.0\.weight", "input"),
    (r"y_embedder\.embedding_table\.weight", "input"),
    (r"t_embedder\.mlp\.2\.weight", "hidden"),
    (r"blocks\.\d+\.attn\.(qkv|proj)\.weight", "hidden"),
    (r"blocks\.\d+\.mlp\.fc[12]\.weight", "hidden"),
    (r"blocks\.\d+\.adaLN_modulation\.1\.weight", "hidden"),
    (r"final_layer\.adaLN_modulation\.1\.weight", "hidden"),
    (r"final_layer\.linear\.weight", "output"),
    (r".*\.bias", "vector"),
]


def expected_role(name: str) -> str:
    for pattern, role in EXPECTED_ROLES:
        if re.fullmatch(pattern, name):
            return role
    raise AssertionError(f"no expected role for {name}")


def _model(par: str, width: int = 128, **kw) -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(width=width, base_width=32, parametrization=par, **kw)
    torch.manual_seed(0)
    return build_model(cfg, SPEC), cfg


def test_every_dit_parameter_has_the_design_role():
    model, cfg = _model("mup")
    rows = describe_parameters(model, cfg, make_optimizer(model, cfg, OptimConfig()))
    assert len(rows) == len(list(model.parameters()))
    for row in rows:
        assert row["role"] == expected_role(row["name"]), row


def test_role_check_catches_a_mistagged_layer():
    """The tag and mup's base shapes must agree; a hidden layer built as input is caught."""
    model, _ = _model("mup")
    bad = input_linear(128, 128)  # D -> D is hidden, not input
    model.blocks[0].attn.proj.weight.mup_spec = bad.weight.mup_spec
    with pytest.raises(RuntimeError, match="blocks.0.attn.proj.weight"):
        check_roles(model)


def test_mup_lr_per_role_and_width():
    lr = 1e-3
    model, cfg = _model("mup", width=128)  # m = 128 / 32 = 4
    rows = describe_parameters(model, cfg, make_optimizer(model, cfg, OptimConfig(lr=lr)))
    for row in rows:
        want = lr / 4 if row["role"] == "hidden" else lr
        assert row["lr"] == pytest.approx(want), row


def test_mup_init_stds_are_measured_as_designed():
    model, cfg = _model("mup", width=256, init_mult=2.0)
    p = dict(model.named_parameters())
    # hidden: init_mult / sqrt(fan_in)
    assert p["blocks.0.mlp.fc1.weight"].std().item() == pytest.approx(2.0 / 256**0.5, rel=0.05)
    assert p["blocks.0.mlp.fc2.weight"].std().item() == pytest.approx(2.0 / 1024**0.5, rel=0.05)
    # adaLN is fan-in initialized under muP, not zero
    assert p["blocks.0.adaLN_modulation.1.weight"].std().item() == pytest.approx(2.0 / 16, rel=0.05)
    # label table N(0, 1) x init_mult; readout zero
    assert p["y_embedder.embedding_table.weight"].std().item() == pytest.approx(2.0, rel=0.15)
    assert p["final_layer.linear.weight"].abs().max().item() == 0.0
    assert isinstance(model.final_layer.linear, MuReadout)


def test_sp_is_original_dit_init():
    model, cfg = _model("sp", width=128)
    p = dict(model.named_parameters())
    assert p["blocks.0.adaLN_modulation.1.weight"].abs().max().item() == 0.0  # adaLN-zero
    assert p["y_embedder.embedding_table.weight"].std().item() == pytest.approx(0.02, rel=0.15)
    xavier = (2.0 / (128 + 3 * 128)) ** 0.5
    assert p["blocks.0.attn.qkv.weight"].std().item() == pytest.approx(xavier, rel=0.05)
    opt = make_optimizer(model, cfg, OptimConfig(lr=1e-3))
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1


def test_mup_and_sp_at_base_width_differ_only_in_init_and_groups():
    mup_model, mup_cfg = _model("mup", width=32)
    sp_model, sp_cfg = _model("sp", width=32)
    assert [(n, p.shape) for n, p in mup_model.named_parameters()] == \
        [(n, p.shape) for n, p in sp_model.named_parameters()]
    # at the base width every muP multiplier is 1: same lr for every parameter
    rows = describe_parameters(mup_model, mup_cfg, make_optimizer(mup_model, mup_cfg, OptimConfig()))
    assert {r["lr_mult"] for r in rows} == {1.0}
    # the same weights give the same output in both (MuReadout / 1 = Linear)
    sp_model.load_state_dict(mup_model.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    torch.nn.init.normal_(mup_model.final_layer.linear.weight)
    sp_model.final_layer.linear.weight.data.copy_(mup_model.final_layer.linear.weight)
    torch.testing.assert_close(mup_model(x, t, {"y": y}), sp_model(x, t, {"y": y}))


def test_mup_readout_divides_by_width_mult():
    model, _ = _model("mup", width=128, output_mult=3.0)
    ro = model.final_layer.linear
    assert ro.width_mult() == 4.0 and ro.output_mult == 3.0
    torch.nn.init.normal_(ro.weight)
    x = torch.randn(5, 128)
    torch.testing.assert_close(ro(x), torch.nn.functional.linear(x * 3.0 / 4.0, ro.weight, ro.bias))


def test_ema_keeps_infshape_and_readout_runs():
    cfg = compose(["model.width=64"])
    torch.manual_seed(0)
    model = build_model(cfg.model, SPEC)
    ema = make_ema(model, cfg.model, SPEC, torch.device("cpu"))
    for (name, p), e in zip(model.named_parameters(), ema.parameters(), strict=True):
        assert hasattr(e, "infshape"), name
        assert e.infshape.width_mult() == p.infshape.width_mult()
        torch.testing.assert_close(e, p)
    out = ema(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), {"y": torch.tensor([0, 1])})
    assert out.shape == (2, 1, 8, 8)
    assert ema.final_layer.linear.width_mult() == 2.0


def test_a_proxy_narrower_than_its_base_shapes_gets_the_mup_multipliers():
    """The paper tunes DiT-XL/2 on width 144 with base shapes at 288 (4 heads of 72): a model
    narrower than its base has width multiplier m = 1/2, so hidden layers train at lr / m =
    2 lr and the readout multiplies by 1 / m = 2."""
    cfg = ModelConfig(width=32, base_width=64, parametrization="mup")
    torch.manual_seed(0)
    model = build_model(cfg, SPEC)
    rows = {r["name"]: r for r in describe_parameters(model, cfg, make_optimizer(model, cfg, OptimConfig()))}
    assert rows["blocks.0.attn.qkv.weight"]["lr_mult"] == pytest.approx(2.0)
    assert rows["final_layer.linear.weight"]["width_mult"] == pytest.approx(0.5)
    assert rows["x_embedder.proj.weight"]["lr_mult"] == pytest.approx(1.0)
