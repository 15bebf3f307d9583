"""Model construction, muP or SP: build a model for its data, set base shapes, init, optimizer.

A parameter's muP role is decided once, where its layer is built (`models/layers.py` calls
`roles.set_spec`). Everything here reads that tag: `init_weights` (init std), `make_optimizer`
(MuAdamW's per-role lr comes from `p.infshape`, which `check_roles` proves agrees with the
tag), `describe_parameters` (the table `mupsweep inspect` prints) and the tests.

Order, as muP needs it: build -> set_base_shapes -> init -> optimizer (`build_model` does the
first three). What a model is built for comes first: `data_spec_of(dataset)` and, as the model
class says (`conditioning`), the conditioner that fills in a text model's caption sizes.

| role   | muP init std                 | muP Adam lr | SP (original DiT)          |
|--------|------------------------------|-------------|----------------------------|
| input  | init_mult / sqrt(fan_in)     | lr          | xavier / N(0, 0.02)        |
| hidden | init_mult / sqrt(fan_in)     | lr / m      | xavier (adaLN: zero)       |
| output | 0 (MuReadout, x output_mult / m) | lr      | 0                          |
| vector | 0 (bias) / 1 (gain)          | lr          | same                       |

Depth (model.depth_parametrization=completep, `mupsweep.completep`): on top of the table,
every parameter tagged as in a residual block gets Adam lr x m_L^(alpha-1) and eps x
m_L^-alpha (Table 1 of Dey et al. 2025); init and weight decay have no depth factor.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import nn

from mupsweep.completep import depth_scale
from mupsweep.conditioning import LabelConditioner, TextConditioner, text_conditioner
from mupsweep.config import Config, ModelConfig, OptimConfig
from mupsweep.data import ImageDataset
from mupsweep.errors import UserError
from mupsweep.models import DataSpec
from mupsweep.models.automup import make_readouts, probe, set_readout_multipliers, tag_roles
from mupsweep.models.layers import Readout, attention_scale
from mupsweep.models.user import (
    Sizes,
    UserModel,
    construct,
    find_model_class,
    forward_of,
    is_user_arch,
    load_user_class,
    resolve_args,
)
from mupsweep.roles import ParamSpec, Role, get_spec
from mupsweep.text_settings import text_dims, text_settings
from mupsweep.vendor.mup import MuAdamW, MuReadout, set_base_shapes

# --------------------------------------------------------------------------------------------
# What a model is built for: its data's shapes and its conditioning
# --------------------------------------------------------------------------------------------


def data_spec_of(dataset: ImageDataset) -> DataSpec:
    """The shapes a model needs from `dataset`; caption sizes are the
    conditioner's to fill in (`make_conditioner(...).data_spec`)."""
    return DataSpec(image_size=dataset.image_size, channels=dataset.channels,
                    num_classes=dataset.num_classes)


def conditioning_of(arch: str) -> str:
    """"label" or "text": what the model class of `arch` is conditioned on."""
    if is_user_arch(arch):  # read off its forward's parameters (models/user.FORWARDS)
        return forward_of(load_user_class(arch), arch).conditioning
    return getattr(find_model_class(arch), "conditioning", "label")


def make_conditioner(cfg: Config, dataset: ImageDataset) -> LabelConditioner | TextConditioner:
    """The conditioner for cfg.model's architecture on `dataset`; its `data_spec` is the one
    to build the model with."""
    spec = data_spec_of(dataset)
    if conditioning_of(cfg.model.arch) == "text":
        return text_conditioner(cfg.model, cfg.data, dataset, spec)
    return LabelConditioner(spec)


# --------------------------------------------------------------------------------------------
# Base shapes and role check
# --------------------------------------------------------------------------------------------


def infer_role(module_is_readout: bool, param: nn.Parameter) -> Role:
    """The role mup's base shapes imply (ninf = number of dims that grow with width)."""
    if param.ndim == 1:
        return Role.VECTOR
    if module_is_readout:
        return Role.OUTPUT
    ninf = param.infshape.ninf()
    if ninf == 2:
        return Role.HIDDEN
    if ninf == 1:
        return Role.INPUT
    return Role.VECTOR  # nothing grows with width: behaves like a scalar/vector param


def check_roles(model: nn.Module) -> None:
    """Fail loudly if a layer's tagged role disagrees with what its base shapes imply."""
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            tagged = get_spec(name, p).role
            implied = infer_role(isinstance(module, MuReadout) and p_name == "weight", p)
            if tagged != implied:
                raise RuntimeError(
                    f"{name}: tagged {tagged.value} but its base shapes make it {implied.value} "
                    f"(shape {tuple(p.shape)}); fix the helper used to build this layer"
                )


def resolve(cfg: ModelConfig) -> ModelConfig:
    """Fill config defaults that depend on the parametrization."""
    if cfg.adaln_zero is None:
        cfg = dataclasses.replace(cfg, adaln_zero=cfg.parametrization == "sp")
    return cfg


def build_model(cfg: ModelConfig, data_spec: DataSpec, device: torch.device | str = "cpu") -> nn.Module:
    """Build, set base shapes, initialize. The only way models are made in mupsweep."""
    cfg = resolve(cfg)
    model = construct_at(cfg, data_spec, cfg.width, cfg.depth, device)
    attach_base_shapes(model, cfg, data_spec)
    check_residual_blocks(model, cfg)
    init_weights(model, cfg)
    if isinstance(model, UserModel):
        set_readout_multipliers(model, cfg.output_mult)
    return model


def construct_at(cfg: ModelConfig, data_spec: DataSpec, width: int, depth: int,
                 device: torch.device | str = "cpu") -> nn.Module:
    """The model class of cfg.arch built at `width` and `depth`, nothing else done: a built-in
    from its config, a user's class from model.args resolved at that size (models/user.py)."""
    if not is_user_arch(cfg.arch):
        cls = find_model_class(cfg.arch)
        args = builtin_args(cls, cfg, data_spec, width, depth)
        if str(device) == "meta":  # no init computed, and torch's global RNG left untouched
            with torch.device("meta"):  # (.to: a buffer made from numpy is on the cpu)
                return cls(**args).to("meta")
        return cls(**args).to(device)
    cls = load_user_class(cfg.arch)
    forward = forward_of(cls, cfg.arch)  # before building: the cheaper mismatch first
    if forward.conditioning == "text" and not data_spec.text_dim:  # built without captions
        settings = text_settings(cfg)  # (inspect, transfer's cost): the sizes model.text_* say
        data_spec = dataclasses.replace(data_spec, text_dim=settings.dim, text_len=settings.length)
    keys = {k: v for k, v in dataclasses.asdict(cfg).items() if not isinstance(v, dict)}
    args = resolve_args(cfg.args, Sizes({**keys, "width": width, "depth": depth}, data_spec))
    with torch.device(device):
        inner = construct(cls, cfg.arch, args)
    return UserModel(inner, forward, data_spec.num_classes).to(device)


def builtin_args(cls: type[nn.Module], cfg: ModelConfig, data_spec: DataSpec, width: int,
                 depth: int) -> dict[str, Any]:
    """The keyword arguments of a built-in class for `cfg` at `width` and `depth`: the sizes,
    the softmax scale of cfg's parametrization, CompleteP's residual multiplier, its
    U-ViT's output conv and a caption model's sizes; each class is given those its
    constructor names. The one place a ModelConfig becomes a model's arguments."""
    known: dict[str, Any] = {
        "image_size": data_spec.image_size, "in_channels": data_spec.channels,
        "num_classes": data_spec.num_classes, "width": width, "depth": depth,
        "head_dim": cfg.head_dim, "patch_size": cfg.patch_size, "mlp_ratio": cfg.mlp_ratio,
        "learn_sigma": cfg.learn_sigma, "base_width": cfg.base_width, "output_conv": cfg.output_conv,
        "attn_scale": attention_scale(cfg.head_dim, cfg.attn_mult, cfg.parametrization),
        "residual_mult": depth_scale(dataclasses.replace(cfg, width=width, depth=depth)).residual_mult,
    }
    if conditioning_of(cfg.arch) == "text":
        text_dim, text_len = text_dims(cfg, data_spec)  # the conditioner's sizes must agree
        known |= {"text_dim": text_dim, "text_len": text_len,
                  "pooled_dim": text_settings(cfg).pooled_dim}
    return {name: known[name] for name in inspect.signature(cls).parameters if name in known}


def probe_inputs(cfg: ModelConfig, data_spec: DataSpec, device: torch.device | str) -> tuple:
    """(x, t, cond, drop) of batch 2 on `device`: what a forward is tried on (captions of the
    sizes model.text_* say, for a caption model)."""
    x = torch.zeros(2, data_spec.channels, data_spec.image_size, data_spec.image_size, device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    cond = {"y": torch.zeros(2, dtype=torch.long, device=device)}
    if conditioning_of(cfg.arch) == "text":
        s = text_settings(cfg)
        cond |= {"text": torch.zeros(2, s.length, s.dim, device=device),
                 "mask": torch.ones(2, s.length, dtype=torch.bool, device=device),
                 "pooled": torch.zeros(2, s.pooled_dim, device=device)}
    return x, t, cond, None


def base_shape_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(base width, delta width) of the muP base shapes; delta defaults to 2 x base."""
    return cfg.base_width, cfg.delta_width or 2 * cfg.base_width


def check_residual_blocks(model: nn.Module, cfg: ModelConfig) -> None:
    """completep needs a model whose blocks take their residual multiplier and tag their
    parameters; a model that does neither would train as plain muP without saying so."""
    if cfg.depth_parametrization == "none":
        return
    if isinstance(model, UserModel):
        raise UserError(f"model.depth_parametrization={cfg.depth_parametrization} with "
                        f"model.arch={cfg.arch}: mupsweep cannot find and scale the residual "
                        "branches of a model it did not write; use depth_parametrization=none "
                        "(width transfer is automatic) or a built-in model")
    tagged = any(get_spec(n, p).residual_block for n, p in model.named_parameters())
    scaled = [m.residual_mult for m in model.modules() if hasattr(m, "residual_mult")]
    want = depth_scale(cfg).residual_mult
    if not tagged or not scaled or any(mult != want for mult in scaled):
        raise UserError(f"model.arch={cfg.arch} does not implement "
                        f"model.depth_parametrization={cfg.depth_parametrization} (its blocks must "
                        "take residual_mult and call roles.mark_residual_block)")


def attach_base_shapes(model: nn.Module, cfg: ModelConfig, data_spec: DataSpec) -> None:
    """muP: base shapes from models at base_width and delta_width (built on the meta device,
    so no memory is spent). SP: every width multiplier is 1 (MuReadout is then a plain Linear
    times output_mult, and MuAdamW would equal AdamW)."""
    if isinstance(model, UserModel):
        return convert_user_model(model, cfg, data_spec)
    if cfg.parametrization == "sp":
        set_base_shapes(model, None, rescale_params=False)
        return
    base, delta = base_and_delta(cfg, data_spec)
    set_base_shapes(model, base, delta=delta, rescale_params=False)
    check_roles(model)


def base_and_delta(cfg: ModelConfig, data_spec: DataSpec) -> tuple[nn.Module, nn.Module]:
    """The model at muP's base and delta widths, on the meta device (no memory spent)."""
    base_width, delta_width = base_shape_widths(cfg)
    return (construct_at(cfg, data_spec, base_width, cfg.depth, "meta"),
            construct_at(cfg, data_spec, delta_width, cfg.depth, "meta"))


def convert_user_model(model: UserModel, cfg: ModelConfig, data_spec: DataSpec) -> None:
    """Automatic muP (models/automup.py): roles from base shapes, readouts scaled, attention
    given muP's scale. Under SP the roles are derived the same way (for `inspect`), then every
    width multiplier is set to 1 and the attention is left as written."""
    base, delta = base_and_delta(cfg, data_spec)
    # no MuReadout in a model written without muP: the readout is found below, not asserted
    set_base_shapes(model, base, delta=delta, rescale_params=False, do_assert=False)
    make_readouts(model, tag_roles(model, cfg.arch))
    if cfg.parametrization == "sp":
        set_base_shapes(model, None, rescale_params=False)
        return
    try:
        seen = probe(base, probe_inputs(cfg, data_spec, "meta"))
    except Exception as e:  # the user's forward: named in one line, as a constructor error is
        raise UserError(f"model.arch={cfg.arch}: its forward failed on meta tensors of batch 2 "
                        f"(mupsweep runs it there to find its attention and count FLOPs): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    model.attention_scale = (cfg.attn_mult, min(seen.attention_head_dims, default=None))
    here = probe(construct_at(cfg, data_spec, cfg.width, cfg.depth, "meta"), probe_inputs(cfg, data_spec, "meta"))
    model.head_dims = sorted(set(here.attention_head_dims))
    model.inline_attention = sorted(set(here.inline_softmax))


# --------------------------------------------------------------------------------------------
# Initialization
# --------------------------------------------------------------------------------------------


def _fan_in(module: nn.Module, param: nn.Parameter) -> int:
    if isinstance(module, nn.Embedding):
        return 1  # a table lookup: each row is one input coordinate
    if param.ndim >= 2:
        return param[0].numel()
    return 1


def init_rule(module: nn.Module, param: nn.Parameter, spec: ParamSpec, cfg: ModelConfig) -> tuple[str, float]:
    """(distribution, std) for one parameter: 'normal' | 'uniform' | 'const' (value in std)."""
    fan_in = _fan_in(module, param)
    if spec.adaln and cfg.adaln_zero:
        return "const", 0.0
    if cfg.parametrization == "mup":
        kind = spec.mup_init
        if kind == "fan_in":  # muP: kaiming fan-in, times the sigma_init HP
            return "normal", cfg.init_mult / math.sqrt(fan_in)
        if kind == "const":
            return "normal", cfg.init_mult * spec.std
    else:
        kind = spec.sp_init
        if kind == "xavier":
            fan_out = param.shape[0]  # conv weights are treated as (out, in*k*k), as DiT does
            return "uniform", cfg.init_mult * math.sqrt(2.0 / (fan_in + fan_out))
        if kind == "normal":
            return "normal", cfg.init_mult * spec.sp_std
        if kind == "fan_in":
            return "normal", cfg.init_mult / math.sqrt(fan_in)
    if kind == "own":  # the constructor's init (a user's model), a weight's scaled by init_mult
        return "scale", cfg.init_mult if param.ndim >= 2 else 1.0
    if kind == "zero":
        return "const", 0.0
    if kind == "one":
        return "const", 1.0
    raise ValueError(f"unknown init kind {kind!r}")


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Initialize every parameter from its tagged spec. Safe to call again, except on a user's
    model under a "own" init with init_mult != 1 (that scales the weights once more)."""
    cfg = resolve(cfg)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            dist, std = init_rule(module, p, get_spec(name, p), cfg)
            if dist == "normal":
                p.normal_(0.0, std)
            elif dist == "uniform":  # std of U(-a, a) is a / sqrt(3)
                p.uniform_(-std * math.sqrt(3.0), std * math.sqrt(3.0))
            elif dist == "scale":  # the model's own init, once: build_model calls this once
                if std != 1.0:
                    p.mul_(std)
            else:
                p.fill_(std)
    for module in model.modules():
        if isinstance(module, Readout):
            module.set_multipliers(cfg.output_mult)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: ModelConfig, optim: OptimConfig) -> torch.optim.Optimizer:
    """muP: MuAdamW (hidden weights get lr / m, decoupled wd x m). SP: plain AdamW.
    completep: the parameters in residual blocks form their own group with CompleteP's depth
    lr and eps (`depth_groups`); MuAdamW then splits every group by width as usual."""
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                  weight_decay=optim.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.parametrization == "mup":
        if cfg.depth_parametrization == "none":
            return MuAdamW(params, **kwargs)
        return MuAdamW(depth_groups(model, cfg, optim), **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def depth_groups(model: nn.Module, cfg: ModelConfig, optim: OptimConfig) -> list[dict]:
    """Two param groups: outside any residual block (the defaults), and inside one (lr x
    m_L^(alpha-1), eps x m_L^-alpha), read from each parameter's tag. Weight decay keeps
    muP's width factor only: torch's AdamW decays by lr x wd, so it follows the depth lr."""
    scale = depth_scale(cfg)
    outside, inside = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (inside if get_spec(name, p).residual_block else outside).append(p)
    groups = [{"params": outside}] if outside else []
    groups.append({"params": inside, "lr": optim.lr * scale.lr_mult,
                   "eps": optim.eps * scale.eps_mult})
    return groups


def describe_blocks(model: nn.Module) -> list[dict]:
    """One row per residual block: its name and the multiplier on its branches."""
    return [{"block": name, "residual_mult": m.residual_mult} for name, m in model.named_modules()
            if hasattr(m, "residual_mult")]


def describe_parameters(model: nn.Module, cfg: ModelConfig, optimizer: torch.optim.Optimizer) -> list[dict]:
    """One row per parameter: role, init std, the lr and eps the optimizer really uses for it,
    and whether it is in a residual block (with CompleteP's depth lr factor, 1 otherwise)."""
    cfg = resolve(cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    eps_of = {id(p): g["eps"] for g in optimizer.param_groups for p in g["params"]}
    base_lr = optimizer.defaults["lr"]
    depth_lr = depth_scale(cfg).lr_mult
    block_mult = {}  # module name -> the residual multiplier of the block it is in
    for mod_name, module in model.named_modules():
        if hasattr(module, "residual_mult"):
            block_mult.update({f"{mod_name}.{n}" if n else mod_name: module.residual_mult
                               for n, _ in module.named_modules()})
    rows = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            spec = get_spec(name, p)
            dist, std = init_rule(module, p, spec, cfg)
            rows.append({
                "name": name,
                "shape": tuple(p.shape),
                "role": spec.role.value,
                "init": {"const": f"={std:g}", "scale": f"own x{std:g}"}.get(dist, dist),
                "init_std": {"const": 0.0, "scale": math.nan}.get(dist, std),
                "lr": lr_of[id(p)],
                "lr_mult": lr_of[id(p)] / base_lr,
                "width_mult": float(p.infshape.width_mult()) if p.infshape.ninf() else 1.0,
                "residual_block": spec.residual_block,
                # the multiplier on the branch this parameter is in (None: not in a branch)
                "residual_mult": block_mult.get(mod_name) if spec.residual_block else None,
                "depth_lr_mult": depth_lr if spec.residual_block else 1.0,
                "eps": eps_of[id(p)],
            })
    return rows


def role_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Role -> index of the optimizer's param group that holds that role's parameters, so a
    role's current lr (after the schedule) is read from its group. Each role has one lr (the
    table above); a role spread over groups of different lrs is a bug, raised here."""
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) not in group_of:
            continue
        role, i = get_spec(name, p).role.value, group_of[id(p)]
        first = out.setdefault(role, i)
        if optimizer.param_groups[first]["lr"] != optimizer.param_groups[i]["lr"]:
            raise RuntimeError(f"{name}: role {role} has two learning rates in the optimizer")
    return {r.value: out[r.value] for r in Role if r.value in out}
