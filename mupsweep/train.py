"""The training loop: one `train(cfg)` serves full runs, proxy trials and coordinate checks.

A sweep trial is a short `train()` call with an `on_eval` callback that reports the
validation loss to Optuna (and may raise to prune). Under torchrun the same function runs DDP:
every rank draws the whole global batch from the same generators and keeps its slice, so the
averaged gradient equals the single-process one.

Read top to bottom: `setup` builds a `Run` (model, optimizer, data, resume), `train_step` takes
one optimizer step, `evaluate` measures the fixed validation loss, and `train` loops them.
Everything a checkpoint holds is one `checkpoint.RunState`. The loss stays on the device
between sync points (log, eval and checkpoint steps, and the last): reading it every step
would make the host wait for the accelerator each step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mupsweep.checkpoint import RunState, restore, save_checkpoint
from mupsweep.config import Config, TrainConfig, to_yaml
from mupsweep.data import ImageDataset, load_dataset
from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow, make_diffusion
from mupsweep.errors import UserError
from mupsweep.images import save_sample_grid
from mupsweep.models import DataSpec
from mupsweep.parametrize import (
    build_model,
    data_spec_of,
    make_conditioner,
    make_optimizer,
    role_groups,
)
from mupsweep.rundir import RunDirLock, open_run_dir, without_passwords
from mupsweep.conditioning import Conditioner, LabelConditioner
from mupsweep.util import append_lines, atomic_write_text, first_line

EvalCallback = Callable[[int, float], None]


@dataclass
class TrainResult:
    validation_loss: float  # at the last step (the sweep objective)
    initial_validation_loss: float  # at step 0, before any update
    steps: int  # steps actually trained
    wall_time_s: float  # this process's training time (a resumed run adds its earlier time)
    flops: float  # analytic training FLOPs spent (3 x forward)
    diverged: bool = False
    reason: str = ""
    run_dir: str = ""
    history: list[dict] = field(default_factory=list)  # [{"step", "validation_loss"}, ...]
    samples_path: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name}: no CUDA device is available here; use cpu or auto")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:  # "cuda" means this process's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Relative lr factor per step. LambdaLR multiplies each group's own initial lr, so muP's
    per-group lr (hidden lr / m) survives warmup and decay."""
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


class FixedValidationSet:
    """Fixed (x0, t, noise) triples drawn once from a seeded generator, so the validation loss
    of given weights is one deterministic number, comparable across trials and widths."""

    def __init__(self, dataset: ImageDataset, diffusion: GaussianDiffusion | RectifiedFlow, size: int,
                 seed: int, device: torch.device, conditioner: Conditioner | None = None):
        g = torch.Generator().manual_seed(seed)
        n_val = dataset.val_images.shape[0]
        idx = torch.arange(size) % n_val  # cycle when asking for more triples than images
        self.x0 = dataset.val_images[idx].to(device)
        self.y = dataset.val_labels[idx].to(device)
        self.t = diffusion.sample_timesteps(size, g, torch.device("cpu")).to(device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device)
        conditioner = conditioner or LabelConditioner(data_spec_of(dataset))
        self.cond = conditioner.to(device)(self.y)  # no generator: fixed (caption template 0)

    @torch.no_grad()
    def loss(self, model: nn.Module, diffusion: GaussianDiffusion | RectifiedFlow, batch_size: int,
             autocast: Callable[[], torch.autocast]) -> float:
        was_training = model.training
        model.eval()
        total, n = 0.0, self.x0.shape[0]
        for i in range(0, n, batch_size):
            s = slice(i, i + batch_size)
            with autocast():
                cond = {k: v[s] for k, v in self.cond.items()}
                per_sample = diffusion.loss(model, self.x0[s], self.t[s], self.noise[s], cond)
            total += per_sample.float().sum().item()
        model.train(was_training)
        return total / n


def make_ema(model: nn.Module, cfg: Config, spec: DataSpec, device: torch.device) -> nn.Module:
    """EMA weights in a freshly built model (which has its own base shapes): mup's infshape
    does not survive copy.deepcopy, so we copy tensors, never the module. (Our own EMA for
    that reason: torch's `swa_utils.AveragedModel` deep-copies the module, and its copy has
    lost the base shapes that MuReadout's output scaling reads.)"""
    ema = build_model(cfg.model, spec, device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run's fixed pieces, built once by `setup`; what changes as it trains is in `state`."""

    cfg: Config
    state: RunState  # model, optimizer, scheduler, EMA, generators, step, history
    device: torch.device
    rank: int
    world: int
    run_dir: Path
    dataset: ImageDataset
    conditioner: Conditioner  # labels -> the model's cond dict
    diffusion: GaussianDiffusion | RectifiedFlow
    val_set: FixedValidationSet
    forward_model: nn.Module  # the model as training calls it: DDP-wrapped and/or compiled
    metrics: _MetricsLog
    train_x: torch.Tensor  # (N, C, H, W) every training image, on the device
    train_y: torch.Tensor  # (N,)
    local: slice  # this rank's part of the global batch
    lock: RunDirLock | None  # rank 0's lock on run_dir, held until the run ends
    role_groups: dict[str, int]  # muP role -> index of its optimizer param group

    def lrs(self) -> dict[str, float]:
        """The base lr and each role's lr, read from the optimizer (after the schedule)."""
        groups = self.state.optimizer.param_groups
        return lr_record(self.cfg.optim.lr * groups[0]["lr"] / groups[0]["initial_lr"],
                         {role: groups[i]["lr"] for role, i in self.role_groups.items()})

    @property
    def spec(self) -> DataSpec:
        return self.conditioner.data_spec

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "last.pt"

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.precision == "bf16")


def lr_record(base_lr: float, role_lrs: dict[str, float]) -> dict[str, float]:
    """What metrics.jsonl logs of the lrs, both after the schedule: "lr", the base lr
    (optim.lr), and "lr_<role>" for each muP role (a pack's members log the same keys)."""
    return {"lr": base_lr, **{f"lr_{role}": lr for role, lr in role_lrs.items()}}


def setup(cfg: Config, dataset: ImageDataset | None = None,
          on_model: Callable[[nn.Module], None] | None = None) -> Run:
    """Everything before the first step: the run directory (a new one when train.run_dir is
    null; locked; resumed from its last.pt with train.resume), model, optimizer and data.
    The caller releases `run.lock` when the run ends (`train` does)."""
    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _init_distributed(device)
    if tc.batch_size % world:
        raise UserError(f"train.batch_size={tc.batch_size} is not divisible by {world} processes")
    run_dir, lock = _open_run_dir(cfg, rank, world)
    if rank == 0 and world > 1:
        # train.batch_size is the global batch, whatever the number of processes: each rank
        # trains on its slice (`Run.local`), so the results match one process's run.
        sys.stderr.write(world_size_line(world, tc.batch_size) + "\n")
        sys.stderr.flush()
    try:
        return _build(dataclasses.replace(cfg, train=dataclasses.replace(tc, run_dir=str(run_dir))),
                      device, rank, world, run_dir, lock, dataset, on_model)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def world_size_line(world: int, batch_size: int) -> str:
    """What a distributed run says at start (rank 0): the world size, and that
    train.batch_size is the global batch split across the ranks."""
    return (f"world size {world}: train.batch_size={batch_size} is the global batch, "
            f"{batch_size // world} per rank")


def _open_run_dir(cfg: Config, rank: int, world: int) -> tuple[Path, RunDirLock | None]:
    """Rank 0 creates, locks and checks the run directory (`rundir.open_run_dir`) and tells the
    other ranks where it is, or why it refused: every rank must stop with the same error."""
    lock, outcome = None, None
    if rank == 0:
        try:
            run_dir, lock = open_run_dir(cfg)
            outcome = str(run_dir)
        except UserError as e:
            outcome = e
    if world > 1:
        box = [outcome if isinstance(outcome, str) else ("error", str(outcome))]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0] if isinstance(box[0], str) else UserError(box[0][1])
    if isinstance(outcome, UserError):
        raise outcome
    return Path(outcome), lock


def _build(cfg: Config, device: torch.device, rank: int, world: int, run_dir: Path,
           lock: RunDirLock | None, dataset: ImageDataset | None,
           on_model: Callable[[nn.Module], None] | None) -> Run:
    """`setup` once the run directory is settled (cfg.train.run_dir is the resolved one)."""
    tc = cfg.train
    dataset = dataset or load_dataset(cfg.data)
    conditioner = make_conditioner(cfg, dataset).to(device)
    diffusion = make_diffusion(cfg.diffusion)
    torch.manual_seed(tc.seed)  # weights: same seed, same init on every rank
    try:
        model = build_model(cfg.model, conditioner.data_spec, device)
    except ValueError as e:
        raise UserError(f"model config: {e}") from None
    if on_model is not None:
        on_model(model)
    optimizer = make_optimizer(model, cfg.model, cfg.optim)
    # The config as files may hold it (a storage URL's password hidden): the checkpoint stores
    # the state's config and resume compares with it, and config.yaml is written from it.
    # Training reads the run's own cfg; a password never changes what a run computes.
    written_cfg = without_passwords(cfg)
    state = RunState(
        written_cfg, model, optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
        ema=make_ema(model, cfg, conditioner.data_spec, device) if tc.ema_decay > 0 else None,
        gen_index=torch.Generator().manual_seed(tc.seed + 1),  # which images
        gen_noise=torch.Generator(device).manual_seed(tc.seed + 2),  # t, noise, dropout, captions
    )
    val_set = FixedValidationSet(dataset, diffusion, tc.val_size, tc.val_seed, device, conditioner)
    if tc.resume and (run_dir / "last.pt").exists():
        restore(state, run_dir / "last.pt")
    if rank == 0:  # only now: a config is never written over another config's weights
        _write_text(run_dir / "config.yaml", to_yaml(written_cfg))

    forward_model: nn.Module = model
    if world > 1:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        forward_model = torch.compile(forward_model)
    return Run(
        cfg=cfg, state=state, device=device, rank=rank, world=world, run_dir=run_dir,
        dataset=dataset, conditioner=conditioner, diffusion=diffusion, val_set=val_set,
        forward_model=forward_model, lock=lock, role_groups=role_groups(model, optimizer),
        metrics=_MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step, enabled=rank == 0,
                            tensorboard_dir=run_dir / "tensorboard" if tc.tensorboard else None,
                            batch_size=tc.batch_size),
        train_x=dataset.train_images.to(device), train_y=dataset.train_labels.to(device),
        local=slice(rank * tc.batch_size // world, (rank + 1) * tc.batch_size // world),
    )


# --------------------------------------------------------------------------------------------
# Step and evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One global batch as a run draws it (`draw_batch`)."""

    x0: torch.Tensor  # (B, C, H, W) images
    t: torch.Tensor  # (B,) timesteps
    noise: torch.Tensor  # (B, C, H, W)
    drop: torch.Tensor  # (B,) bool: conditioning nulled (classifier-free guidance)
    cond: dict[str, torch.Tensor]  # the model's conditioning, from the labels


def draw_indices(num_images: int, batch_size: int, gen_index: torch.Generator) -> torch.Tensor:
    """Which training images the next global batch holds: (B,) on the CPU, from gen_index."""
    return torch.randint(0, num_images, (batch_size,), generator=gen_index)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`. CUDA: through pinned memory without a wait, so the host
    runs on instead of blocking on a pageable copy every step."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def draw_batch(cfg: Config, run_data: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor,
               diffusion: GaussianDiffusion | RectifiedFlow, conditioner: Conditioner,
               gen_noise: torch.Generator) -> Batch:
    """The global batch of images `idx` (`draw_indices`, on the device) of run_data = (train_x,
    train_y), with what gen_noise draws for it in this order: timesteps, noise, dropout, caption
    templates. Every rank and every member of a pack draws through here, so a run's batches
    depend on its generators and nothing else."""
    train_x, train_y = run_data
    device, B = train_x.device, idx.shape[0]
    x0, y = train_x[idx], train_y[idx]  # (B, C, H, W), (B,)
    t = diffusion.sample_timesteps(B, gen_noise, device)  # (B,)
    noise = torch.randn(x0.shape, generator=gen_noise, device=device)
    drop = torch.rand(B, generator=gen_noise, device=device) < cfg.model.class_dropout
    cond = conditioner(y, gen_noise)  # text models draw a caption template per sample
    return Batch(x0, t, noise, drop, cond)


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step on the next global batch. Returns this rank's loss, still on the
    device: reading it here would make the host wait for the accelerator every step."""
    cfg, state, device = run.cfg, run.state, run.device
    local = run.local
    # The whole global batch, identical on every rank; each rank keeps its slice.
    idx = to_device(draw_indices(run.train_x.shape[0], cfg.train.batch_size, state.gen_index), device)
    b = draw_batch(cfg, (run.train_x, run.train_y), idx, run.diffusion, run.conditioner,
                   state.gen_noise)
    with run.autocast():
        loss = run.diffusion.loss(run.forward_model, b.x0[local], b.t[local], b.noise[local],
                                  {k: v[local] for k, v in b.cond.items()}, b.drop[local]).mean()
    loss.backward()
    if cfg.optim.grad_clip > 0:
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        update_ema(state.ema, state.model, cfg.train.ema_decay)
    state.step += 1
    return loss.detach()


def evaluate(run: Run, on_eval: EvalCallback | None) -> float:
    """The fixed validation loss of the current weights, recorded in the history and
    metrics.jsonl, then handed to on_eval (which may raise to prune)."""
    state = run.state
    val = run.val_set.loss(state.model, run.diffusion, max(run.cfg.train.batch_size, 64),
                           run.autocast)
    state.history.append({"step": state.step, "validation_loss": val})
    run.metrics.write({"step": state.step, "validation_loss": val})
    if on_eval is not None:
        on_eval(state.step, val)
    return val


class LossWindow:
    """The training losses since the last sync point, kept on the device."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.last = torch.full((), math.nan, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.last = loss
        self.total += loss  # finite only while every loss since the last read is

    def read(self, world: int) -> tuple[float, bool]:
        """(the last step's loss averaged over ranks, whether every loss of every rank since
        the last read was finite). One host sync and, under DDP, one all_reduce; every rank
        must call it on the same step."""
        both = torch.stack([self.last.float(), self.total.float()])
        if world > 1:
            dist.all_reduce(both)
        last, total = both.tolist()
        self.total.zero_()
        return last / world, math.isfinite(total)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def sync_points(step: int, tc: TrainConfig) -> tuple[bool, bool, bool]:
    """(log, evaluate, checkpoint): what is due after `step` steps. Any of them makes the step a
    sync point, where the loop reads the losses since the last one."""
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
    """Train `cfg` and return its final validation loss.

    The run writes in train.run_dir (null: a new runs/train/<date>_<time>), which it locks.
    A directory that already holds a run is refused unless train.resume is true and the
    config matches; then the run continues from run_dir/last.pt (`rundir`, `checkpoint`).

    on_eval(step, validation_loss) runs after every evaluation (a sweep reports to Optuna
    there and may raise to prune); on_model(model) runs once the model is built (the
    coordinate check registers its hooks there)."""
    run = setup(cfg, dataset, on_model)
    try:
        return _loop(run, on_eval)
    finally:
        run.metrics.close()
        if run.lock is not None:
            run.lock.release()


def _loop(run: Run, on_eval: EvalCallback | None) -> TrainResult:
    """Evaluate, then step until train.steps, syncing at log / eval / checkpoint steps."""
    tc, state = run.cfg.train, run.state
    result = TrainResult(math.nan, math.nan, state.step, 0.0, 0.0, run_dir=str(run.run_dir))
    state.start_clock()
    if not state.history:
        evaluate(run, on_eval)
    result.initial_validation_loss = state.history[0]["validation_loss"]
    state.model.train()
    window, loss_value, synced_at = LossWindow(run.device), math.nan, state.step
    with _progress(tc.progress and run.rank == 0, tc.steps, state.step, run.run_dir) as advance:
        while state.step < tc.steps:
            window.add(train_step(run))
            step = state.step
            log_due, eval_due, ckpt_due = sync_points(step, tc)
            if not (log_due or eval_due or ckpt_due):
                advance(step, loss_value)
                continue
            # A sync point, on the same step on every rank: all take the same decision below,
            # or the ones that went on would hang. Checkpoint steps are sync points too, so a
            # non-finite loss is caught before its weights are saved.
            loss_value, finite = window.read(run.world)
            window_start, synced_at = synced_at + 1, step
            if log_due:
                lrs = run.lrs()
                run.metrics.write({"step": step, "loss": loss_value, **lrs,
                                   "time_s": state.wall_time_s})
                advance.log(step, loss_value, lrs["lr"])
            advance(step, loss_value)
            if not finite:
                result.diverged = True
                result.reason = loss_divergence(loss_value, step, window_start)
                break
            if eval_due:
                val = evaluate(run, on_eval)
                reason = validation_divergence(val, result.initial_validation_loss, step,
                                               tc.diverge_factor)
                if reason:
                    result.diverged, result.reason = True, reason
                    break
            if ckpt_due and run.rank == 0:
                save_checkpoint(state, run.ckpt_path)
    return _finish(run, result)


def _finish(run: Run, result: TrainResult) -> TrainResult:
    """Fill in the result; unless diverged, save the checkpoint and the sample grid."""
    tc, state = run.cfg.train, run.state
    flops_per_step = 3 * state.model.flops_per_image(run.spec) * tc.batch_size
    result.steps = state.step
    result.wall_time_s = state.wall_time_s
    result.flops = float(flops_per_step * state.step)
    result.history = state.history
    result.validation_loss = final_validation_loss(state.history, state.step, result.diverged)
    if not result.diverged and run.rank == 0 and tc.save:
        save_checkpoint(state, run.ckpt_path)
        if tc.samples > 0:
            result.samples_path = str(run.run_dir / "samples.png")
            sample_model = state.ema if state.ema is not None else state.model
            with _writing(Path(result.samples_path)):
                save_sample_grid(sample_model, run.diffusion, run.spec, tc.samples,
                                 run.cfg.diffusion, Path(result.samples_path), seed=tc.seed,
                                 device=run.device, class_names=run.dataset.class_names,
                                 conditioner=run.conditioner)
    if run.rank == 0:
        _write_text(run.run_dir / "result.json", json.dumps(result.to_dict(), indent=2))
    return result


def final_validation_loss(history: list[dict], steps: int, diverged: bool) -> float:
    """A run's result: its last validation loss; inf for a run that diverged on a non-finite
    training loss, whose last weights were never evaluated (an earlier evaluation must not
    stand for them)."""
    last = history[-1] if history else {"step": -1, "validation_loss": math.nan}
    if diverged and not (last["step"] == steps and math.isfinite(last["validation_loss"])):
        return math.inf
    return last["validation_loss"]


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write (read-only directory, full disk) is one line naming the file."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or first_line(e)}") from None


def _write_text(path: Path, text: str) -> None:
    with _writing(path):
        atomic_write_text(path, text)


class _MetricsLog:
    """metrics.jsonl, one JSON object per line. On resume, lines past the checkpoint's step are
    dropped so the file matches the weights. With `tensorboard_dir` (train.tensorboard=true)
    every record also goes to TensorBoard: train/loss, validation/loss, lr/base and lr/<role>,
    throughput/steps_per_s and images_per_s (events past a resumed step are purged)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool,
                 tensorboard_dir: Path | None = None, batch_size: int = 0):
        self.path, self.enabled, self.batch_size = path, enabled, batch_size
        self.tb, self.last_log = None, None
        if not enabled:
            return
        kept = []
        with _writing(path):
            if resume_step and path.exists():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: everything after it is stale too
            elif path.exists():
                path.unlink()
            if kept:  # replaced whole: a full disk leaves the old file, not half of it
                atomic_write_text(path, "\n".join(kept) + "\n")
        if tensorboard_dir is not None:
            self.tb = tensorboard_writer(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if self.enabled:
            with _writing(self.path):  # a whole line or none: readers never see a torn one
                append_lines(self.path, json.dumps(record) + "\n")
            if self.tb is not None:
                self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "loss":
                self.tb.add_scalar("train/loss", value, step)
            elif key == "validation_loss":
                self.tb.add_scalar("validation/loss", value, step)
            elif key == "lr":
                self.tb.add_scalar("lr/base", value, step)
            elif key.startswith("lr_"):
                self.tb.add_scalar(f"lr/{key[3:]}", value, step)
        if "time_s" in record:
            if self.last_log is not None and record["time_s"] > self.last_log[1]:
                rate = (step - self.last_log[0]) / (record["time_s"] - self.last_log[1])
                self.tb.add_scalar("throughput/steps_per_s", rate, step)
                self.tb.add_scalar("throughput/images_per_s", rate * self.batch_size, step)
            self.last_log = (step, record["time_s"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """A TensorBoard SummaryWriter (needs the `tensorboard` package: the .[tensorboard] extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: "
                        "pip install 'mupsweep[tensorboard]' (or pip install tensorboard)") from None
    with _writing(log_dir):
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class _NoProgress:
    def __call__(self, step: int, loss: float) -> None:
        pass

    def log(self, step: int, loss: float, lr: float) -> None:
        pass


class _progress:
    """Progress on stderr: a rich bar on a terminal; otherwise (SLURM, nohup, CI logs) one
    plain line per `train.log_every` steps: step, loss, lr, steps/s, ETA. Or nothing."""

    def __init__(self, enabled: bool, total: int, start: int, run_dir: Path):
        self.enabled, self.total, self.start, self.run_dir = enabled, total, start, run_dir
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return _NoProgress()
        from rich.console import Console

        console = Console(stderr=True)
        # Said before the first step, so an interrupted run can be found and resumed.
        console.print(f"run dir {self.run_dir} (continue it: mupsweep train --resume {self.run_dir})",
                      highlight=False, soft_wrap=True, markup=False)
        t0, s0 = time.perf_counter(), self.start

        def rate(step: int) -> float:
            return (step - s0) / max(1e-9, time.perf_counter() - t0)

        if not console.is_terminal:
            return _PlainLines(self.total, rate)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"),
                            TextColumn("{task.fields[rate]:.1f} steps/s"), TimeRemainingColumn(),
                            console=console, transient=False)
        self.bar.__enter__()
        task = self.bar.add_task("train", total=self.total, completed=self.start, loss=float("nan"),
                                 rate=0.0)
        bar = self.bar

        class _Bar(_NoProgress):
            def __call__(self, step: int, loss: float) -> None:
                bar.update(task, completed=step, loss=loss, rate=rate(step))

        return _Bar()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


class _PlainLines(_NoProgress):
    """One line per log step, flushed at once, for logs that are files."""

    def __init__(self, total: int, rate: Callable[[int], float]):
        self.total, self.rate = total, rate

    def log(self, step: int, loss: float, lr: float) -> None:
        r = self.rate(step)
        eta = (self.total - step) / r if r > 0 else math.inf
        if math.isfinite(eta):
            minutes, seconds = divmod(int(eta), 60)
            eta_text = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        else:
            eta_text = "-"
        sys.stderr.write(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  "
                         f"{r:.2f} steps/s  ETA {eta_text}\n")
        sys.stderr.flush()
