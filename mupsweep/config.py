"""Structured configs: the single source of truth for every knob, and Hydra composition.

Every field has a comment saying what it is. Hydra YAML files under `mupsweep/configs/` fill
these dataclasses; merging into the dataclass schema rejects unknown keys and wrong types, so a
typo on the command line is an error, not a silently ignored override.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mupsweep.errors import UserError
from mupsweep.util import first_line

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    arch: str = "dit"  # registry name: dit | uvit | pixart | mmdit
    parametrization: str = "mup"  # mup | sp: the one switch between muP and standard param.
    width: int = 64  # D = heads x head_dim
    depth: int = 4  # number of transformer blocks
    head_dim: int = 16  # fixed while width grows (width grows by heads, as in the paper)
    patch_size: int = 2
    mlp_ratio: float = 4.0
    learn_sigma: bool = False  # predict the variance too (DiT's learned-range sigma, hybrid loss)
    class_dropout: float = 0.1  # label dropout for classifier-free guidance (null class)
    base_width: int = 32  # muP base shape width; must be <= width and divisible by head_dim
    delta_width: int | None = None  # second width for base shapes (default 2 x base_width)
    init_mult: float = 1.0  # sigma_init: global multiplier on every init std (an HP)
    output_mult: float = 1.0  # multiplier on the readout (MuReadout's output_mult; an HP)
    attn_mult: float = 1.0  # multiplier on the attention logit scale
    adaln_zero: bool | None = None  # zero-init adaLN modulation; None = mup: False, sp: True
    # Extra architecture-specific settings (U-ViT skips, PixArt/MMDiT text dims, ...).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = "digits"  # digits | fashion_mnist | image_folder | latents
    root: str | None = None  # directory or file; default depends on the dataset
    val_fraction: float = 0.1  # share of items held out for the validation loss
    split_seed: int = 0  # the train/validation split depends on this seed only
    image_size: int | None = None  # resize (image_folder); None keeps the dataset's size
    grayscale: bool = False  # image_folder: load as 1 channel instead of RGB
    max_items: int | None = None  # use only the first N items (after a seeded shuffle)
    latent_scale: float = 1.0  # latents: multiply stored latents by this (SD VAE: 0.18215)


@dataclass
class DiffusionConfig:
    kind: str = "ddpm"  # ddpm (eps-prediction) | rectified_flow
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sample_steps: int = 50  # DDIM / Euler steps for sample grids
    cfg_scale: float = 4.0  # classifier-free guidance scale for sample grids


@dataclass
class OptimConfig:
    lr: float = 2e-3  # base learning rate (muP: the lr of input/vector/output params)
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.1  # cosine decays to lr x this
    grad_clip: float = 0.0  # max grad norm; 0 disables


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 64  # global batch (split across DDP ranks)
    seed: int = 0  # weights, data order and noise
    eval_every: int = 100  # validation loss every N steps (and at the end)
    val_size: int = 256  # fixed (x0, t, noise) triples for the deterministic validation loss
    val_seed: int = 1234  # seed of those triples (fixed across trials so losses compare)
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    ema_decay: float = 0.0  # 0 disables EMA
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_dir: str = "runs/train"
    resume: bool = True  # continue from run_dir/last.pt when it exists
    save: bool = True  # write last.pt and the sample grid at the end (sweep trials: false)
    samples: int = 16  # images in the final sample grid (0: none)
    progress: bool = True  # rich progress bar on stderr
    diverge_factor: float = 3.0  # stop as diverged when loss > factor x first loss (or NaN)


@dataclass
class CoordCheckConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    steps: int = 4  # training steps recorded (activations of steps 1..steps)
    seeds: int = 3  # repeats averaged per width
    lr: float = 1e-2
    batch_size: int = 32
    tolerance: float = 0.3  # max |slope| of log2 mean|act| vs log2 width to pass
    out_dir: str = "runs/coord_check"


@dataclass
class SweepParam:
    """One axis of the search space (see mupsweep.sweep.space for how each type is suggested)."""

    name: str = ""  # config key, e.g. optim.lr or model.init_mult
    type: str = "float"  # float | int | categorical
    low: float | None = None  # float/int: lower bound (log2: lower exponent)
    high: float | None = None  # float/int: upper bound (log2: upper exponent)
    log: bool = False  # float: sample in log space (base e)
    log2: bool = False  # float: sample the exponent e in [low, high] and use 2**e
    step: float | None = None  # float/int: grid spacing (log2: of the exponent; grid default 1)
    choices: list[Any] | None = None  # categorical: the values


@dataclass
class SweepConfig:
    """`mupsweep tune`: an Optuna study over proxy widths (mupsweep/tune.py)."""

    n_trials: int = 20  # global budget across all workers (COMPLETE + PRUNED trials)
    proxy_widths: list[int] = field(default_factory=lambda: [64])  # every HP set runs at each
    sampler: str = "tpe"  # tpe | gp | random | grid
    pruner: str = "hyperband"  # hyperband | successive_halving | median | none
    seed: int = 0  # sampler seed: trial n samples from a stream seeded by (seed, n)
    study: str = "mupsweep"  # Optuna study name
    storage: str | None = None  # SQLAlchemy URL or journal file; None: sqlite out_dir/study.db
    out_dir: str = "runs/sweep"  # study.db (default storage), trials/, trials.csv, best.json
    heartbeat_s: int = 10  # RDB storages: a killed worker's trial FAILs after the grace period
    grace_s: int | None = None  # heartbeat grace period; None: 2 x heartbeat_s (Optuna's default)
    max_retry: int = 2  # a trial failed by a dead worker is re-queued at most this many times
    params: list[SweepParam] = field(default_factory=list)  # empty: log2 lr / init / output mult


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    coord: CoordCheckConfig = field(default_factory=CoordCheckConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    provenance: dict[str, Any] = field(default_factory=dict)  # written by `transfer`


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def _to_config(node: Any) -> Config:
    """Merge a DictConfig into the schema (rejects unknown keys) and return a plain dataclass."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, node)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(f"config error: {first_line(e)}") from None
    check_config(cfg)
    return cfg


def compose(overrides: list[str] | None = None, config_file: str | None = None) -> Config:
    """Build a Config from the packaged Hydra configs plus `key=value` overrides.

    With `config_file` (a resolved YAML from `transfer` or a run directory) that file is the
    base instead of the packaged defaults, and overrides apply on top of it.
    """
    overrides = list(overrides or [])
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            base = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry multi-line messages
            raise UserError(f"config file {path} is not valid YAML: {first_line(e)}") from None
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0].lstrip("+")
            if "." not in key:
                raise UserError(
                    f"override {item!r}: config groups cannot be switched with --config; "
                    "give a field such as model.width=256"
                )
        try:
            dot = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
        except OmegaConfBaseException as e:
            raise UserError(f"bad override: {first_line(e)}") from None
        return _to_config(OmegaConf.merge(base, dot))

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    ConfigStore.instance().store(name="schema", node=Config)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            node = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({first_line(e.__cause__)})" if e.__cause__ is not None else ""
        raise UserError(f"config error: {first_line(e)}{cause}") from None
    finally:
        GlobalHydra.instance().clear()
    return _to_config(node)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any] | DictConfig) -> Config:
    return _to_config(OmegaConf.create(d) if isinstance(d, dict) else d)


def set_by_path(cfg: Config, key: str, value: Any) -> None:
    """Set `model.width`-style keys on a Config dataclass (used by sweeps and coord-check)."""
    obj: Any = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p):
            raise UserError(f"unknown config key {key!r}")
        obj = getattr(obj, p)
    if not hasattr(obj, parts[-1]) and not isinstance(obj, dict):
        raise UserError(f"unknown config key {key!r}")
    if isinstance(obj, dict):
        obj[parts[-1]] = value
    else:
        setattr(obj, parts[-1], value)


# --------------------------------------------------------------------------------------------
# Validation: every message names the key and says what would be valid
# --------------------------------------------------------------------------------------------


def check_config(cfg: Config) -> None:
    """Raise UserError naming the first invalid value (checks across fields the schema's types
    cannot express: divisibility, ranges, allowed names)."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    if m.parametrization not in ("mup", "sp"):
        raise UserError(f"model.parametrization={m.parametrization!r}: use mup or sp")
    for key, value in (("model.width", m.width), ("model.head_dim", m.head_dim),
                       ("model.depth", m.depth), ("model.patch_size", m.patch_size),
                       ("model.base_width", m.base_width)):
        if value <= 0:
            raise UserError(f"{key}={value} must be a positive integer")
    if m.width % m.head_dim:
        raise UserError(
            f"model.width={m.width} is not divisible by model.head_dim={m.head_dim}; "
            f"width = heads x head_dim, try {max(1, m.width // m.head_dim) * m.head_dim}"
        )
    if m.base_width % m.head_dim:
        raise UserError(f"model.base_width={m.base_width} is not divisible by model.head_dim={m.head_dim}")
    if m.base_width > m.width:
        raise UserError(
            f"model.base_width={m.base_width} is larger than model.width={m.width}; "
            "the base width is the narrow reference model, set it <= width"
        )
    if m.delta_width is not None and (m.delta_width == m.base_width or m.delta_width % m.head_dim):
        raise UserError(f"model.delta_width={m.delta_width} must differ from base_width and be divisible by head_dim")
    for key, value in (("model.init_mult", m.init_mult), ("model.output_mult", m.output_mult),
                       ("model.attn_mult", m.attn_mult)):
        if not value > 0:
            raise UserError(f"{key}={value} must be > 0")
    if not o.lr > 0:
        raise UserError(f"optim.lr={o.lr} must be > 0")
    if o.schedule not in ("constant", "cosine"):
        raise UserError(f"optim.schedule={o.schedule!r}: use constant or cosine")
    if o.warmup_steps < 0 or o.weight_decay < 0 or o.grad_clip < 0:
        raise UserError("optim.warmup_steps, optim.weight_decay and optim.grad_clip must be >= 0")
    if t.steps < 0 or t.batch_size <= 0 or t.eval_every <= 0 or t.val_size <= 0:
        raise UserError("train.steps >= 0, train.batch_size, train.eval_every and train.val_size > 0 required")
    if t.precision not in ("fp32", "bf16"):
        raise UserError(f"train.precision={t.precision!r}: use fp32 or bf16")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if cfg.diffusion.kind not in ("ddpm", "rectified_flow"):
        raise UserError(f"diffusion.kind={cfg.diffusion.kind!r}: use ddpm or rectified_flow")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
