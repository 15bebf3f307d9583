"""muP roles: the tag each parameter carries from where its layer is built.

A layer helper in `mupsweep.models.layers` calls `set_spec` once (and a residual block calls
`mark_residual_block` on its branches); `mupsweep.parametrize` reads the tag back with
`get_spec` for init, optimizer groups, the role check and the parameter table. Imports nothing of the project, so the model files and parametrize can both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from torch import nn


class Role(str, Enum):  # noqa: UP042 (StrEnum would change str(role) from "Role.INPUT")
    INPUT = "input"  # one infinite dim (fan-out), finite fan-in: patch embed, label table
    HIDDEN = "hidden"  # both dims infinite: qkv, proj, MLP, adaLN modulation
    OUTPUT = "output"  # infinite fan-in, finite fan-out: the readout (a MuReadout)
    VECTOR = "vector"  # biases and norm gains


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter is initialized, under muP and under SP."""

    role: Role
    # fan_in: N(0, mult/sqrt(fan_in)) | const: N(0, mult*std) | zero | one | own: the
    # constructor's init kept (a user's model; models/automup.py), a weight's times mult
    mup_init: str = "fan_in"
    std: float = 1.0  # for mup_init=const
    sp_init: str = "xavier"  # xavier (uniform) | normal (N(0, sp_std)) | zero | one | fan_in | own
    sp_std: float = 0.02
    adaln: bool = False  # an adaLN modulation weight: zero when model.adaln_zero
    # Inside a residual branch (attention, MLP, their norms and modulation): CompleteP's depth
    # lr and eps factors apply to it (mupsweep.completep). Set by `mark_residual_block`.
    residual_block: bool = False


def set_spec(param: nn.Parameter, spec: ParamSpec) -> nn.Parameter:
    """Tag `param` with its muP role and init; returns it, so helpers can tag inline."""
    param.mup_spec = spec
    return param


def mark_residual_block(*modules: nn.Module) -> None:
    """Tag every parameter of `modules` as inside a residual branch. A block calls it once, on
    the parts whose output is added to the residual stream (x m_L^-alpha under completep)."""
    for module in modules:
        for name, p in module.named_parameters():
            set_spec(p, replace(get_spec(name, p), residual_block=True))


def get_spec(name: str, param: nn.Parameter) -> ParamSpec:
    """The tag `set_spec` put on `param` (`name` is only for the message). An untagged
    parameter is a bug in a model file, not a user error."""
    spec = getattr(param, "mup_spec", None)
    if spec is None:
        raise RuntimeError(
            f"parameter {name} has no muP role; build it with a helper from mupsweep.models.layers"
        )
    return spec
