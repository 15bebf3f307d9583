"""A user's own model class, found by import path and called through the model contract.

`model.arch` names a class three ways besides the built-in names:

    model.arch=my_pkg.models:MyDiT        an importable module (the current directory is tried too)
    model.arch=path/to/dit.py:DiT         a file, relative to the current directory
    model.arch=my-dit                     an entry point of the group `mupsweep.models` that an
                                          installed package declares ("my-dit = my_pkg.models:MyDiT")

The class is built with `model.args` as keyword arguments. Their values may interpolate the
sizes mupsweep decides (`${model.width}`, `${model.heads}` = width / head_dim, `${model.depth}`,
`${model.head_dim}`, any other model key, `${data.image_size}`, `${data.channels}`,
`${data.num_classes}`), resolved anew at every width and depth it builds (base, delta, proxy,
target), so one preset describes the model at every size.

`UserModel` wraps the instance so that mupsweep calls it as it calls its own models,
`model(x, t, cond, drop)` (mupsweep/models/contract.py). How the user's forward is called is
read off its parameter names (`FORWARDS`); a forward that matches none is refused by name.
Everything a process needs is in the config, so spawned sweep workers and torchrun ranks find
the same class again.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import shutil
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from mupsweep.errors import UserError
from mupsweep.models.automup import AttentionScale
from mupsweep.models.registry import DataSpec, get_model_class, is_registered
from mupsweep.util import atomic_write, first_line

ENTRY_POINT_GROUP = "mupsweep.models"


# --------------------------------------------------------------------------------------------
# Finding the class
# --------------------------------------------------------------------------------------------


def is_user_arch(arch: str) -> bool:
    """True when `arch` names a user's class (an import path, a file, or an entry point)."""
    return not is_registered(arch) and (":" in arch or arch in _entry_point_names())


def find_model_class(arch: str) -> type[nn.Module]:
    """The class of any `model.arch`: a built-in name, or a user's class (`load_user_class`)."""
    if is_registered(arch) or not is_user_arch(arch):
        return get_model_class(arch)  # a built-in, or the error naming them and the other ways
    return load_user_class(arch)


def _entry_point_names() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


@functools.cache
def load_user_class(arch: str) -> type[nn.Module]:
    """The nn.Module subclass `arch` names; a UserError naming what is wrong otherwise."""
    where = _entry_point_names().get(arch, arch)
    module_part, sep, class_name = where.rpartition(":")
    if not sep or not module_part or not class_name:
        raise UserError(f"model.arch={arch!r}: write module.path:Class or path/to/file.py:Class")
    if module_part.endswith(".py"):
        module = _load_file(arch, Path(module_part))
    else:
        module = _import(arch, module_part)
    cls = getattr(module, class_name, None)
    if cls is None:
        found = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        raise UserError(f"model.arch={arch!r}: {module_part} has no class {class_name!r}"
                        + (f" (its nn.Module classes: {', '.join(found)})" if found else ""))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"model.arch={arch!r}: {class_name} is not an nn.Module subclass")
    return cls


def _load_file(arch: str, path: Path):
    if not path.is_file():
        raise UserError(f"model.arch={arch!r}: no file {path} (from {os.getcwd()})")
    name = f"mupsweep_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error in it is theirs to fix, named here
        del sys.modules[name]
        raise UserError(f"model.arch={arch!r}: importing {path} failed: "
                        f"{type(e).__name__}: {first_line(e)}") from None
    return module


def _import(arch: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise UserError(f"model.arch={arch!r}: importing {module_name} failed: {first_line(e)}") from None
    if os.getcwd() not in sys.path:  # as `python -m` would: the current directory's packages
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(f"model.arch={arch!r}: no module {e.name!r} (not installed, and not "
                        f"in {os.getcwd()})") from None
    except Exception as e:
        raise UserError(f"model.arch={arch!r}: importing {module_name} failed: "
                        f"{type(e).__name__}: {first_line(e)}") from None


# --------------------------------------------------------------------------------------------
# The constructor's arguments at one size
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """What `model.args` may interpolate: the model keys at the size being built, and the data's
    shapes (from the dataset, not the config: data.image_size may be null there)."""

    model: dict[str, Any]  # every scalar model key, width and depth those of this build
    data: DataSpec

    def namespace(self) -> dict[str, Any]:
        model = dict(self.model)
        model["heads"] = model["width"] // model["head_dim"]
        data = {"image_size": self.data.image_size, "channels": self.data.channels,
                "num_classes": self.data.num_classes, "text_dim": self.data.text_dim,
                "text_len": self.data.text_len}
        return {"model": model, "data": data}


def resolve_args(args: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """`model.args` with every ${model.*} / ${data.*} replaced by its value at `sizes`."""
    root = OmegaConf.create({**sizes.namespace(), "args": args})
    try:
        return OmegaConf.to_container(root.args, resolve=True)
    except OmegaConfBaseException as e:
        names = ", ".join(f"${{{s}.{k}}}" for s, v in sizes.namespace().items() for k in v
                          if k in ("width", "heads", "depth", "head_dim", "image_size",
                                   "channels", "num_classes"))
        raise UserError(f"model.args: {first_line(e)} (it may use {names} and any model key)") from None


def construct(cls: type[nn.Module], arch: str, args: dict[str, Any]) -> nn.Module:
    """cls(**args), with a constructor mismatch named in one line."""
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as e:
        raise UserError(f"model.arch={arch}: {cls.__name__}{inspect.signature(cls)} cannot take "
                        f"model.args {sorted(args)}: {e}") from None
    try:
        return cls(**args)
    except Exception as e:
        raise UserError(f"model.arch={arch}: {cls.__name__}(**model.args) failed: "
                        f"{type(e).__name__}: {first_line(e)}") from None


# --------------------------------------------------------------------------------------------
# How the user's forward is called
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """One way of calling a user's forward: its leading parameter names, and what each is
    given (x, t, y: labels, text: caption tokens, pooled: the pooled caption vector)."""

    params: tuple[str, ...]  # the forward's leading parameter names
    gives: tuple[str, ...]  # what mupsweep passes to each of them
    keywords: bool = False  # pass by name, plus return_dict=False (diffusers' models)
    mask: str | None = None  # the parameter that takes the caption mask (1 = a real token)
    describe: str = ""

    @property
    def conditioning(self) -> str:
        """"text" (a caption conditioner), "label" (labels, or nothing)."""
        return "text" if "text" in self.gives else "label"


FORWARDS = (
    Forward(("x", "t", "y"), ("x", "t", "y"), describe="forward(x, t, y): DiT's, class labels"),
    Forward(("hidden_states", "timestep", "class_labels"), ("x", "t", "y"), keywords=True,
            describe="forward(hidden_states, timestep, class_labels): diffusers' DiT"),
    Forward(("hidden_states", "encoder_hidden_states", "timestep"), ("x", "text", "t"),
            keywords=True, mask="encoder_attention_mask",
            describe="forward(hidden_states, encoder_hidden_states, timestep): diffusers' PixArt"),
    Forward(("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
            ("x", "text", "pooled", "t"), keywords=True,
            describe="forward(hidden_states, encoder_hidden_states, pooled_projections, "
                     "timestep): diffusers' SD3"),
    Forward(("x", "t"), ("x", "t"), describe="forward(x, t): unconditional"),
)


def forward_of(cls: type[nn.Module], arch: str) -> Forward:
    """The entry of FORWARDS that `cls.forward` matches (longest first)."""
    names = tuple(n for n in inspect.signature(cls.forward).parameters if n != "self")
    for fwd in sorted(FORWARDS, key=lambda f: -len(f.params)):
        if names[: len(fwd.params)] == fwd.params:
            return fwd
    known = "; ".join(f.describe for f in FORWARDS)
    raise UserError(f"model.arch={arch}: {cls.__name__}.forward({', '.join(names)}) is none that "
                    f"mupsweep can call ({known}); see 'Your own model' in the README")


class UserModel(nn.Module):
    """A user's model behind the contract: `forward(x, t, cond, drop)` -> (B, C or 2C, H, W).
    The user's model itself always runs in eval mode (see `train`).

    Labels of dropped samples (classifier-free guidance) become the null class `num_classes`,
    as DiT's label table has it; the output is the model's first output (diffusers' `.sample`
    or a tuple's first item)."""

    def __init__(self, inner: nn.Module, forward: Forward, num_classes: int):
        super().__init__()
        self.inner = inner
        self.call = forward
        self.num_classes = num_classes
        self.conditioning = forward.conditioning
        # muP's attention logit scale (automup.AttentionScale): (attn_mult, base head dim);
        # None leaves the model's attention as written (SP)
        self.attention_scale: tuple[float, int | None] | None = None
        self.inner.eval()
        self.head_dims: list[int] = []  # of its attention calls at this width (automup.probe)
        self.inline_attention: list[str] = []  # modules taking a softmax themselves (probe)

    def train(self, mode: bool = True) -> UserModel:
        """The wrapped model stays in eval mode, in training too: its own random label dropout
        (DiT's, diffusers') and dropout layers would draw from torch's global generator, which
        a resumed run does not restore and a pack of trials (vmap) refuses. mupsweep drops the
        labels itself, seeded (model.class_dropout)."""
        super().train(mode)
        self.inner.eval()
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                drop: torch.Tensor | None = None) -> torch.Tensor:
        if self.attention_scale is None:
            return self._call(x, t, cond, drop)
        with AttentionScale(*self.attention_scale):
            return self._call(x, t, cond, drop)

    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
              drop: torch.Tensor | None) -> torch.Tensor:
        given = {"x": x, "t": t}
        if "y" in self.call.gives:
            y = cond["y"]
            if drop is not None:  # the null class, as DiT's label table has it
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)
            given["y"] = y
        for name in ("text", "pooled"):
            if name in self.call.gives:  # the null caption: zeros
                v = cond[name]
                keep = None if drop is None else (~drop).to(v.dtype).view(-1, *[1] * (v.ndim - 1))
                given[name] = v if keep is None else v * keep
        inputs = [given[name] for name in self.call.gives]
        if self.call.keywords:
            kwargs = dict(zip(self.call.params, inputs, strict=True))
            if self.call.mask is not None:
                kwargs[self.call.mask] = cond["mask"].to(x.dtype)
            out = self.inner(**kwargs, return_dict=False)
        else:
            out = self.inner(*inputs)
        if isinstance(out, tuple | list):
            out = out[0]
        return getattr(out, "sample", out)

    def tracked_modules(self) -> dict[str, nn.Module]:
        """What the coordinate check records, derived: the output of every block (the children
        of the model's longest nn.ModuleList) and every readout."""
        lists = [(name, m) for name, m in self.inner.named_modules() if isinstance(m, nn.ModuleList)]
        mods: dict[str, nn.Module] = {}
        if lists:
            name, blocks = max(lists, key=lambda item: len(item[1]))
            mods.update({f"{name}.{i}": block for i, block in enumerate(blocks)})
        mods.update({name: m for name, m in self.inner.named_modules() if hasattr(m, "mup_multipliers")})
        return mods

    def stream_head(self) -> nn.Module | None:
        """Not known for a model mupsweep did not write (the depth check needs it)."""
        return None

    def own_state_dict(self) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The weights as the user's own class computes the same function with them, without
        mupsweep: each readout's weight times its muP multiplier (output_mult / width_mult).
        (None, why) when that cannot be: attention that muP gives another scale than the
        model's own 1/sqrt(head_dim) (attn_mult != 1, or a head dim that grew) is not a weight."""
        if self.attention_scale is not None:
            attn_mult, base_head_dim = self.attention_scale
            if attn_mult != 1.0 or (self.head_dims and {base_head_dim} != set(self.head_dims)):
                return None, ("its attention runs at muP's scale attn_mult * sqrt(base head dim) / "
                              "head dim, which the class alone does not compute")
        state = {k: v.detach().clone() for k, v in self.inner.state_dict().items()}
        for name, module in self.inner.named_modules():
            if hasattr(module, "mup_multipliers"):
                factor = module.mup_multipliers[0] / module.mup_multipliers[1]
                state[f"{name}.weight"] = state[f"{name}.weight"] * factor
        return state, ""


def save_own_format(model: nn.Module, out: Path) -> str:
    """Write a user's model where its own code loads it: diffusers' `save_pretrained` layout
    (out/model/) for a class that has it, else out/model.pt (the class's state dict). Returns
    what was written, or why nothing was."""
    if not isinstance(model, UserModel):
        return ""
    state, why = model.own_state_dict()
    if state is None:
        return f"not saved in the model's own format: {why}"
    inner = model.inner
    if hasattr(inner, "save_pretrained"):
        with torch.no_grad():
            copy = type(inner).from_config(inner.config)
            copy.load_state_dict(state)
            tmp = out / "model.tmp"
            copy.save_pretrained(tmp)
        _swap(tmp, out / "model")
        return str(out / "model")
    atomic_write(out / "model.pt", lambda tmp: torch.save(state, tmp))
    return str(out / "model.pt")


def _swap(new: Path, old: Path) -> None:
    """Put the directory `new` at `old` (an old one is gone only once the new one is whole)."""
    trash = old.with_name(old.name + ".old")
    shutil.rmtree(trash, ignore_errors=True)
    if old.exists():
        old.replace(trash)
    new.replace(old)
    shutil.rmtree(trash, ignore_errors=True)
