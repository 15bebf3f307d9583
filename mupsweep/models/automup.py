"""Automatic muP for a model written without it (a user's DiT, a diffusers transformer).

What the built-in models say where each layer is built (mupsweep/models/layers.py), this
module derives from two copies of the model built on the meta device at muP's base and delta
widths. mup's `set_base_shapes` marks which dimensions of every parameter grow with width;
from that:

| parameter                                           | role    | muP init              |
|-----------------------------------------------------|---------|-----------------------|
| both dims grow (qkv, proj, MLP, adaLN)              | hidden  | init_mult/sqrt(fan_in) |
| nn.Linear whose fan-in grows and fan-out does not   | output  | 0, input x output_mult / m |
| one dim grows, Linear / Conv / Embedding            | input   | init_mult/sqrt(fan_in) |
| one dim grows, any other parameter                  | input   | the model's own        |
| vectors (biases: 0), nothing grows, frozen          | vector  | the model's own        |

The per-role Adam lr then follows from the base shapes (mup's MuAdamW). Attention: inside the
model's forward every `F.scaled_dot_product_attention` call is given muP's logit scale
`attn_mult * sqrt(base_head_dim) / head_dim` (a TorchFunctionMode sees the call however the
model reached it, and the fused kernels stay). What cannot be converted this way, attention
written inline with a fixed 1/sqrt(d), is named by `probe` and caught by the coordinate check
that `tune` and `validate` run first on such a model (mupsweep/coordcheck.py, `gate`).
Under SP nothing is changed: the model's own init (x init_mult) and plain AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mupsweep.errors import UserError
from mupsweep.roles import ParamSpec, Role, set_spec

SDPA = F.scaled_dot_product_attention
SCALE_ARG = 6  # scale's position in scaled_dot_product_attention(q, k, v, mask, p, causal, scale)


class AttentionScale(TorchFunctionMode):
    """Gives every scaled_dot_product_attention call muP's scale (and records what it saw)."""

    def __init__(self, attn_mult: float, base_head_dim: int | None, seen: Probe | None = None):
        super().__init__()
        self.attn_mult, self.base_head_dim, self.seen = attn_mult, base_head_dim, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is SDPA:
            head_dim = (args[0] if args else kwargs["query"]).shape[-1]
            if self.seen is not None:
                self.seen.attention_head_dims.append(int(head_dim))
            base = self.base_head_dim or head_dim
            scale = self.attn_mult * math.sqrt(base) / head_dim
            if len(args) > SCALE_ARG:
                args = (*args[:SCALE_ARG], scale, *args[SCALE_ARG + 1:])
            else:
                kwargs["scale"] = scale
        elif self.seen is not None and func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            x = args[0]
            if x.ndim >= 3 and x.shape[-1] == x.shape[-2]:  # (.., N, N): attention weights
                self.seen.inline_softmax.append(self.seen.current_module())
        return func(*args, **kwargs)


@dataclass
class Probe:
    """What one forward did: the head dims of its SDPA calls, and the modules that took a
    softmax over an (N, N) score matrix themselves (attention written inline)."""

    attention_head_dims: list[int] = field(default_factory=list)
    inline_softmax: list[str] = field(default_factory=list)
    module_stack: list[str] = field(default_factory=list)

    def current_module(self) -> str:
        return self.module_stack[-1] if self.module_stack else "(model)"


def probe(model: nn.Module, inputs: tuple) -> Probe:
    """Run `model(*inputs)` once (meta tensors: nothing is computed) and record its attention."""
    seen = Probe()
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []
    def enter(module: nn.Module, args: tuple) -> None:
        seen.module_stack.append(names.get(id(module), "?"))

    def leave(module: nn.Module, args: tuple, output) -> None:
        seen.module_stack.pop()

    for module in model.modules():
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), AttentionScale(1.0, None, seen):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


# --------------------------------------------------------------------------------------------
# Roles from base shapes
# --------------------------------------------------------------------------------------------

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def derive_role(module: nn.Module, name: str, param: nn.Parameter) -> ParamSpec:
    """The role and init of one parameter from its base shapes (`param.infshape`)."""
    if not param.requires_grad:
        return ParamSpec(Role.VECTOR, mup_init="own", sp_init="own")
    if param.ndim <= 1:
        init = "zero" if name == "bias" else "own"
        return ParamSpec(Role.VECTOR, mup_init=init, sp_init="own")
    shape = param.infshape
    ninf = shape.ninf()
    if ninf == 2:
        return ParamSpec(Role.HIDDEN, mup_init="fan_in", sp_init="own")
    if ninf == 1 and is_readout(module, name, param):
        return ParamSpec(Role.OUTPUT, mup_init="zero", sp_init="own")
    if ninf >= 1:
        init = "fan_in" if isinstance(module, WEIGHTED) else "own"
        return ParamSpec(Role.INPUT, mup_init=init, sp_init="own")
    return ParamSpec(Role.VECTOR, mup_init="own", sp_init="own")


def is_readout(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """An nn.Linear weight whose fan-in grows with width and whose fan-out does not."""
    return (isinstance(module, nn.Linear) and name == "weight"
            and param.infshape[1].isinf() and not param.infshape[0].isinf())


def tag_roles(model: nn.Module, arch: str) -> list[str]:
    """Tag every parameter of `model` (base shapes set) with its derived role; returns the
    readout modules' names. Refuses what the rules cannot place: no readout, or one weight
    used under two names (a tied weight would need two roles)."""
    tied = _tied(model)
    if tied:
        raise UserError(f"model.arch={arch}: {tied[0]} and {tied[1]} are one tensor; a weight "
                        "shared across layers cannot take muP's per-role init and lr")
    readouts = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            spec = derive_role(module, p_name, p)
            set_spec(p, spec)
            if spec.role is Role.OUTPUT:
                readouts.append(mod_name)
    if not readouts:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)
                 and m.weight.infshape[1].isinf() and not m.weight.infshape[0].isinf()]
        also = f" (its readout looks like a conv: {convs[0]}; make it an nn.Linear)" if convs else ""
        raise UserError(f"model.arch={arch}: no readout found (an nn.Linear whose fan-in grows "
                        f"with width and whose fan-out does not){also}; muP needs one")
    return readouts


def _tied(model: nn.Module) -> tuple[str, str] | None:
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            return first[id(p)], name
        first[id(p)] = name
    return None


# --------------------------------------------------------------------------------------------
# The readout's multiplier
# --------------------------------------------------------------------------------------------


def make_readouts(model: nn.Module, readouts: list[str]) -> None:
    """Each readout's input is multiplied by output_mult / width_mult, as mup's MuReadout does
    (a buffer, so each member of a pack carries its own; not saved with the weights, so the
    state dict stays the model's own)."""
    for name in readouts:
        linear = model.get_submodule(name)
        linear.register_buffer("mup_multipliers", torch.full((2,), math.nan, device=linear.weight.device),
                               persistent=False)
        linear.register_forward_pre_hook(_scale_input)


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    output_mult, width_mult = module.mup_multipliers[0], module.mup_multipliers[1]
    return (args[0] * output_mult / width_mult, *args[1:])


def set_readout_multipliers(model: nn.Module, output_mult: float) -> None:
    """Record output_mult and each readout's width multiplier (1 under SP)."""
    for module in model.modules():
        if hasattr(module, "mup_multipliers"):
            shape = module.weight.infshape
            width_mult = float(shape.width_mult()) if shape.ninf() else 1.0
            module.mup_multipliers.copy_(torch.tensor([output_mult, width_mult]))
