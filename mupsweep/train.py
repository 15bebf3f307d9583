"""The training loop, whose unit is a group of K >= 1 runs: `train(cfg)` is a group of one (full
runs, proxy trials, coordinate checks), `train_group(cfgs)` a pack of sweep trials.

A sweep trial is a short run with an `on_eval` callback that reports its objective to Optuna
(and may raise to prune). Under torchrun a group of one runs DDP: every rank draws the
whole global batch from the same generators and keeps its slice, so the averaged gradient
equals the single-process one. K > 1 members train as one model with stacked weights
(`group.GroupWeights`), each with its own seed, generators, HPs, lr schedule, metrics, on_eval
and result; a member leaves the group when its on_eval raises (a pruned trial) or it diverges,
and the others go on as before.

Read top to bottom: `group_setup.setup` builds a `Group` (members, weights, optimizer, data,
resume), `train_step` takes one optimizer step of every member, `evaluate` measures the fixed
validation loss and the metrics of eval.metrics (`mupsweep.evaluation`), and `train_group`
loops them. Everything a checkpoint holds is one member's
`checkpoint.RunState` (a group of one only). The losses stay on the device between sync points
(log, eval and checkpoint steps, and the last): reading them every step would make the host
wait for the accelerator each step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mupsweep.batches import draw_batch, draw_indices, to_device
from mupsweep.checkpoint import save_checkpoint
from mupsweep.config import Config, TrainConfig
from mupsweep.data import ImageDataset
from mupsweep.evaluation import METRICS, VALIDATION_LOSS, MetricInputs, measured_names
from mupsweep.group_setup import EvalCallback, Group, Member, TrainResult, setup, update_ema
from mupsweep.images import raw_latents_note, save_sample_grid
from mupsweep.metrics import write_text, writing
from mupsweep.models.user import save_own_format
from mupsweep.progress_display import Progress
from mupsweep.vae import decode_latents, load_vae


@dataclass
class MemberOutcome:
    """How one member's run ended: its result (as far as it trained), and the exception its
    on_eval raised if that is why it left the group (a pruned trial), else None."""

    result: TrainResult
    error: Exception | None = None


# --------------------------------------------------------------------------------------------
# Step and evaluation
# --------------------------------------------------------------------------------------------


def train_step(group: Group) -> torch.Tensor:
    """One optimizer step of every member on its own next global batch (this rank's part of
    it). Returns the (K,) losses, still on the device: reading them here would make the host
    wait for the accelerator every step."""
    tc, members = group.cfg.train, group.members
    # Each member's whole global batch, identical on every rank; each rank keeps its slice.
    idx = torch.stack([draw_indices(len(group.train_images), tc.batch_size, m.state.gen_index)
                       for m in members])  # (K, B) on the CPU
    x0 = group.train_images.rows(idx[:, group.local], [group.everyone.index(m) for m in members])
    y = group.train_y[to_device(idx, group.device)]  # (K, B)
    batches = [draw_batch(m.cfg, x0[k], y[k], group.local, group.diffusion, group.conditioner,
                          m.state.gen_noise)
               for k, m in enumerate(members)]
    with group.autocast():
        losses = group.weights.losses(group.forward_model, group.diffusion, batches)  # (K,)
    losses.sum().backward()  # members share no weights: each gets its own loss's gradient
    group.optimizer.clip_grad_norms()
    group.optimizer.step()
    group.optimizer.zero_grad()
    if group.ema is not None:
        update_ema(group.ema, group.weights.module, tc.ema_decay)
    for m in members:
        m.state.step += 1
    return losses.detach()


@torch.no_grad()
def validation_losses(group: Group) -> list[float]:
    """Every member's loss on the fixed validation set (`batches.FixedValidationSet`): float
    sums per batch, a double total, so a member's number is its run alone's."""
    val, module = group.val_set, group.weights.module
    batch_size, n = max(group.cfg.train.batch_size, 64), val.x0.shape[0]
    was_training = module.training
    module.eval()
    totals = torch.zeros(len(group.members), dtype=torch.float64, device=group.device)
    for i in range(0, n, batch_size):
        s = slice(i, i + batch_size)
        with group.autocast():
            cond = {k: v[s] for k, v in val.cond.items()}
            per_sample = group.weights.per_sample_losses(group.diffusion, val.x0[s], val.t[s],
                                                         val.noise[s], cond)  # (K, b)
        totals += per_sample.float().sum(dim=1).double()
    module.train(was_training)
    return (totals / n).tolist()


def measure_metrics(group: Group, k: int) -> tuple[dict[str, float], dict[str, float]]:
    """Member k's values of the metrics of eval.metrics, and the seconds each took. Measured on
    its EMA when it keeps one (as its sample grid is drawn). Under DDP every rank measures and
    rank 0's values stand, so every rank takes the same decision on them."""
    names = measured_names(group.cfg)
    if not names:
        return {}, {}
    m = group.members[k]
    if group.ema is not None:
        model = group.ema
    else:
        model = group.member_model(k) if group.weights.stacked else group.weights.module
    inputs = MetricInputs(model, m.cfg, group.dataset, group.diffusion, group.conditioner,
                          group.device, group.metric_cache)
    was_training = model.training
    model.eval()
    values, seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        with group.autocast():
            value = float(METRICS[name].measure(inputs))
        if group.world > 1:
            shared = torch.tensor([value], dtype=torch.float64, device=group.device)
            dist.broadcast(shared, 0)
            value = shared.item()
        values[name], seconds[name] = value, time.perf_counter() - start
    model.train(was_training)
    return values, seconds


def evaluate(group: Group) -> list[int]:
    """Every member's fixed validation loss, and after step 0 its other metrics, recorded in
    its history and metrics.jsonl (with each metric's cost), then handed to its on_eval
    (which may raise to prune); returns the positions of the members that stay (not pruned,
    not diverged)."""
    staying = []
    for k, (m, val) in enumerate(zip(group.members, validation_losses(group), strict=True)):
        step = m.state.step
        values, seconds = {VALIDATION_LOSS: val}, {}
        if step > 0:  # before any update there is nothing to measure but the start
            more, seconds = measure_metrics(group, k)
            values.update(more)
        for name, s in seconds.items():
            m.result.eval_time_s[name] = m.result.eval_time_s.get(name, 0.0) + s
        m.state.history.append({"step": step, **values})
        m.metrics.write({"step": step, **values, **{f"{n}_time_s": s for n, s in seconds.items()}})
        if m.on_eval is not None:
            try:
                m.on_eval(step, values)
            except Exception as e:  # the member's own decision (a pruned trial): it leaves
                m.error = e
                continue
        if step > 0:
            reason = validation_divergence(val, m.state.history[0][VALIDATION_LOSS], step,
                                           m.cfg.train.diverge_factor)
            if reason:
                m.result.diverged, m.result.reason = True, reason
                continue
        staying.append(k)
    return staying


class LossWindow:
    """The members' training losses since the last sync point, kept on the device."""

    def __init__(self, device: torch.device, size: int):
        self.total = torch.zeros(size, device=device)
        self.last = torch.full((size,), math.nan, device=device)

    def add(self, losses: torch.Tensor) -> None:
        self.last = losses
        self.total += losses  # finite only while every loss since the last read is

    def read(self, world: int) -> tuple[list[float], list[bool]]:
        """(each member's last loss averaged over ranks, whether every loss of every rank since
        the last read was finite). One host sync and, under DDP, one all_reduce; every rank
        must call it on the same step."""
        both = torch.stack([self.last.float(), self.total.float()])  # (2, K)
        if world > 1:
            dist.all_reduce(both)
        last, total = both.tolist()
        self.total.zero_()
        return [x / world for x in last], [math.isfinite(x) for x in total]

    def keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.total.device)
        self.total, self.last = self.total.index_select(0, index), self.last.index_select(0, index)


class GroupClock:
    """Splits the group's wall time among the members training at each moment (a run alone
    gets all of it), so the members' times add up to the group's."""

    def __init__(self):
        self.mark = time.perf_counter()

    def charge(self, members: list[Member]) -> None:
        now = time.perf_counter()
        for m in members:
            m.state.wall_time_s += (now - self.mark) / len(members)
        self.mark = now


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def sync_points(step: int, tc: TrainConfig) -> tuple[bool, bool, bool]:
    """(log, evaluate, checkpoint): what is due after `step` steps. Any of them makes the step a
    sync point, where the loop reads the losses since the last one (a pack saves nothing, but
    syncs there too, so a member stops where its run alone would)."""
    last = step == tc.steps
    return (step % tc.log_every == 0 or last, step % tc.eval_every == 0 or last,
            bool(tc.ckpt_every) and step % tc.ckpt_every == 0 and not last)


def loss_divergence(loss_value: float, step: int, window_start: int) -> str:
    """Why a run stops when a training loss since the last sync point was not finite."""
    if not math.isfinite(loss_value):
        return f"loss is {loss_value} at step {step}"
    return f"loss was not finite at a step in {window_start}..{step}"


def validation_divergence(val: float, initial: float, step: int, factor: float) -> str | None:
    """Why a run stops at this validation loss (not finite, or above factor x its start), or
    None when it goes on."""
    if not math.isfinite(val) or val > factor * initial:
        return f"validation loss {val:.4g} at step {step} is above {factor} x its start {initial:.4g}"
    return None


def train(cfg: Config, on_eval: EvalCallback | None = None,
          dataset: ImageDataset | None = None,
          on_model: Callable[[nn.Module], None] | None = None) -> TrainResult:
    """Train `cfg` and return its result (its final validation loss and other metrics).

    The run writes in train.run_dir (null: a new runs/train/<date>_<time>), which it locks.
    A directory that already holds a run is refused unless train.resume is true and the
    config matches; then the run continues from run_dir/last.pt (`rundir`, `checkpoint`).

    on_eval(step, values) runs after every evaluation (a sweep reports to Optuna
    there and may raise to prune: the exception comes out of train()); on_model(model) runs
    once the model is built (the coordinate check registers its hooks there)."""
    (outcome,) = train_group([cfg], [on_eval], dataset, on_model)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def train_group(cfgs: list[Config], on_evals: list[EvalCallback | None] | None = None,
                dataset: ImageDataset | None = None,
                on_model: Callable[[nn.Module], None] | None = None) -> list[MemberOutcome]:
    """Train `cfgs` as one group; return each member's outcome, in the order given.

    on_evals[k](step, values) runs after member k's every evaluation; if it raises an
    Exception, member k leaves the group there and the exception is its outcome's `error`
    (anything else, such as KeyboardInterrupt, stops the group). More than one member: they
    may differ only in the per-member keys (`config.per_member_keys`), and each one's wall time is its share of the
    group's. on_model(model) runs on each member's model as it is built."""
    group = setup(cfgs, dataset, on_model, on_evals)
    try:
        _loop(group)
    finally:
        group.close()
    return [MemberOutcome(m.result, m.error) for m in group.everyone]


def _loop(group: Group) -> None:
    """Evaluate, then step until train.steps, syncing at log / eval / checkpoint steps."""
    tc = group.cfg.train
    clock = GroupClock()
    if not group.members[0].state.history:  # not resumed
        _leave(group, evaluate(group), clock)
    group.weights.module.train()
    window, loss_value = LossWindow(group.device, len(group.members)), math.nan
    synced_at = group.step
    with Progress(tc.progress and group.rank == 0, tc.steps, group.step,
                  group.everyone[0].run_dir) as advance:
        while group.members and group.step < tc.steps:
            window.add(train_step(group))
            step = group.step
            log_due, eval_due, ckpt_due = sync_points(step, tc)
            if not (log_due or eval_due or ckpt_due):
                advance(step, loss_value)
                continue
            # A sync point, on the same step on every rank: all take the same decision below,
            # or the ones that went on would hang. Checkpoint steps are sync points too, so a
            # non-finite loss is caught before its weights are saved.
            losses, finite = window.read(group.world)
            window_start, synced_at = synced_at + 1, step
            clock.charge(group.members)
            for k, m in enumerate(group.members):
                if log_due:
                    m.metrics.write({"step": step, "loss": losses[k], **group.optimizer.logged_lrs(k),
                                     "time_s": m.state.wall_time_s})
                if not finite[k]:
                    m.result.diverged = True
                    m.result.reason = loss_divergence(losses[k], step, window_start)
            loss_value = losses[0]
            if log_due:
                advance.log(step, loss_value, group.optimizer.logged_lrs(0)["lr"])
            advance(step, loss_value)
            _leave(group, [k for k, ok in enumerate(finite) if ok], clock, window)
            if eval_due and group.members:
                _leave(group, evaluate(group), clock, window)
            if ckpt_due and group.checkpoints and group.members:
                save_checkpoint(group.members[0].state, group.members[0].run_dir / "last.pt")
    clock.charge(group.members)
    for m in group.members:
        _finish(group, m)


def _leave(group: Group, staying: list[int], clock: GroupClock,
           window: LossWindow | None = None) -> None:
    """Members not in `staying` leave the group: their time is charged and their result filled."""
    if len(staying) == len(group.members):
        return
    clock.charge(group.members)
    for k, m in enumerate(group.members):
        if k not in staying:
            _finish(group, m)
    group.keep(staying)
    if window is not None and staying:
        window.keep(staying)


def _finish(group: Group, m: Member) -> None:
    """Fill in member m's result; unless it diverged, save its checkpoint and sample grid (a
    group of one), and write its result.json (unless its on_eval raised: a run that raised
    out of train() writes none)."""
    tc, state, result = m.cfg.train, m.state, m.result
    result.steps = state.step
    result.wall_time_s = state.wall_time_s
    result.flops = float(group.flops_per_step * state.step)
    result.history = state.history
    if state.history:
        result.initial_validation_loss = state.history[0][VALIDATION_LOSS]
    result.metrics = final_metrics(state.history, state.step, result.diverged)
    result.validation_loss = result.metrics[VALIDATION_LOSS]
    if m.error is not None:
        return
    if not result.diverged and group.checkpoints and tc.save:
        save_checkpoint(state, m.run_dir / "last.pt")
        own = group.ema if group.ema is not None else group.weights.module
        with writing(m.run_dir / "model"):
            result.own_format = save_own_format(own, m.run_dir)  # a user's class loads it itself
        if tc.samples > 0:
            result.samples_path = str(m.run_dir / "samples.png")
            sample_model = group.ema if group.ema is not None else group.weights.module
            with writing(Path(result.samples_path)):
                save_sample_grid(sample_model, group.diffusion, group.spec, tc.samples,
                                 m.cfg.diffusion, Path(result.samples_path), seed=tc.seed,
                                 device=group.device, class_names=group.dataset.class_names,
                                 conditioner=group.conditioner, decode=latent_decoder(m.cfg, group))
    if group.rank == 0:
        write_text(m.run_dir / "result.json", json.dumps(result.to_dict(), indent=2))


def latent_decoder(cfg: Config, group: Group) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """data.vae's decoder of the model's latents into images (latents are trained scaled by
    data.latent_scale: the VAE gets them unscaled); None without one, and then the grid shows
    raw latents, which the log says too."""
    if cfg.data.vae is None:
        if group.spec.channels not in (1, 3) and group.rank == 0:
            sys.stderr.write(f"samples.png: {raw_latents_note(group.spec.channels)}\n")
        return None
    vae = load_vae(cfg.data.vae, group.device, what="data.vae=")
    return lambda latents: decode_latents(vae, latents / cfg.data.latent_scale)


def final_metrics(history: list[dict], steps: int, diverged: bool) -> dict[str, float]:
    """A run's result: its last evaluation's values; each metric's worst (inf for a loss) for
    a run that diverged on a non-finite training loss, whose last weights were never evaluated
    (an earlier evaluation must not stand for them)."""
    last = history[-1] if history else {"step": -1, VALIDATION_LOSS: math.nan}
    values = {k: v for k, v in last.items() if k != "step"}
    if diverged and not (last["step"] == steps and all(math.isfinite(v) for v in values.values())):
        return {k: METRICS[k].worst if k in METRICS else math.inf for k in values}
    return values
