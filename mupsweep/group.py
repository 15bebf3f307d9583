"""A group of K >= 1 runs of one shape as one set of [K, ...] weights: which configs may share a
group (`check_packable`: they differ only in `config.per_member_keys`, each key's per_member=
rule) and the weights themselves (`GroupWeights`).

K = 1 is an ordinary run: the weights are the model's own nn.Parameters and the model (wrapped
in DDP and/or torch.compile, with whatever forward hooks were put on it) is called directly.
K > 1 is a pack of sweep trials: narrow proxies cannot keep the hardware busy one at a time (a
step is hundreds of small kernels, and K processes on one GPU time-slice instead of running
together), so each member is built exactly as a run alone is (`parametrize.build_model`: base
shapes, role checks, its own seed), its weights are stacked [K, ...], and `torch.func.vmap`
over `functional_call` runs the architecture's own forward for all members at once. One
backward and one optimizer step (`group_adamw.GroupAdamW`) serve them all.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from mupsweep.config import Config, per_member_keys, to_dict
from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow
from mupsweep.errors import UserError
from mupsweep.util import MISSING, pop_dotted


def _shared_part(cfg: Config) -> dict[str, Any]:
    """The config without its per-member keys: what every member of a group must agree on."""
    d = to_dict(cfg)
    for key in per_member_keys():
        pop_dotted(d, key)
    return d


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key, MISSING) != b.get(key, MISSING):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    return where


def check_packable(cfgs: list[Config]) -> None:
    """Raise UserError unless `cfgs` can train as one group: at least one member and, for more
    than one, all alike but for the per-member keys (`config.per_member_keys`, each key's
    `per_member=` rule), and settings a pack supports. A pack never
    checkpoints or resumes (its runs are sweep trials, which start fresh), runs in one process
    (no DDP) and eagerly (no torch.compile); a group of one does all of these."""
    if not cfgs:
        raise UserError("a pack needs at least one member")
    if len(cfgs) == 1:
        return
    first = _shared_part(cfgs[0])
    for cfg in cfgs[1:]:
        other = _shared_part(cfg)
        if other != first:
            raise UserError(f"these configs cannot share a pack: they differ in "
                            f"{_first_difference(first, other)}; the members of a pack differ "
                            f"only in {', '.join(per_member_keys())}")
    tc = cfgs[0].train
    if tc.save or tc.resume:
        raise UserError("a pack trains sweep trials, which start fresh and are not saved: "
                        "set train.save=false and train.resume=false")
    if tc.compile:
        raise UserError("train.compile=true: a pack of trials runs eagerly; set sweep.pack=1 "
                        "to compile each trial, or train.compile=false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("a pack trains in one process; it cannot run under torchrun")


class GroupWeights:
    """The members' parameters and buffers as [K, ...] tensors, run through one module's code.

    `module` is member 0's model as `build_model` made it (base shapes set, roles checked).
    Stacked (K > 1, or a pack that has shrunk to one member): `leaves` are [K, *shape] tensors
    that autograd fills the .grad of, `buffers` are stacked too (so each member's readout
    multipliers travel with it), and the forward is vmap(functional_call(module)). Not stacked
    (a run alone): `leaves` are the module's own nn.Parameters, a [1, *shape] tensor seen
    without its leading 1, and the forward calls the module itself, so DDP, torch.compile,
    forward hooks and the module's state dict are those of any nn.Module."""

    def __init__(self, models: list[nn.Module]):
        self.module = models[0]
        self.stacked = len(models) > 1
        self.size = len(models)
        if not self.stacked:
            self.leaves: dict[str, torch.Tensor] = dict(self.module.named_parameters())
            self.buffers: dict[str, torch.Tensor] = dict(self.module.named_buffers())
            return
        self.leaves = {
            name: torch.stack([m.get_parameter(name).detach() for m in models]).requires_grad_(p.requires_grad)
            for name, p in self.module.named_parameters()}  # [K, *shape]
        self.buffers = {name: torch.stack([m.get_buffer(name) for m in models])
                        for name, _ in self.module.named_buffers()}  # [K, *shape]

    def keep(self, index: torch.Tensor) -> None:
        """Only the members at `index` (in that order) stay (stacked weights only)."""
        self.leaves = {n: p.detach().index_select(0, index).requires_grad_(p.requires_grad)
                       for n, p in self.leaves.items()}
        self.buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}
        self.size = len(index)

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights, in the form `model.load_state_dict` takes."""
        if not self.stacked:
            return {n: t.detach().clone() for n, t in self.module.state_dict().items()}
        return {n: p[k].detach().clone() for n, p in self.leaves.items()}

    def losses(self, forward: nn.Module, diffusion: GaussianDiffusion | RectifiedFlow,
               batches: list) -> torch.Tensor:
        """(K,) each member's mean training loss on its own batch (`train.Batch`). `forward` is
        the module as a run alone calls it (DDP-wrapped and/or compiled)."""
        if not self.stacked:
            b = batches[0]
            return diffusion.loss(forward, b.x0, b.t, b.noise, b.cond, b.drop).mean().reshape(1)

        def member_loss(params, buffers, x0, t, noise, cond, drop):
            def model(*args):
                return functional_call(self.module, (params, buffers), args)
            return diffusion.loss(model, x0, t, noise, cond, drop).mean()

        stack = lambda get: torch.stack([get(b) for b in batches])  # noqa: E731 - [K, B, ...]
        cond = {key: stack(lambda b, key=key: b.cond[key]) for key in batches[0].cond}
        return vmap(member_loss)(self.leaves, self.buffers, stack(lambda b: b.x0),
                                 stack(lambda b: b.t), stack(lambda b: b.noise), cond,
                                 stack(lambda b: b.drop))

    def per_sample_losses(self, diffusion: GaussianDiffusion | RectifiedFlow, x0: torch.Tensor,
                          t: torch.Tensor, noise: torch.Tensor,
                          cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K, B) every member's per-sample loss on the same (x0, t, noise, cond)."""
        if not self.stacked:
            return diffusion.loss(self.module, x0, t, noise, cond).unsqueeze(0)

        def member_losses(params, buffers):
            def model(*args):
                return functional_call(self.module, (params, buffers), args)
            return diffusion.loss(model, x0, t, noise, cond)

        return vmap(member_losses)(self.leaves, self.buffers)
