"""Packed training: K runs of one shape trained at once, as one model with stacked weights.

Narrow proxies cannot keep the hardware busy one at a time: a step is hundreds of small
kernels, and K processes on one GPU time-slice instead of running together. `train_packed(cfgs)`
trains K configs that differ only in `PER_MEMBER_KEYS` (seed, init and output multipliers,
optimizer settings) as ONE model: each member is built exactly as `train.setup` builds it
(`torch.manual_seed(seed)`, then `parametrize.build_model`, which sets its base shapes and
checks its roles), its weights are stacked [K, ...] (`StackedWeights`), and `torch.func.vmap`
over `functional_call` runs the architecture's own forward for all members at once. One
backward and one `PackedAdamW` step serve them all.

Each member sees what its unpacked `train()` sees: its own generators, drawn in train_step's
order (`train.draw_batch`); the same fixed validation set; its own lr and weight decay per muP
role, read from the optimizer `parametrize.make_optimizer` builds for it; its own lr schedule
(`train.lr_lambda`) and gradient clipping. The loop is `train.train`'s: the same sync points
(`train.sync_points`), evaluation steps and divergence rules, on_eval per member, one
TrainResult per member. A member whose on_eval raises (a pruned trial) or that diverges leaves
the pack: its slice is cut out of every stacked tensor and the others go on as before.

What a pack does not do, and why: it never checkpoints or resumes (its runs are sweep trials,
which always start fresh, so train.save and train.resume must be false), keeps no EMA (only a
saved run uses one), runs in one process (no DDP) and eagerly (no torch.compile). A member's
wall time is its share of the pack's: each moment's time is split among the members training
then, so the members' times add up to the pack's.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from mupsweep.config import Config, to_dict, to_yaml
from mupsweep.data import ImageDataset, load_dataset
from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow, make_diffusion
from mupsweep.errors import UserError
from mupsweep.parametrize import build_model, make_conditioner, make_optimizer, role_groups
from mupsweep.conditioning import Conditioner
from mupsweep.train import (
    Batch,
    EvalCallback,
    FixedValidationSet,
    TrainResult,
    _MetricsLog,
    draw_batch,
    draw_indices,
    final_validation_loss,
    loss_divergence,
    lr_lambda,
    lr_record,
    resolve_device,
    sync_points,
    to_device,
    validation_divergence,
)
from mupsweep.util import atomic_write_text

# The config keys in which the members of one pack may differ; everything else is the pack's.
PER_MEMBER_KEYS = ("model.init_mult", "model.output_mult", "model.class_dropout", "optim",
                   "train.seed", "train.run_dir", "train.diverge_factor")


# --------------------------------------------------------------------------------------------
# Which configs can share a pack
# --------------------------------------------------------------------------------------------


def is_per_member(key: str) -> bool:
    """Whether config key `key` (e.g. optim.lr) may differ between the members of a pack."""
    return any(key == k or key.startswith(k + ".") for k in PER_MEMBER_KEYS)


def _shared_part(cfg: Config) -> dict[str, Any]:
    """The config without its per-member keys: what every member of a pack must agree on."""
    d = to_dict(cfg)
    for key in PER_MEMBER_KEYS:
        *path, last = key.split(".")
        node = d
        for part in path:
            node = node[part]
        node.pop(last)
    return d


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    return where


def check_packable(cfgs: list[Config]) -> None:
    """Raise UserError unless `cfgs` can train as one pack: at least one member, all alike but
    for PER_MEMBER_KEYS, and settings a pack supports."""
    if not cfgs:
        raise UserError("a pack needs at least one member")
    first = _shared_part(cfgs[0])
    for cfg in cfgs[1:]:
        other = _shared_part(cfg)
        if other != first:
            raise UserError(f"these configs cannot share a pack: they differ in "
                            f"{_first_difference(first, other)}; the members of a pack differ "
                            f"only in {', '.join(PER_MEMBER_KEYS)}")
    tc = cfgs[0].train
    if tc.save or tc.resume:
        raise UserError("a pack trains sweep trials, which start fresh and are not saved: "
                        "set train.save=false and train.resume=false")
    if tc.compile:
        raise UserError("train.compile=true: a pack of trials runs eagerly; set sweep.pack=1 "
                        "to compile each trial, or train.compile=false")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("a pack trains in one process; it cannot run under torchrun")


# --------------------------------------------------------------------------------------------
# Stacked weights and their optimizer
# --------------------------------------------------------------------------------------------


@dataclass
class ParamGroup:
    """Parameters that get the same AdamW settings in every member (muP: one role and width),
    with each member's settings, read from that member's own optimizer."""

    names: list[str]
    settings: list[tuple[float, float, float, float, float]]  # per member: lr, wd, b1, b2, eps


def adamw_groups(models: list[nn.Module], cfgs: list[Config]
                 ) -> tuple[list[ParamGroup], list[dict[str, float]]]:
    """The parameters grouped by their AdamW settings in every member, as
    `parametrize.make_optimizer` sets them for each (muP: hidden weights lr / m, weight decay x
    m), and each member's lr per muP role before the schedule (what train() logs)."""
    settings: dict[str, list[tuple[float, ...]]] = {n: [] for n, _ in models[0].named_parameters()}
    role_lrs = []
    for model, cfg in zip(models, cfgs, strict=True):
        optimizer = make_optimizer(model, cfg.model, cfg.optim)
        if type(optimizer) is not torch.optim.AdamW:
            raise UserError(f"a pack trains with AdamW; this config's optimizer is "
                            f"{type(optimizer).__name__}: set sweep.pack=1")
        name_of = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise UserError("a pack's AdamW has no amsgrad or maximize: set sweep.pack=1")
            for p in group["params"]:
                settings[name_of[id(p)]].append((group["lr"], group["weight_decay"],
                                                 *group["betas"], group["eps"]))
        role_lrs.append({role: optimizer.param_groups[i]["lr"]
                         for role, i in role_groups(model, optimizer).items()})
    untrained = [n for n, s in settings.items() if len(s) != len(models)]
    if untrained:
        raise UserError(f"parameter {untrained[0]} is not trained by its optimizer; a pack "
                        "trains every parameter: set sweep.pack=1")
    by_settings: dict[tuple, list[str]] = {}
    for name, member_settings in settings.items():
        by_settings.setdefault(tuple(member_settings), []).append(name)
    return [ParamGroup(names, list(key)) for key, names in by_settings.items()], role_lrs


class StackedWeights:
    """The members' parameters and buffers stacked along a first dim of size K, run through one
    module's code.

    `module` is member 0's model, as `build_model` made it (base shapes set, roles checked); its
    forward runs with each member's tensors swapped in by `functional_call`. Each group of
    parameters (`ParamGroup`) lives in one flat tensor [K, n] (`flats`), so the optimizer takes
    a dozen operations per group instead of per parameter; `params` are [K, *shape] views of
    it. Buffers are stacked too, so each member's readout multipliers (`layers.Readout`)
    travel with it."""

    def __init__(self, models: list[nn.Module], groups: list[list[str]]):
        self.module = models[0]
        self.groups = groups
        self.shapes = {n: tuple(p.shape) for n, p in self.module.named_parameters()}
        self.flats: list[torch.Tensor] = [
            torch.stack([torch.cat([m.get_parameter(n).detach().flatten() for n in names])
                         for m in models]).requires_grad_()
            for names in groups]
        self.buffers: dict[str, torch.Tensor] = {
            name: torch.stack([m.get_buffer(name) for m in models])
            for name, _ in self.module.named_buffers()}

    @property
    def size(self) -> int:
        return self.flats[0].shape[0]

    def unflatten(self, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-group flat tensors [K, n] (the weights, their gradients, ...) as one [K, *shape]
        view per parameter."""
        views = {}
        for names, flat in zip(self.groups, flats, strict=True):
            pieces = flat.split([math.prod(self.shapes[n]) for n in names], dim=1)
            for name, piece in zip(names, pieces, strict=True):
                views[name] = piece.view(flat.shape[0], *self.shapes[name])
        return views

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.unflatten(self.flats)

    def keep(self, index: torch.Tensor) -> None:
        """Only the members at `index` (in that order) stay."""
        self.flats = [f.detach().index_select(0, index).requires_grad_() for f in self.flats]
        self.buffers = {n: b.index_select(0, index) for n, b in self.buffers.items()}

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights, in the form `model.load_state_dict` takes."""
        return {n: p[k].detach().clone() for n, p in self.params.items()}

    def losses(self, diffusion: GaussianDiffusion | RectifiedFlow, batch: Batch) -> torch.Tensor:
        """(K,) each member's mean training loss on its own batch (batch tensors are [K, ...])."""

        def member_loss(params, buffers, x0, t, noise, cond, drop):
            def model(*args):
                return functional_call(self.module, (params, buffers), args)
            return diffusion.loss(model, x0, t, noise, cond, drop).mean()

        return vmap(member_loss)(self.params, self.buffers, batch.x0, batch.t, batch.noise,
                                 batch.cond, batch.drop)

    def per_sample_losses(self, diffusion: GaussianDiffusion | RectifiedFlow, x0: torch.Tensor,
                          t: torch.Tensor, noise: torch.Tensor,
                          cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K, B) every member's per-sample loss on the same (x0, t, noise, cond)."""

        def member_losses(params, buffers):
            def model(*args):
                return functional_call(self.module, (params, buffers), args)
            return diffusion.loss(model, x0, t, noise, cond)

        return vmap(member_losses)(self.params, self.buffers)


class PackedAdamW:
    """AdamW over stacked weights with each member's own settings.

    torch.optim.AdamW's arithmetic, step for step (decoupled weight decay p *= 1 - lr*wd; first
    and second moments; bias corrections; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)), with lr,
    weight decay, betas and eps per member and parameter group (`adamw_groups`, which reads them
    from each member's own optimizer, so the muP rule lives in one place), times that member's
    lr schedule (`train.lr_lambda`). torch's AdamW cannot do this: its lr is one number per
    parameter group, and a stacked tensor holds K members."""

    COEFFICIENTS = 7  # per group and member: decay, 1-b1, b2, 1-b2, -lr/bc1, sqrt(bc2), eps

    def __init__(self, weights: StackedWeights, groups: list[ParamGroup], cfgs: list[Config],
                 role_lrs: list[dict[str, float]]):
        self.weights, self.groups = weights, groups
        self.schedules = [lr_lambda(cfg) for cfg in cfgs]
        self.grad_clip = [cfg.optim.grad_clip for cfg in cfgs]
        self.base_lrs = [cfg.optim.lr for cfg in cfgs]
        self.role_lrs = role_lrs
        self.exp_avg = [torch.zeros_like(f) for f in weights.flats]
        self.exp_avg_sq = [torch.zeros_like(f) for f in weights.flats]
        self.steps = 0
        self._clip_tensors()

    def _clip_tensors(self) -> None:
        """Each member's max gradient norm on the device, made once (not a copy per step)."""
        device = self.weights.flats[0].device
        self.max_norm = torch.tensor([c if c > 0 else 1.0 for c in self.grad_clip], device=device)
        self.clipped = torch.tensor([c > 0 for c in self.grad_clip], device=device)

    def lr(self, name: str, k: int) -> float:
        """The lr member k's parameter `name` trains with at the next step."""
        for g in self.groups:
            if name in g.names:
                return g.settings[k][0] * self.schedules[k](self.steps)
        raise KeyError(name)

    def logged_lrs(self, k: int) -> dict[str, float]:
        """Member k's base lr and lr per role after the last step, as train() logs them."""
        factor = self.schedules[k](self.steps)
        return lr_record(self.base_lrs[k] * factor,
                         {role: lr * factor for role, lr in self.role_lrs[k].items()})

    def _coefficients(self, device: torch.device) -> torch.Tensor:
        """(COEFFICIENTS, groups, K, 1) for the next step, computed in double precision on the
        host as torch's AdamW computes its Python scalars, then sent to the device at once."""
        s = self.steps + 1
        rows = []
        for g in self.groups:
            row = []
            for k, (lr0, wd, b1, b2, eps) in enumerate(g.settings):
                lr = lr0 * self.schedules[k](s - 1)
                bc1, bc2 = 1 - b1**s, 1 - b2**s
                row.append((1 - lr * wd, 1 - b1, b2, 1 - b2, -(lr / bc1), bc2**0.5, eps))
            rows.append(row)
        coef = torch.tensor(rows, dtype=torch.float64).float().permute(2, 0, 1).unsqueeze(-1)
        return to_device(coef.contiguous(), device)

    @torch.no_grad()
    def clip_grad_norms(self) -> None:
        """Each member's gradient scaled to norm <= its optim.grad_clip (where > 0), as
        torch.nn.utils.clip_grad_norm_ does for one model."""
        if not any(c > 0 for c in self.grad_clip):
            return
        grads = [f.grad for f in self.weights.flats]
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads]), dim=0)  # (K,)
        coef = torch.where(self.clipped, torch.clamp(self.max_norm / (total + 1e-6), max=1.0), 1.0)
        for g in grads:
            g.mul_(coef[:, None])

    @torch.no_grad()
    def step(self) -> None:
        flats = self.weights.flats
        coef = self._coefficients(flats[0].device)
        for gi, g in enumerate(self.groups):
            p, grad, m, v = flats[gi], flats[gi].grad, self.exp_avg[gi], self.exp_avg_sq[gi]
            decay, one_minus_b1, b2, one_minus_b2, neg_step_size, bc2_sqrt, eps = coef[:, gi]
            if any(s[1] != 0 for s in g.settings):  # torch skips the decay when wd == 0
                p.mul_(decay)
            m.lerp_(grad, one_minus_b1)
            v.mul_(b2).add_(one_minus_b2 * grad * grad)  # addcmul's order: (value * g) * g
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.add_(neg_step_size * m / denom)  # addcdiv's order: (value * m) / denom
        self.steps += 1

    def zero_grad(self) -> None:
        for f in self.weights.flats:
            f.grad = None

    def keep(self, keep: list[int], index: torch.Tensor) -> None:
        """Only the members at positions `keep` (`index` on the device) stay; call after
        `StackedWeights.keep`."""
        self.exp_avg = [t.index_select(0, index) for t in self.exp_avg]
        self.exp_avg_sq = [t.index_select(0, index) for t in self.exp_avg_sq]
        for g in self.groups:
            g.settings = [g.settings[k] for k in keep]
        self.schedules = [self.schedules[k] for k in keep]
        self.grad_clip = [self.grad_clip[k] for k in keep]
        self.base_lrs = [self.base_lrs[k] for k in keep]
        self.role_lrs = [self.role_lrs[k] for k in keep]
        self._clip_tensors()


# --------------------------------------------------------------------------------------------
# The pack
# --------------------------------------------------------------------------------------------


@dataclass
class MemberOutcome:
    """How one member's run ended: its result (as far as it trained), and the exception its
    on_eval raised if that is why it left the pack (a pruned trial), else None."""

    result: TrainResult
    error: Exception | None = None


@dataclass
class _Member:
    cfg: Config
    on_eval: EvalCallback | None
    gen_index: torch.Generator
    gen_noise: torch.Generator
    metrics: _MetricsLog
    result: TrainResult
    error: Exception | None = None
    history: list[dict] = field(default_factory=list)


@dataclass
class Pack:
    """A pack's fixed pieces and its members' state, built by `setup_pack`."""

    cfg: Config  # member 0's config: what the members share
    members: list[_Member]
    weights: StackedWeights
    optimizer: PackedAdamW
    device: torch.device
    dataset: ImageDataset
    conditioner: Conditioner
    diffusion: GaussianDiffusion | RectifiedFlow
    val_set: FixedValidationSet
    train_x: torch.Tensor
    train_y: torch.Tensor
    flops_per_step: float  # per member
    step: int = 0

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.precision == "bf16")

    def member_model(self, k: int) -> nn.Module:
        """Member k as an ordinary model (base shapes, roles, its current weights): what
        `mupsweep inspect`, `check_roles` and sampling take."""
        model = build_model(self.members[k].cfg.model, self.conditioner.data_spec, self.device)
        model.load_state_dict(self.weights.member_state_dict(k))
        return model

    def keep(self, keep: list[int]) -> None:
        """Only the members at positions `keep` stay in the pack."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.weights.keep(index)
        self.optimizer.keep(keep, index)
        self.members = [self.members[k] for k in keep]


def setup_pack(cfgs: list[Config], on_evals: list[EvalCallback | None],
               dataset: ImageDataset | None = None) -> Pack:
    """Everything before the first step, for every member as `train.setup` does it for one."""
    check_packable(cfgs)
    cfg, tc = cfgs[0], cfgs[0].train
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dataset = dataset or load_dataset(cfg.data)
    conditioner = make_conditioner(cfg, dataset).to(device)
    diffusion = make_diffusion(cfg.diffusion)
    models, members = [], []
    for member_cfg, on_eval in zip(cfgs, on_evals, strict=True):
        run_dir = Path(member_cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(member_cfg))
        seed = member_cfg.train.seed
        torch.manual_seed(seed)  # weights: as train.setup draws them
        try:
            models.append(build_model(member_cfg.model, conditioner.data_spec, device))
        except ValueError as e:
            raise UserError(f"model config: {e}") from None
        members.append(_Member(
            member_cfg, on_eval,
            gen_index=torch.Generator().manual_seed(seed + 1),
            gen_noise=torch.Generator(device).manual_seed(seed + 2),
            metrics=_MetricsLog(run_dir / "metrics.jsonl", resume_step=0, enabled=True),
            result=TrainResult(math.nan, math.nan, 0, 0.0, 0.0, run_dir=str(run_dir))))
    groups, role_lrs = adamw_groups(models, cfgs)
    weights = StackedWeights(models, [g.names for g in groups])
    optimizer = PackedAdamW(weights, groups, cfgs, role_lrs)
    flops_per_step = 3 * models[0].flops_per_image(conditioner.data_spec) * tc.batch_size
    del models[1:]  # their weights are in the stack now
    return Pack(cfg=cfg, members=members, weights=weights, optimizer=optimizer, device=device,
                dataset=dataset, conditioner=conditioner, diffusion=diffusion,
                val_set=FixedValidationSet(dataset, diffusion, tc.val_size, tc.val_seed, device,
                                           conditioner),
                train_x=dataset.train_images.to(device), train_y=dataset.train_labels.to(device),
                flops_per_step=float(flops_per_step))


def train_step(pack: Pack) -> torch.Tensor:
    """One optimizer step of every member on its own next batch. Returns the (K,) losses, still
    on the device."""
    B, members = pack.cfg.train.batch_size, pack.members
    idx = to_device(torch.stack([draw_indices(pack.train_x.shape[0], B, m.gen_index)
                                 for m in members]), pack.device)
    batches = [draw_batch(m.cfg, (pack.train_x, pack.train_y), idx[k], pack.diffusion,
                          pack.conditioner, m.gen_noise) for k, m in enumerate(members)]
    batch = Batch(x0=torch.stack([b.x0 for b in batches]), t=torch.stack([b.t for b in batches]),
                  noise=torch.stack([b.noise for b in batches]),
                  drop=torch.stack([b.drop for b in batches]),
                  cond={key: torch.stack([b.cond[key] for b in batches]) for key in batches[0].cond})
    with pack.autocast():
        losses = pack.weights.losses(pack.diffusion, batch)
    losses.sum().backward()  # members share no weights: each gets its own loss's gradient
    pack.optimizer.clip_grad_norms()
    pack.optimizer.step()
    pack.optimizer.zero_grad()
    pack.step += 1
    return losses.detach()


@torch.no_grad()
def validation_losses(pack: Pack) -> list[float]:
    """Every member's fixed validation loss (`train.FixedValidationSet.loss`, for K at once)."""
    val, module = pack.val_set, pack.weights.module
    batch_size, n = max(pack.cfg.train.batch_size, 64), val.x0.shape[0]
    module.eval()
    totals = torch.zeros(pack.weights.size, dtype=torch.float64, device=pack.device)
    for i in range(0, n, batch_size):
        s = slice(i, i + batch_size)
        with pack.autocast():
            cond = {k: v[s] for k, v in val.cond.items()}
            per_sample = pack.weights.per_sample_losses(pack.diffusion, val.x0[s], val.t[s],
                                                        val.noise[s], cond)
        totals += per_sample.float().sum(dim=1).double()  # as train: float sums, double total
    module.train()
    return (totals / n).tolist()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _WallClock:
    """Splits the pack's wall time among the members training at each moment."""

    def __init__(self, start: float):
        self.start = self.mark = start

    def charge(self, members: list[_Member]) -> None:
        now = time.perf_counter()
        for m in members:
            m.result.wall_time_s += (now - self.mark) / len(members)
        self.mark = now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def train_packed(cfgs: list[Config], on_evals: list[EvalCallback | None] | None = None,
                 dataset: ImageDataset | None = None) -> list[MemberOutcome]:
    """Train `cfgs` as one pack; return each member's outcome, in the order given.

    on_evals[k](step, validation_loss) runs after member k's every evaluation, as `train`'s
    on_eval does; if it raises an Exception, member k leaves the pack there and the exception
    is its outcome's `error` (anything else, such as KeyboardInterrupt, stops the pack). A
    member's TrainResult is train()'s, but for wall_time_s (its share of the pack's, setup
    included) and no checkpoint or sample grid (a pack's runs are not saved)."""
    clock = _WallClock(time.perf_counter())
    on_evals = on_evals if on_evals is not None else [None] * len(cfgs)
    pack = setup_pack(cfgs, on_evals, dataset)
    everyone, tc = list(pack.members), pack.cfg.train
    _leave(pack, _evaluate(pack), clock)
    total = torch.zeros(len(pack.members), device=pack.device)  # losses since the last sync
    synced_at = 0
    while pack.members and pack.step < tc.steps:
        last = train_step(pack)
        total += last  # finite only while every loss since the last read is
        step = pack.step
        log_due, eval_due, ckpt_due = sync_points(step, tc)
        if not (log_due or eval_due or ckpt_due):
            continue
        # A sync point; ckpt_due only makes one (a pack saves nothing) so that a member stops
        # at the same step as its unpacked run would.
        last_values, totals = torch.stack([last.float(), total.float()]).tolist()
        total.zero_()
        window_start, synced_at = synced_at + 1, step
        staying = []
        for k, m in enumerate(pack.members):
            if log_due:
                m.metrics.write({"step": step, "loss": last_values[k],
                                 **pack.optimizer.logged_lrs(k), "time_s": clock.elapsed})
            if not math.isfinite(totals[k]):
                m.result.diverged = True
                m.result.reason = loss_divergence(last_values[k], step, window_start)
            else:
                staying.append(k)
        _leave(pack, staying, clock)
        if eval_due and pack.members:
            _leave(pack, _evaluate(pack), clock)
        if len(total) != len(pack.members):
            total = torch.zeros(len(pack.members), device=pack.device)
    clock.charge(pack.members)
    for m in pack.members:
        _finish(pack, m)
    return [MemberOutcome(m.result, m.error) for m in everyone]


def _evaluate(pack: Pack) -> list[int]:
    """Evaluate every member (history, metrics.jsonl, on_eval, divergence) as train.evaluate
    and the loop do; return the positions of the members that stay."""
    step, staying = pack.step, []
    for k, (m, val) in enumerate(zip(pack.members, validation_losses(pack), strict=True)):
        if step == 0:
            m.result.initial_validation_loss = val
        m.history.append({"step": step, "validation_loss": val})
        m.metrics.write({"step": step, "validation_loss": val})
        if m.on_eval is not None:
            try:
                m.on_eval(step, val)
            except Exception as e:  # the member's own decision (a pruned trial): it leaves
                m.error = e
                continue
        if step > 0:
            reason = validation_divergence(val, m.result.initial_validation_loss, step,
                                           m.cfg.train.diverge_factor)
            if reason:
                m.result.diverged, m.result.reason = True, reason
                continue
        staying.append(k)
    return staying


def _leave(pack: Pack, staying: list[int], clock: _WallClock) -> None:
    """Members not in `staying` leave the pack: their time is charged and their result filled."""
    if len(staying) == len(pack.members):
        return
    clock.charge(pack.members)
    for k, m in enumerate(pack.members):
        if k not in staying:
            _finish(pack, m)
    pack.keep(staying)


def _finish(pack: Pack, m: _Member) -> None:
    """Fill in member m's result as train()'s `_finish` does (without saving anything)."""
    r = m.result
    r.steps, r.history = pack.step, m.history
    r.flops = pack.flops_per_step * pack.step
    r.validation_loss = final_validation_loss(m.history, pack.step, r.diverged)
    if m.error is None:  # a run that raised out of train() writes no result.json either
        atomic_write_text(Path(r.run_dir) / "result.json", json.dumps(r.to_dict(), indent=2))
