"""The schema: every config key, its default, what it is, and its rules declared with it.

Every field has a comment saying what it is, and declares its rules through `key()` /
`section()` (mupsweep.config.rules says what each rule means). Rules declared on a section
cover every key in it. Undeclared, a key is an ordinary one: any value of its type, changes a
run's result, in a study's signature, shared by the members of a pack, carried by width
transfer, must match the proxy's in a model preset, and may be swept as a hyperparameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mupsweep.config.rules import (
    AT_LEAST_1,
    BELOW_1,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    PRESET_KEEPS_PROXY,
    PRESET_KEEPS_STUDY,
    PRESET_SETS,
    SEED,
    UNIT,
    YOUR_CLASS,
    Range,
    key,
    section,
)

# Upper bounds on sizes, so that an absurd value is one line of check_config, not the
# allocator's traceback later (or an hour of swapping). Each is far beyond any real use, so
# nothing that could run is refused. They are machine-independent on purpose: a config composed
# here (transfer, --cfg) may be meant for a bigger machine, so this machine's memory is no limit
# on it. Checked once a value is in its valid range.
MAX_WIDTH = 2**16
WIDTH_WHY = "3.5x the widest published transformer, PaLM's 18432"
MAX_DEPTH = 1024
MAX_IMAGE = 2**14
MAX_IMAGES = 2**20
IMAGES_WHY = "every rank draws the whole global batch; published diffusion training uses a few thousand"
MAX_TIMESTEPS = 100_000
TIMESTEPS_WHY = "DDPM and DiT use 1000; the schedule keeps tables of this length"
MAX_TOKENS = 2**14  # caption tokens (PixArt-alpha: 120, SD3: 154; T5's context is 512)
TOKENS_CAP = (MAX_TOKENS, "T5's context is 512 tokens; PixArt-alpha uses 120, SD3 154")
WIDTH_CAP = (MAX_WIDTH, WIDTH_WHY)
DEPTH_CAP = (MAX_DEPTH, "the deepest trained transformers have 1000 layers (DeepNet)")
IMAGES_CAP = (MAX_IMAGES, IMAGES_WHY)
TIMESTEPS_CAP = (MAX_TIMESTEPS, TIMESTEPS_WHY)

# The built-in architectures (mupsweep/models), and those that read captions (model.text_*):
# PixArt-alpha, MMDiT and a user's class whose forward takes them.
BUILTIN_ARCHS = ("dit", "uvit", "pixart", "mmdit")
CAPTION_MODELS = ("pixart", "mmdit", YOUR_CLASS)

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# Why a key is no hyperparameter (`not_hp`): sweep.params refuses it, and transfer refuses a
# study summary whose tuned values hold one. Each one, swept, gives a wrong answer in silence:
# the trials overwrite or never read it, or it changes what the proxy stands for or what the
# trials' losses measure, and best.json and the config transfer writes from it would still
# record a "best" value. Keys that really train as swept stay sweepable, shapes included
# (model.depth, model.patch_size, model.mlp_ratio): every trial builds its model at the swept
# value, and transfer refuses a tuned value that conflicts with the target asked for on its
# command line. A result-neutral key without a reason of its own gets NEUTRAL_WHY.
NEUTRAL_WHY = "it cannot change the validation loss a trial is ranked by, so there is nothing to tune"
SAMPLES_ONLY = NEUTRAL_WHY + " (it only sets how sample grids are drawn)"
BASE_SHAPES = ("muP's base shapes (width = heads x head_dim): the tuned HPs are defined "
               "relative to them, so a study holds them fixed and transfer keeps the proxy's")
DEPTH_BASE = ("CompleteP's base depth and exponent: the tuned HPs are defined relative to "
              "them, so a study holds them fixed and transfer keeps the proxy's")
STUDY_KIND = ("what the study tunes for: best.json and transfer take it from the study's base "
              "config, so a swept value would be reported and transferred as the base one")
OBJECTIVE = ("it defines the validation loss the trials are ranked by: losses under different "
             "values measure different things and do not compare")
SET_BY_TRIAL = "every trial sets it itself (a new run directory, no checkpoint, no progress bar)"
PROXY_WIDTHS = ("every trial trains at each of sweep.proxy_widths, so a swept width would be "
                "overwritten; list the proxy widths in sweep.proxy_widths (transfer sets the "
                "target's with --width)")
DATA = ("the dataset is loaded once per study and every trial trains on it, so a swept "
        "data key would never be read")


@dataclass
class ModelConfig:
    # built-in: dit | uvit | pixart | mmdit; your own class: my_pkg.models:MyDiT,
    # path/to/file.py:MyDiT, or an entry point of the group mupsweep.models (models/user.py)
    arch: str = key("dit", non_empty=True, not_hp=STUDY_KIND)
    # your own class's constructor keyword arguments; ${model.width}, ${model.heads} (= width /
    # head_dim), ${model.depth}, any model key, ${data.image_size}, ${data.channels} and
    # ${data.num_classes} are resolved at every width and depth mupsweep builds
    args: dict[str, Any] = key(factory=dict)
    # mup | sp: the one switch between muP and standard param.
    parametrization: str = key("mup", choices=("mup", "sp"), not_hp=STUDY_KIND,
                               preset=PRESET_KEEPS_STUDY)
    # D = heads x head_dim; every trial sets it to each proxy width, transfer to the target's
    width: int = key(64, valid=AT_LEAST_1, cap=WIDTH_CAP, signature=False, not_hp=PROXY_WIDTHS,
                     preset=PRESET_SETS)
    # number of transformer blocks
    depth: int = key(4, valid=AT_LEAST_1, cap=DEPTH_CAP, transfers=False, preset=PRESET_SETS)
    # fixed while width grows (width grows by heads, as in the paper)
    head_dim: int = key(16, valid=AT_LEAST_1, cap=WIDTH_CAP, transfers=False,
                        preset=PRESET_KEEPS_PROXY, not_hp=BASE_SHAPES)
    patch_size: int = key(2, valid=AT_LEAST_1, cap=(MAX_IMAGE, "no image is wider"),
                          transfers=False)
    mlp_ratio: float = key(4.0, valid=POSITIVE, cap=(64, "transformer MLPs are 4x the width"))
    # predict the variance too (DiT's learned-range sigma, hybrid loss)
    learn_sigma: bool = key(False, not_hp=OBJECTIVE)
    # label dropout for classifier-free guidance (null class)
    class_dropout: float = key(0.1, valid=UNIT, per_member=True)
    # muP base shape width (divisible by head_dim); a proxy may be narrower than it (width
    # multiplier < 1), as the paper's DiT-XL/2 proxy of width 144 at base 288 is
    base_width: int = key(32, valid=AT_LEAST_1, cap=WIDTH_CAP, transfers=False,
                          preset=PRESET_KEEPS_PROXY, not_hp=BASE_SHAPES)
    # second width for base shapes (default 2 x base_width)
    delta_width: int | None = key(None, valid=AT_LEAST_1, cap=WIDTH_CAP, transfers=False,
                                  preset=PRESET_KEEPS_PROXY, not_hp=BASE_SHAPES)
    # sigma_init: global multiplier on every init std (an HP)
    init_mult: float = key(1.0, valid=POSITIVE, per_member=True)
    # multiplier on the readout (MuReadout's output_mult; an HP)
    output_mult: float = key(1.0, valid=POSITIVE, per_member=True)
    attn_mult: float = key(1.0, valid=POSITIVE)  # multiplier on the attention logit scale
    # zero-init adaLN modulation; None = mup: False, sp: True
    adaln_zero: bool | None = key(None)
    # Transfer across depth (mupsweep/completep.py): none = today's muP, depth is not scaled;
    # completep = every residual branch x (base_depth / depth)^depth_alpha and the optimizer of
    # Dey et al. 2025, Table 1 (needs parametrization=mup).
    depth_parametrization: str = key("none", choices=("none", "completep"), not_hp=STUDY_KIND)
    # the depth the tuned HPs belong to; None = depth (m_L = 1)
    base_depth: int | None = key(None, valid=AT_LEAST_1, cap=DEPTH_CAP, not_hp=DEPTH_BASE)
    # 1 = CompleteP, 0.5 = depth-muP (Yang et al. 2023); in [0.5, 1]
    depth_alpha: float = key(1.0, valid=Range(0.5, 1), not_hp=DEPTH_BASE)
    # -- read by one architecture only (read_by): set under another, refused
    # U-ViT's optional 3x3 C->C conv on the image after the readout
    output_conv: bool = key(False, read_by=("uvit",))
    # A caption model's conditioning (mupsweep/conditioning.py): the frozen caption encoder,
    # hash | minilm | file (precomputed embeddings, in text_file)
    text_encoder: str = key("hash", choices=("hash", "minilm", "file"), read_by=CAPTION_MODELS)
    # text_encoder=file: the embeddings (.npz / .safetensors)
    text_file: str | None = key(None, non_empty=True, read_by=CAPTION_MODELS)
    # caption token size (T5-XXL: 4096, MiniLM: 384)
    text_dim: int = key(64, valid=AT_LEAST_1, cap=WIDTH_CAP, read_by=CAPTION_MODELS)
    # caption tokens (PixArt-alpha: 120, SD3: 154)
    text_len: int = key(16, valid=AT_LEAST_1, cap=TOKENS_CAP, read_by=CAPTION_MODELS)
    # the pooled caption vector's size (MMDiT's global input); None = text_dim
    pooled_dim: int | None = key(None, valid=AT_LEAST_1, cap=WIDTH_CAP, read_by=CAPTION_MODELS)


@dataclass
class DataConfig:
    name: str = key("digits", non_empty=True)  # digits | fashion_mnist | image_folder | latents
    # directory or file; default depends on the dataset
    root: str | None = key(None, non_empty=True)
    # share of items held out for the validation loss
    val_fraction: float = key(0.1, valid=OPEN_UNIT)
    split_seed: int = key(0, valid=SEED)  # the train/validation split depends on this seed only
    # resize (image_folder); None keeps the dataset's size
    image_size: int | None = key(None, valid=AT_LEAST_1,
                                 cap=(MAX_IMAGE, "one 16384^2 RGB image is 3 GiB of float32"))
    grayscale: bool = key(False)  # image_folder: load as 1 channel instead of RGB
    # use only the first N items (after a seeded shuffle)
    max_items: int | None = key(None, valid=Range(2))
    # latents: multiply stored latents by this (SD VAE: 0.18215)
    latent_scale: float = key(1.0, valid=POSITIVE)
    # where the images live while training: auto (on disk when a latent set or an image folder
    # is over 2 GiB as float32, else in memory) | always (on disk, read batch by batch) |
    # never (decoded into memory at start). The same batches either way.
    stream: str = key("auto", choices=("auto", "always", "never"), neutral=True, signature=False)
    # processes reading batches from disk ahead of training (data.stream); 0: read in the
    # training process
    num_workers: int = key(2, valid=NON_NEGATIVE, cap=(256, "a worker is a process"),
                           neutral=True, signature=False)
    # flip each training image left-right with probability 1/2 (DiT's ImageNet recipe)
    hflip: bool = key(False)
    # ignore the labels: every item is of one class, so the model learns p(x) (a folder of
    # images without class sub-folders is one class already)
    unconditional: bool = key(False)
    # latents: a diffusers AutoencoderKL directory (save_pretrained) that decodes sample grids
    # into images; null shows the latents' first channel
    vae: str | None = key(None, non_empty=True, neutral=True, signature=False)


@dataclass
class DiffusionConfig:
    # ddpm (eps-prediction) | rectified_flow
    kind: str = key("ddpm", choices=("ddpm", "rectified_flow"), not_hp=OBJECTIVE)
    num_timesteps: int = key(1000, valid=Range(2), cap=TIMESTEPS_CAP, not_hp=OBJECTIVE)
    beta_start: float = key(1e-4, valid=OPEN_UNIT, not_hp=OBJECTIVE)
    beta_end: float = key(0.02, valid=OPEN_UNIT, not_hp=OBJECTIVE)
    # DDIM / Euler steps for sample grids
    sample_steps: int = key(50, valid=AT_LEAST_1, cap=TIMESTEPS_CAP, signature=False,
                            not_hp=SAMPLES_ONLY)
    # classifier-free guidance scale for sample grids
    cfg_scale: float = key(4.0, valid=NON_NEGATIVE, signature=False, not_hp=SAMPLES_ONLY)


@dataclass
class OptimConfig:
    # base learning rate (muP: the lr of input/vector/output params)
    lr: float = key(2e-3, valid=POSITIVE)
    weight_decay: float = key(0.0, valid=NON_NEGATIVE)
    beta1: float = key(0.9, valid=BELOW_1)
    beta2: float = key(0.999, valid=BELOW_1)
    eps: float = key(1e-8, valid=POSITIVE)
    warmup_steps: int = key(0, valid=NON_NEGATIVE)
    # constant | cosine (after warmup)
    schedule: str = key("constant", choices=("constant", "cosine"))
    min_lr_ratio: float = key(0.1, valid=UNIT)  # cosine decays to lr x this
    grad_clip: float = key(0.0, valid=NON_NEGATIVE)  # max grad norm; 0 disables


@dataclass
class TrainConfig:
    """One run. A key with neutral=True, signature=False only says how a run is shown, where it
    writes or what runs it: a resumed run, and the trials of one study, may differ in it."""

    steps: int = key(300, valid=NON_NEGATIVE)
    # global batch (split across DDP ranks)
    batch_size: int = key(64, valid=AT_LEAST_1, cap=IMAGES_CAP, transfers=False)
    seed: int = key(0, valid=SEED, per_member=True)  # weights, data order and noise
    # validation loss every N steps (and at the end); in a study's signature: the pruner sees
    # the losses of these steps
    eval_every: int = key(100, valid=AT_LEAST_1, neutral=True)
    # fixed (x0, t, noise) triples for the deterministic validation loss
    val_size: int = key(256, valid=AT_LEAST_1, cap=IMAGES_CAP, not_hp=OBJECTIVE)
    # seed of those triples (fixed across trials so losses compare)
    val_seed: int = key(1234, valid=SEED, not_hp=OBJECTIVE)
    log_every: int = key(10, valid=AT_LEAST_1, neutral=True, signature=False)
    # 0: only at the end
    ckpt_every: int = key(0, valid=NON_NEGATIVE, neutral=True, signature=False)
    ema_decay: float = key(0.0, valid=BELOW_1)  # 0 disables EMA
    precision: str = key("fp32", choices=("fp32", "bf16"))  # fp32 | bf16 (autocast)
    compile: bool = key(False, neutral=True, signature=False)  # torch.compile the model
    # auto | cpu | cuda | cuda:N
    device: str = key("auto", non_empty=True, pattern=(DEVICE, "use auto, cpu, cuda or cuda:N"),
                      neutral=True, signature=False)
    # null: a new runs/train/YYYY-MM-DD_HH-MM-SS[-N] per run (a pack member has its own)
    run_dir: str | None = key(None, non_empty=True, per_member=True, not_hp=SET_BY_TRIAL,
                              neutral=True, signature=False)
    # continue the run in run_dir (same config; steps may grow)
    resume: bool = key(False, not_hp=SET_BY_TRIAL, neutral=True, signature=False)
    # write last.pt and the sample grid at the end (sweep trials: false)
    save: bool = key(True, not_hp=SET_BY_TRIAL, neutral=True, signature=False)
    # images in the final sample grid (0: none)
    samples: int = key(16, valid=NON_NEGATIVE, cap=IMAGES_CAP, neutral=True, signature=False)
    # rich progress bar on stderr (plain lines when it is not a terminal)
    progress: bool = key(True, not_hp=SET_BY_TRIAL, neutral=True, signature=False)
    # also log to run_dir/tensorboard (needs the .[tensorboard] extra)
    tensorboard: bool = key(False, neutral=True, signature=False)
    # stop as diverged when loss > factor x first loss (or NaN)
    diverge_factor: float = key(3.0, valid=Range(1, low_open=True), per_member=True)


@dataclass
class EvalConfig:
    """What a run measures at each evaluation besides the validation loss (mupsweep/evaluation.py
    holds the metrics by name). Result-neutral: measuring draws from its own generator, so the
    run trains the same whatever is measured; in a study's signature, as the values it ranks
    trials by depend on these keys."""

    # metrics measured at every evaluation after step 0 besides validation_loss (always
    # measured); a sweep trial adds sweep.objective
    metrics: list[str] = key(factory=list)
    # samples generated per measurement (sample_fd, fid); the held-out side is the validation
    # split. Must exceed the feature dimension, or the covariance has no inverse to speak of
    samples: int = key(1024, valid=Range(2), cap=IMAGES_CAP)
    # DDIM / Euler steps of those samples
    sample_steps: int = key(25, valid=AT_LEAST_1, cap=TIMESTEPS_CAP)
    # classifier-free guidance scale of those samples (1: none; DiT's FID-50K uses 1.5)
    cfg_scale: float = key(1.0, valid=NON_NEGATIVE)
    # the samples' noise and labels: the same seed and weights give the same value
    seed: int = key(0, valid=SEED)
    # fid: the standard FID Inception weights (weights-inception-2015-12-05-6726825d.pth), a local
    # file; nothing is downloaded
    inception_weights: str | None = key(None, non_empty=True)
    # sample_fd's feature network (a classifier trained once on the training split) is cached
    # here, keyed by dataset and split; null: $MUPSWEEP_CACHE_DIR/feature_nets (tune: next to
    # the study, sweep.out_dir/feature_nets; validate: one beside all its grids)
    cache_dir: str | None = key(None, non_empty=True, signature=False)


@dataclass
class CoordCheckConfig:
    widths: list[int] = key(factory=lambda: [32, 64, 128, 256], min_widths=2)
    # training steps recorded (activations of steps 1..steps)
    steps: int = key(4, valid=AT_LEAST_1)
    seeds: int = key(3, valid=AT_LEAST_1)  # repeats averaged per width
    lr: float = key(1e-2, valid=POSITIVE)
    batch_size: int = key(32, valid=AT_LEAST_1, cap=IMAGES_CAP)
    # max |slope| of log2 mean|act| vs log2 width to pass
    tolerance: float = key(0.3, valid=POSITIVE)
    out_dir: str = key("runs/coord_check", non_empty=True)
    # tune and validate run this check first on a model mupsweep converted to muP itself (your
    # own class) and refuse it when it fails; false skips that (you have checked it yourself)
    gate: bool = key(True)


@dataclass
class SweepParam:
    """One axis of the search space (see mupsweep.sweep.space for how each type is suggested).
    An entry of sweep.params, not a config key: its fields declare no key rules."""

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
    """`mupsweep tune`: an Optuna study over proxy widths (mupsweep/sweep/tune.py). No run reads
    this section (Config declares it neutral); signature=False marks how tune runs rather than
    what a trial computes (proxy_widths and params are in a study's signature)."""

    # global budget across all workers (COMPLETE + PRUNED trials)
    n_trials: int = key(20, valid=AT_LEAST_1, signature=False)
    # every HP set runs at each
    proxy_widths: list[int] = key(factory=lambda: [64], min_widths=1)
    sampler: str = key("tpe", signature=False)  # tpe | gp | random | grid (checked by the study)
    # hyperband | successive_halving | median | none (checked by the study)
    pruner: str = key("hyperband", signature=False)
    # sampler seed: trial n samples from a stream seeded by (seed, n)
    seed: int = key(0, valid=SEED, signature=False)
    study: str = key("mupsweep", non_empty=True, signature=False)  # Optuna study name
    # SQLAlchemy URL or journal file; None: sqlite out_dir/study.db
    storage: str | None = key(None, non_empty=True, signature=False)
    # study.db (default storage), trials/, trials.csv, best.json
    out_dir: str = key("runs/sweep", non_empty=True, signature=False)
    # RDB storages: a killed worker's trial FAILs after the grace period
    heartbeat_s: int = key(10, valid=NON_NEGATIVE, signature=False)
    # heartbeat grace period; None: 2 x heartbeat_s (Optuna's default)
    grace_s: int | None = key(None, valid=AT_LEAST_1, signature=False)
    # a trial failed by a dead worker is re-queued at most this many times
    max_retry: int = key(2, valid=NON_NEGATIVE, signature=False)
    # trials a worker trains at once as one packed model (mupsweep/group.py); a packed member
    # trains as its unpacked trial would (tests/test_packed.py)
    pack: int = key(1, valid=AT_LEAST_1, signature=False)
    # None: the default space (log2 lr / init / output mult); [] is refused
    params: list[SweepParam] | None = key(None)
    # the metric trials are ranked by (mupsweep/evaluation.py: validation_loss, sample_fd,
    # fid, or one registered by name); the study's direction is the metric's
    objective: str = key("validation_loss", non_empty=True)


@dataclass
class Config:
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig, not_hp=DATA)
    diffusion: DiffusionConfig = section(DiffusionConfig)
    optim: OptimConfig = section(OptimConfig, per_member=True)  # a pack's members: own optimizer
    train: TrainConfig = section(TrainConfig)
    eval: EvalConfig = section(EvalConfig, neutral=True,
                               not_hp="it sets how a run is measured, not how it trains")
    # the other commands' sections: no run reads them
    coord: CoordCheckConfig = section(CoordCheckConfig, neutral=True, signature=False,
                                      not_hp="a setting of coord-check, which no trial reads")
    sweep: SweepConfig = section(SweepConfig, neutral=True,
                                 not_hp="a setting of tune itself, which no trial reads")
    # written by `transfer`
    provenance: dict[str, Any] = key(factory=dict, neutral=True, signature=False,
                                     not_hp="written by transfer, and read by no trial")

