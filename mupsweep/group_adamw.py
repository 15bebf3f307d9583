"""AdamW over a group's [K, ...] weights (`group.GroupWeights`), each member with its own lr,
weight decay, betas, eps, lr schedule and gradient clipping, per muP role.

torch.optim.AdamW's arithmetic, step for step (decoupled weight decay p *= 1 - lr*wd; first and
second moments; bias corrections; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)). The settings
are read from the optimizer `parametrize.make_optimizer` builds for each member (muP: hidden
weights lr / m and weight decay x m; CompleteP's depth lr and eps), so the muP rule lives in
one place; the schedule is `lr_lambda`'s. torch's AdamW cannot serve a pack:
its lr is one number per parameter group, and a stacked tensor holds K members.

Per-member values are a [K] column per parameter group: with stacked weights they go to the
device as one (settings, groups, K) tensor a step and each parameter sees a [K, 1, ...] view of
it; a run alone (K = 1) passes them as numbers, which torch's foreach kernels take as they are
(what torch's AdamW does), so an ordinary run costs what it did with torch's optimizer.
The update is foreach per parameter (not one flat tensor per group): a run alone keeps its
module's own nn.Parameters, which DDP, torch.compile and the checkpoint see unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mupsweep.batches import to_device
from mupsweep.config import Config
from mupsweep.errors import UserError
from mupsweep.group import GroupWeights
from mupsweep.parametrize import make_optimizer, role_groups

Settings = tuple[float, float, float, float, float]  # lr, weight decay, beta1, beta2, eps


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Relative lr factor per step. It multiplies each group's own lr, so muP's per-group lr
    (hidden lr / m) survives warmup and decay."""
    o, total = cfg.optim, max(1, cfg.train.steps)

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
            cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * cos
        return 1.0

    return factor


@dataclass
class ParamGroup:
    """Parameters that get the same AdamW settings in every member (muP: one role and width),
    with each member's settings."""

    names: list[str]
    settings: list[Settings]  # per member


@dataclass
class MemberOptimizers:
    """What the members' own optimizers say: the groups, each member's lr per muP role before
    the schedule (what metrics.jsonl logs), and member 0's parameter order (its checkpoint's)."""

    groups: list[ParamGroup]
    role_lrs: list[dict[str, float]]
    layout: list[list[str]]  # member 0's optimizer param groups, as parameter names


def read_member_optimizers(models: list[nn.Module], cfgs: list[Config]) -> MemberOptimizers:
    """The parameters grouped by their AdamW settings in every member, as
    `parametrize.make_optimizer` sets them for each."""
    settings: dict[str, list[Settings]] = {n: [] for n, p in models[0].named_parameters()
                                           if p.requires_grad}
    role_lrs, layout = [], []
    for model, cfg in zip(models, cfgs, strict=True):
        optimizer = make_optimizer(model, cfg.model, cfg.optim)
        if type(optimizer) is not torch.optim.AdamW:
            raise UserError(f"the training loop's optimizer is AdamW; this config's is "
                            f"{type(optimizer).__name__}")
        name_of = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise UserError("the training loop's AdamW has no amsgrad or maximize")
            for p in group["params"]:
                settings[name_of[id(p)]].append((group["lr"], group["weight_decay"],
                                                 *group["betas"], group["eps"]))
        role_lrs.append({role: optimizer.param_groups[i]["lr"]
                         for role, i in role_groups(model, optimizer).items()})
        if not layout:
            layout = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    untrained = [n for n, s in settings.items() if len(s) != len(models)]
    if untrained:
        raise UserError(f"parameter {untrained[0]} is not trained by its optimizer")
    by_settings: dict[tuple, list[str]] = {}
    for name, member_settings in settings.items():
        by_settings.setdefault(tuple(member_settings), []).append(name)
    return MemberOptimizers([ParamGroup(names, list(key)) for key, names in by_settings.items()],
                            role_lrs, layout)


class GroupAdamW:
    """AdamW over `weights.leaves` with each member's own settings and schedule."""

    COEFFICIENTS = 7  # per group and member: decay, 1-b1, b2, 1-b2, -lr/bc1, sqrt(bc2), eps

    def __init__(self, weights: GroupWeights, members: MemberOptimizers, cfgs: list[Config]):
        self.weights, self.groups, self.layout = weights, members.groups, members.layout
        self.role_lrs = members.role_lrs
        self.schedules = [lr_lambda(cfg) for cfg in cfgs]
        self.grad_clip = [cfg.optim.grad_clip for cfg in cfgs]
        self.base_lrs = [cfg.optim.lr for cfg in cfgs]
        leaves = weights.leaves
        self.exp_avg = {n: torch.zeros_like(leaves[n]) for g in self.groups for n in g.names}
        self.exp_avg_sq = {n: torch.zeros_like(leaves[n]) for g in self.groups for n in g.names}
        self.steps = 0
        self._member_tensors()

    # ---- per-member values, as foreach ops take them ---------------------------------------

    def _member_tensors(self) -> None:
        """Each member's max gradient norm on the device, made once (not a copy per step)."""
        device = next(iter(self.weights.leaves.values())).device
        self.max_norm = torch.tensor([c if c > 0 else 1.0 for c in self.grad_clip], device=device)
        self.clipped = torch.tensor([c > 0 for c in self.grad_clip], device=device)

    def _spread(self, values: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """values [K] as one [K, 1, ...] view per parameter of `names` (stacked weights)."""
        leaves = self.weights.leaves
        return [values.view(-1, *[1] * (leaves[n].ndim - 1)) for n in names]

    def _coefficients(self) -> list[list]:
        """Per group, the COEFFICIENTS for the next step, computed in double precision on the
        host as torch's AdamW computes its Python scalars: numbers for a run alone, else per
        parameter [K, 1, ...] views of one tensor sent to the device at once."""
        s = self.steps + 1
        rows = []
        for g in self.groups:
            row = []
            for k, (lr0, wd, b1, b2, eps) in enumerate(g.settings):
                lr = lr0 * self.schedules[k](s - 1)
                bc1, bc2 = 1 - b1**s, 1 - b2**s
                row.append((1 - lr * wd, 1 - b1, b2, 1 - b2, -(lr / bc1), bc2**0.5, eps))
            rows.append(row)
        if not self.weights.stacked:
            return [list(row[0]) for row in rows]
        device = next(iter(self.weights.leaves.values())).device
        coef = torch.tensor(rows, dtype=torch.float64).float()  # (groups, K, COEFFICIENTS)
        coef = to_device(coef.permute(0, 2, 1).contiguous(), device)  # (groups, COEFFICIENTS, K)
        return [[self._spread(coef[gi, c], g.names) for c in range(self.COEFFICIENTS)]
                for gi, g in enumerate(self.groups)]

    # ---- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norms(self) -> None:
        """Each member's gradient scaled to norm <= its optim.grad_clip (where > 0), as
        torch.nn.utils.clip_grad_norm_ does for one model: the norm of the per-parameter norms."""
        if not any(c > 0 for c in self.grad_clip):
            return
        # in the module's parameter order, as clip_grad_norm_(model.parameters()) sums them
        names = [n for n, t in self.weights.leaves.items() if t.grad is not None]
        grads = [self.weights.leaves[n].grad for n in names]
        if self.weights.stacked:  # each member's norm of each parameter: [K] per parameter
            K = self.weights.size
            norms = [torch.linalg.vector_norm(g.reshape(K, -1), dim=1) for g in grads]
        else:  # torch's clip_grad_norm_ computes these: a run alone clips as it always did
            norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms), dim=0)  # (K,), or () alone
        coef = torch.where(self.clipped, torch.clamp(self.max_norm / (total + 1e-6), max=1.0), 1.0)
        torch._foreach_mul_(grads, self._spread(coef, names) if self.weights.stacked else coef.reshape(()))

    @torch.no_grad()
    def step(self) -> None:
        leaves = self.weights.leaves
        for g, coef in zip(self.groups, self._coefficients(), strict=True):
            p = [leaves[n] for n in g.names]
            grad = [t.grad for t in p]
            m, v = [self.exp_avg[n] for n in g.names], [self.exp_avg_sq[n] for n in g.names]
            decay, one_minus_b1, b2, one_minus_b2, neg_step_size, bc2_sqrt, eps = coef
            if any(s[1] != 0 for s in g.settings):  # torch skips the decay when wd == 0
                torch._foreach_mul_(p, decay)
            torch._foreach_lerp_(m, grad, one_minus_b1)
            torch._foreach_mul_(v, b2)
            # addcmul's order, (value * g) * g, with the value per member
            torch._foreach_addcmul_(v, torch._foreach_mul(grad, one_minus_b2), grad)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            # addcdiv's order, (value * m) / denom
            torch._foreach_addcdiv_(p, torch._foreach_mul(m, neg_step_size), denom)
        self.steps += 1

    def zero_grad(self) -> None:
        for t in self.weights.leaves.values():
            t.grad = None

    # ---- what the loop reads, and members leaving ------------------------------------------

    def lr(self, name: str, k: int) -> float:
        """The lr member k's parameter `name` trains with at the next step."""
        for g in self.groups:
            if name in g.names:
                return g.settings[k][0] * self.schedules[k](self.steps)
        raise KeyError(name)

    def logged_lrs(self, k: int) -> dict[str, float]:
        """Member k's base lr ("lr", optim.lr) and lr per muP role ("lr_<role>"), both after the
        schedule: what metrics.jsonl logs."""
        factor = self.schedules[k](self.steps)
        return {"lr": self.base_lrs[k] * factor,
                **{f"lr_{role}": lr * factor for role, lr in self.role_lrs[k].items()}}

    def keep(self, keep: list[int], index: torch.Tensor) -> None:
        """Only the members at positions `keep` (`index` on the device) stay; call after
        `GroupWeights.keep`."""
        self.exp_avg = {n: t.index_select(0, index) for n, t in self.exp_avg.items()}
        self.exp_avg_sq = {n: t.index_select(0, index) for n, t in self.exp_avg_sq.items()}
        for g in self.groups:
            g.settings = [g.settings[k] for k in keep]
        for attr in ("schedules", "grad_clip", "base_lrs", "role_lrs"):
            setattr(self, attr, [getattr(self, attr)[k] for k in keep])
        self._member_tensors()

    # ---- a run alone's checkpoint: torch's AdamW state format --------------------------------

    @property
    def param_groups(self) -> list[dict]:
        """Member 0's optimizer param groups ({"params": [tensors]}), in its own order."""
        return [{"params": [self.weights.leaves[n] for n in names]} for names in self.layout]

    def state_dict(self) -> dict:
        """torch.optim.AdamW's state_dict of a run alone (state keyed by the parameter's index
        in its optimizer's param groups), so a last.pt reads as it always did."""
        if self.weights.stacked:
            raise ValueError("a pack is never saved")
        order = [n for names in self.layout for n in names]
        state = {} if self.steps == 0 else {
            i: {"step": torch.tensor(float(self.steps)), "exp_avg": self.exp_avg[n],
                "exp_avg_sq": self.exp_avg_sq[n]} for i, n in enumerate(order)}
        settings = {n: g.settings[0] for g in self.groups for n in g.names}
        groups, start = [], 0
        for names in self.layout:
            lr, wd, b1, b2, eps = settings[names[0]]
            groups.append({"lr": lr * self.schedules[0](self.steps), "initial_lr": lr,
                           "weight_decay": wd, "betas": (b1, b2), "eps": eps,
                           "params": list(range(start, start + len(names)))})
            start += len(names)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """Resume from `state_dict()`'s output (a checkpoint of torch's AdamW is the same)."""
        order = [n for names in self.layout for n in names]
        steps = 0
        for i, moments in saved["state"].items():
            name = order[i]
            self.exp_avg[name].copy_(moments["exp_avg"])
            self.exp_avg_sq[name].copy_(moments["exp_avg_sq"])
            steps = int(moments["step"])
        self.steps = steps
