"""A training group's pieces and how `setup` builds them: each member's run (`Member`: its
config, run directory, generators, metrics, result) and what the members share (`Group`:
weights, optimizer, data, device, DDP and torch.compile), resumed from last.pt for a run alone.

`train.train_group` builds one with `setup` and trains it; a group of one is an ordinary run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mupsweep.batches import FixedValidationSet
from mupsweep.checkpoint import RunState, restore
from mupsweep.conditioning import Conditioner
from mupsweep.config import Config, ModelConfig, to_yaml
from mupsweep.data import ImageDataset, LazyImages, load_dataset
from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow, make_diffusion
from mupsweep.errors import UserError
from mupsweep.evaluation import check_metrics
from mupsweep.flops import config_flops_per_image
from mupsweep.group import GroupWeights, check_packable
from mupsweep.group_adamw import GroupAdamW, read_member_optimizers
from mupsweep.metrics import MetricsLog, write_text
from mupsweep.models import DataSpec
from mupsweep.parametrize import build_model, make_conditioner
from mupsweep.rundir import RunDirLock, open_run_dir, without_passwords
from mupsweep.train_images import ImagesInMemory, StreamedImages
from mupsweep.util import training_flops
from mupsweep.vae import check_vae_for

# on_eval(step, values): after each evaluation, the values measured ({metric name: value},
# validation_loss always; mupsweep.evaluation)
EvalCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    validation_loss: float  # at the last step
    initial_validation_loss: float  # at step 0, before any update
    steps: int  # steps actually trained
    wall_time_s: float  # this process's training time (a resumed run adds its earlier time)
    flops: float  # analytic training FLOPs spent (3 x forward)
    diverged: bool = False
    reason: str = ""
    run_dir: str = ""
    history: list[dict] = field(default_factory=list)  # [{"step", "validation_loss"}, ...]
    samples_path: str | None = None
    # a user's model saved where its own code loads it (models/user.save_own_format), or why not
    own_format: str = ""
    # every metric measured at the last step ({name: value}, validation_loss included): a
    # sweep's objective is one of them
    metrics: dict[str, float] = field(default_factory=dict)
    eval_time_s: dict[str, float] = field(default_factory=dict)  # seconds spent measuring each

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


def make_ema(model: nn.Module, cfg: ModelConfig, spec: DataSpec, device: torch.device) -> nn.Module:
    """EMA weights in a freshly built model (which has its own base shapes): mup's infshape
    does not survive copy.deepcopy, so we copy tensors, never the module. (Our own EMA for
    that reason: torch's `swa_utils.AveragedModel` deep-copies the module, and its copy has
    lost the base shapes that MuReadout's output scaling reads.)"""
    ema = build_model(cfg, spec, device)
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
class Member:
    """One run of a group: what is its own (config, run directory, generators, history, step,
    wall time, metrics, callback, result), the rest being the group's."""

    cfg: Config  # train.run_dir resolved
    state: RunState  # generators, step, history, wall time (+ model and optimizer: group of one)
    run_dir: Path
    lock: RunDirLock | None  # rank 0's lock on run_dir, held until the group ends
    metrics: MetricsLog
    on_eval: EvalCallback | None
    result: TrainResult
    error: Exception | None = None  # what its on_eval raised, if that is why it left


@dataclass
class Group:
    """A group's fixed pieces, built once by `setup`, and the members still training."""

    cfg: Config  # member 0's: what the members share
    members: list[Member]  # still training, in order
    everyone: list[Member]  # as set up
    weights: GroupWeights  # [K, ...]
    optimizer: GroupAdamW
    ema: nn.Module | None  # a group of one with train.ema_decay > 0
    device: torch.device
    rank: int
    world: int
    dataset: ImageDataset
    conditioner: Conditioner  # labels -> the model's cond dict
    diffusion: GaussianDiffusion | RectifiedFlow
    val_set: FixedValidationSet
    forward_model: nn.Module  # the model as a run alone calls it: DDP-wrapped and/or compiled
    train_images: ImagesInMemory | StreamedImages  # (N, C, H, W): a step's rows on the device
    train_y: torch.Tensor  # (N,) every training label, on the device
    local: slice  # this rank's part of the global batch
    flops_per_step: float  # per member
    checkpoints: bool  # a group of one on rank 0 writes last.pt; a pack never does
    metric_cache: dict = field(default_factory=dict)  # what the metrics compute once (evaluation.MetricInputs)

    @property
    def spec(self) -> DataSpec:
        return self.conditioner.data_spec

    @property
    def step(self) -> int:
        return self.members[0].state.step if self.members else self.everyone[0].state.step

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.train.precision == "bf16")

    def member_model(self, k: int) -> nn.Module:
        """Member k as an ordinary model (base shapes, roles, its current weights): what
        `mupsweep inspect`, `check_roles` and sampling take."""
        model = build_model(self.members[k].cfg.model, self.spec, self.device)
        model.load_state_dict(self.weights.member_state_dict(k))
        return model

    def keep(self, keep: list[int]) -> None:
        """Only the members at positions `keep` stay in the group."""
        if keep and self.weights.stacked:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.weights.keep(index)
            self.optimizer.keep(keep, index)
        self.members = [self.members[k] for k in keep]

    def close(self) -> None:
        """Stop reading images, close every member's metrics and release its run directory."""
        self.train_images.close()
        for m in self.everyone:
            m.metrics.close()
            if m.lock is not None:
                m.lock.release()


def setup(cfgs: list[Config], dataset: ImageDataset | None = None,
          on_model: Callable[[nn.Module], None] | None = None,
          on_evals: list[EvalCallback | None] | None = None) -> Group:
    """Everything before the first step, for every member: its run directory (a new one when
    train.run_dir is null; locked; resumed from its last.pt with train.resume), model,
    optimizer and data. The caller closes the group when it ends (`train_group` does)."""
    check_packable(cfgs)
    tc = cfgs[0].train
    device = resolve_device(tc.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = _init_distributed(device)
    if tc.batch_size % world:
        raise UserError(f"train.batch_size={tc.batch_size} is not divisible by {world} processes")
    opened: list[tuple[Path, RunDirLock | None]] = []
    try:
        for cfg in cfgs:
            opened.append(_open_run_dir(cfg, rank, world))
        if rank == 0 and world > 1:
            # train.batch_size is the global batch, whatever the number of processes: each rank
            # trains on its slice (`Group.local`), so the results match one process's run.
            sys.stderr.write(world_size_line(world, tc.batch_size) + "\n")
            sys.stderr.flush()
        cfgs = [dataclasses.replace(c, train=dataclasses.replace(c.train, run_dir=str(d)))
                for c, (d, _) in zip(cfgs, opened, strict=True)]
        return _build(cfgs, device, rank, world, opened, dataset, on_model,
                      on_evals or [None] * len(cfgs))
    except BaseException:
        for _, lock in opened:
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


def _build(cfgs: list[Config], device: torch.device, rank: int, world: int,
           opened: list[tuple[Path, RunDirLock | None]], dataset: ImageDataset | None,
           on_model: Callable[[nn.Module], None] | None,
           on_evals: list[EvalCallback | None]) -> Group:
    """`setup` once the run directories are settled (each cfg.train.run_dir the resolved one)."""
    cfg, tc, alone = cfgs[0], cfgs[0].train, len(cfgs) == 1
    dataset = dataset or load_dataset(cfg.data)
    if cfg.data.vae is not None:  # checked now, not when the samples are drawn at the end
        check_vae_for(cfg.data.vae, dataset.channels)
    check_metrics(cfg, dataset)  # a metric that cannot be measured is refused before step 1
    conditioner = make_conditioner(cfg, dataset).to(device)
    diffusion = make_diffusion(cfg.diffusion)
    models = []
    for member_cfg in cfgs:
        torch.manual_seed(member_cfg.train.seed)  # weights: same seed, same init on every rank
        try:
            models.append(build_model(member_cfg.model, conditioner.data_spec, device))
        except ValueError as e:
            raise UserError(f"model config: {e}") from None
        if on_model is not None:
            on_model(models[-1])
    weights = GroupWeights(models)
    optimizer = GroupAdamW(weights, read_member_optimizers(models, cfgs), cfgs)
    ema = make_ema(models[0], cfg.model, conditioner.data_spec, device) if alone and tc.ema_decay > 0 else None
    # counted on a meta-built copy (mupsweep.flops): the real model's hooks never see it
    flops_per_step = training_flops(config_flops_per_image(cfg.model, conditioner.data_spec),
                                    tc.batch_size)
    del models[1:]  # their weights are in the stack now
    members = []
    for member_cfg, (run_dir, lock), on_eval in zip(cfgs, opened, on_evals, strict=True):
        # The config as files may hold it (a storage URL's password hidden): the checkpoint
        # stores the state's config and resume compares with it, and config.yaml is written
        # from it. Training reads the run's own cfg; a password never changes what it computes.
        written_cfg = without_passwords(member_cfg)
        seed = member_cfg.train.seed
        state = RunState(
            written_cfg, weights.module if alone else None, optimizer if alone else None, ema,
            gen_index=torch.Generator().manual_seed(seed + 1),  # which images
            gen_noise=torch.Generator(device).manual_seed(seed + 2),  # t, noise, dropout, captions
        )
        if alone and member_cfg.train.resume and (run_dir / "last.pt").exists():
            restore(state, run_dir / "last.pt")
        if rank == 0:  # only now: a config is never written over another config's weights
            write_text(run_dir / "config.yaml", to_yaml(written_cfg))
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step, enabled=rank == 0,
                             tensorboard_dir=run_dir / "tensorboard" if tc.tensorboard else None,
                             batch_size=tc.batch_size)
        members.append(Member(member_cfg, state, run_dir, lock, metrics, on_eval,
                              TrainResult(math.nan, math.nan, state.step, 0.0, 0.0, run_dir=str(run_dir))))

    local = slice(rank * tc.batch_size // world, (rank + 1) * tc.batch_size // world)
    forward_model: nn.Module = weights.module
    if world > 1:
        forward_model = nn.parallel.DistributedDataParallel(
            forward_model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        forward_model = torch.compile(forward_model)
    return Group(
        cfg=cfg, members=list(members), everyone=members, weights=weights, optimizer=optimizer,
        ema=ema, device=device, rank=rank, world=world, dataset=dataset, conditioner=conditioner,
        diffusion=diffusion,
        val_set=FixedValidationSet(dataset, diffusion, tc.val_size, tc.val_seed, device, conditioner),
        forward_model=forward_model,
        train_images=_training_images(dataset, members, cfg, local, device),
        train_y=dataset.train_labels.to(device), local=local,
        flops_per_step=flops_per_step, checkpoints=alone and rank == 0,
    )


def _training_images(dataset: ImageDataset, members: list[Member], cfg: Config, local: slice,
                     device: torch.device) -> ImagesInMemory | StreamedImages:
    """The training images on the device, or a loader reading them from disk from the members'
    generators as they stand (after a resume: as restored)."""
    if isinstance(dataset.train_images, LazyImages):
        return StreamedImages(dataset.train_images, [m.state.gen_index for m in members],
                              cfg.train.batch_size, local, cfg.data.num_workers, device)
    return ImagesInMemory(dataset.train_images, device)
