"""Structured configs: the single source of truth for every knob, and Hydra composition.

Every field has a comment saying what it is. Hydra YAML files fill these dataclasses: the
user's own `./configs` of the current directory (or `--config-dir DIR`) first, so
`configs/model/mine.yaml` is `model=mine`, then the packaged defaults under `mupsweep/configs/`
(so an installed mupsweep composes anywhere; the root defaults list is
`mupsweep/config_root/config.yaml`). Merging into the dataclass schema rejects unknown
keys and wrong types, so a typo on the command line is an error naming the nearest valid name,
not a silently ignored override.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mupsweep.errors import UserError
from mupsweep.util import first_line

CONFIG_DIR = Path(__file__).parent / "configs"  # the packaged config groups (model/, data/, ...)
# The packaged root config (defaults list) lives apart from the groups, so that Hydra's search
# path can be: root, then the user's configs, then the packaged groups; a user's
# configs/model/dit-tiny.yaml then wins over the packaged one, as Hydra users expect.
ROOT_CONFIG_DIR = Path(__file__).parent / "config_root"
USER_CONFIG_DIR = "configs"  # the user's presets, relative to the current directory


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
    base_width: int = 32  # muP base shape width (divisible by head_dim); a proxy may be narrower
    # than it (width multiplier < 1), as the paper's DiT-XL/2 proxy of width 144 at base 288 is
    delta_width: int | None = None  # second width for base shapes (default 2 x base_width)
    init_mult: float = 1.0  # sigma_init: global multiplier on every init std (an HP)
    output_mult: float = 1.0  # multiplier on the readout (MuReadout's output_mult; an HP)
    attn_mult: float = 1.0  # multiplier on the attention logit scale
    adaln_zero: bool | None = None  # zero-init adaLN modulation; None = mup: False, sp: True
    # Transfer across depth (mupsweep/completep.py): none = today's muP, depth is not scaled;
    # completep = every residual branch x (base_depth / depth)^depth_alpha and the optimizer of
    # Dey et al. 2025, Table 1 (needs parametrization=mup).
    depth_parametrization: str = "none"  # none | completep
    base_depth: int | None = None  # the depth the tuned HPs belong to; None = depth (m_L = 1)
    depth_alpha: float = 1.0  # 1 = CompleteP, 0.5 = depth-muP (Yang et al. 2023); in [0.5, 1]
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
    run_dir: str | None = None  # null: a new runs/train/YYYY-MM-DD_HH-MM-SS[-N] per run
    resume: bool = False  # continue the run in run_dir (same config; steps may grow)
    save: bool = True  # write last.pt and the sample grid at the end (sweep trials: false)
    samples: int = 16  # images in the final sample grid (0: none)
    progress: bool = True  # rich progress bar on stderr (plain lines when it is not a terminal)
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs the .[tensorboard] extra)
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
    """`mupsweep tune`: an Optuna study over proxy widths (mupsweep/sweep/tune.py)."""

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
    pack: int = 1  # trials a worker trains at once as one packed model (mupsweep/packed.py)
    params: list[SweepParam] | None = None  # None: the default space (log2 lr / init / output mult); [] is refused


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
    _check_booleans(node)
    if isinstance(node, DictConfig):  # Hydra's node is typed by the loose schema: drop that type
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=False))
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, node)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(_unknown_key_message(e) or f"config error: {first_line(e)}") from None
    check_config(cfg)
    return cfg


# OmegaConf turns anything into a bool field's value: 2 and "yes" become true, 0 and "no" false.
# A typo'd boolean must not change a run in silence, so the schema Hydra composes into keeps its
# booleans loose (typed Any, every other field as strict as the schema), and `_check_booleans`
# reads them as given before the strict schema converts them.


@functools.cache
def _loose(cls: type) -> type:
    """`cls` (a schema dataclass) with every bool field, nested ones included, typed Any."""
    fields = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        kind, default = hint, f.default
        factory = f.default_factory
        if _is_bool(hint):
            kind = Any
        elif dataclasses.is_dataclass(hint):
            kind = factory = _loose(hint)
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            kind = list[_loose(typing.get_args(hint)[0])]  # type: ignore[misc]
        spec = (dataclasses.field(default_factory=factory) if factory is not dataclasses.MISSING
                else dataclasses.field(default=default))
        fields.append((f.name, kind, spec))
    return dataclasses.make_dataclass(cls.__name__, fields)  # same name: same error messages


def _is_bool(hint: Any) -> bool:
    return hint is bool or (typing.get_origin(hint) is not None and set(typing.get_args(hint)) == {bool, type(None)})


def _check_booleans(node: Any) -> None:
    """Refuse a bool field given anything but true / false (or null where the field may be null)."""
    try:
        raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    except OmegaConfBaseException:
        return  # a broken interpolation: the schema merge names it
    problems: list[str] = []

    def walk(value: Any, cls: type, prefix: str) -> None:
        if not isinstance(value, dict):
            return  # a section given as a non-mapping: the schema merge names it
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in value:
                continue
            hint, v, key = hints[f.name], value[f.name], f"{prefix}{f.name}"
            if _is_bool(hint) and not isinstance(v, bool) and not (v is None and hint is not bool):
                problems.append(f"{key}={v!r} must be true or false"
                                + (" (or null)" if hint is not bool else ""))
            elif dataclasses.is_dataclass(hint):
                walk(v, hint, f"{key}.")
            elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]) \
                    and isinstance(v, list):
                for i, item in enumerate(v):
                    walk(item, typing.get_args(hint)[0], f"{key}[{i}].")

    walk(raw, Config, "")
    if problems:
        raise UserError("; ".join(problems))


def config_search_path(config_dir: str | Path | None = None) -> list[Path]:
    """The packaged config groups, then `config_dir` (must exist) or else `./configs` when the
    current directory has one. (Hydra looks in the user's before the packaged: `compose`.)"""
    if config_dir is not None:
        user = Path(config_dir)
        if not user.is_dir():
            raise UserError(f"--config-dir {user}: not a directory")
        return [CONFIG_DIR, user.resolve()]
    user = Path(USER_CONFIG_DIR)
    return [CONFIG_DIR, user.resolve()] if user.is_dir() else [CONFIG_DIR]


def config_groups(config_dir: str | Path | None = None) -> dict[str, list[str]]:
    """{group: sorted option names} over the search path (model: dit-tiny, dit-s-2, ...)."""
    groups: dict[str, set[str]] = {}
    for root in config_search_path(config_dir):
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            names = {f.stem for f in sub.glob("*.yaml")}
            if names:
                groups.setdefault(sub.name, set()).update(names)
    return {g: sorted(v) for g, v in sorted(groups.items())}


def copy_preset(group: str, source: str, name: str,
                config_dir: str | Path | None = None) -> tuple[Path, str]:
    """Start a preset of your own from a packaged one: copy CONFIG_DIR/GROUP/SOURCE.yaml to
    config_dir (default ./configs)/GROUP/NAME.yaml. Returns the file and the override that
    selects it (`model=NAME`; `+experiment=NAME`). Refuses an existing file (yours to edit) and
    an unknown group or source, naming the options."""
    groups = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
    if group not in groups:
        raise UserError(f"unknown config group {group!r}; {_did_you_mean(group, groups)}"
                        f"(groups: {', '.join(groups)})")
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    if source not in options:
        raise UserError(f"unknown packaged {group} {source!r}; {_did_you_mean(source, options)}"
                        f"(options: {', '.join(options)})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"preset name {name!r}: use letters, digits, '.', '_' and '-' "
                        f"(it is the file name and the {group}=NAME option)")
    target = Path(config_dir if config_dir is not None else USER_CONFIG_DIR) / group / f"{name}.yaml"
    if target.exists():
        raise UserError(f"{target} exists; edit it, or choose another name")
    text = (CONFIG_DIR / group / f"{source}.yaml").read_text()
    selector = f"+{group}={name}" if group == "experiment" else f"{group}={name}"
    note = f"# Started from mupsweep's packaged {group}/{source}.yaml; select it with {selector}\n"
    # Hydra reads a `# @package` directive only on the first line (experiments have one)
    head, _, rest = text.partition("\n") if text.startswith("# @package") else ("", "", text)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"{head}\n{note}{rest}" if head else note + rest)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or first_line(e)}") from None
    return target, selector


def _did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    """'did you mean PREFIXoption? ' for the nearest option, or '' when none is near."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {prefix}{close[0]}? " if close else ""


def _schema_keys(path: str) -> list[str] | None:
    """The field names of the schema section at `path` ('' = top level); None if not one."""
    obj: Any = Config
    for part in [p for p in path.split(".") if p]:
        fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if part not in fields:
            return None
        obj = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
    return [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else None


def _unknown_key_message(e: BaseException | None) -> str | None:
    """'unknown key model.widht; did you mean model.width? (keys of model: ...)' for an
    OmegaConf "Key 'x' not in 'Y'" error, else None."""
    full_key = getattr(e, "full_key", None)
    if not full_key:  # Hydra wraps the error of a key inside a group file in its message
        found = re.search(r"not in '\w+'\s+full_key: (\S+)", str(e or ""))
        full_key = found.group(1) if found else None
    if not full_key or "not in" not in str(e):
        return None
    section, _, name = str(full_key).rpartition(".")
    keys = _schema_keys(section)
    if keys is None:
        return None
    where = f"keys of {section}" if section else "sections"
    hint = _did_you_mean(name, keys, f"{section}." if section else "")
    return f"unknown key {full_key}{'; ' + hint if hint else ' '}({where}: {', '.join(keys)})"


def compose(overrides: list[str] | None = None, config_file: str | None = None,
            config_dir: str | Path | None = None, sweeps: bool = False) -> Config:
    """Build a Config from the Hydra configs on the search path (`config_search_path`) plus
    `key=value` overrides; `+experiment=NAME` applies `configs/experiment/NAME.yaml`.

    With `config_file` (a resolved YAML from `transfer` or a run directory) that file is the
    base instead of the packaged defaults, and overrides apply on top of it.

    sweeps (tune): a search space written as Hydra's sweepers take it, an override such as
    `optim.lr='tag(log, interval(1e-4, 1e-2))'` or a config's `hydra.sweeper.params`, is added
    to sweep.params (`hydra_sweep_param`); elsewhere such an override is refused.
    """
    overrides = list(overrides or [])
    _check_override_keys(overrides)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            base = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry multi-line messages
            raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        _check_resolved(base, path)
        for item in overrides:
            if "=" not in item:
                raise UserError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0].lstrip("+")
            if "." not in key:
                raise UserError(
                    f"override {item!r}: config groups cannot be switched with --config; "
                    "give a field such as model.width=256"
                )
        for item in overrides:  # one at a time, so the message names the bad one
            try:
                OmegaConf.from_dotlist([item.lstrip("+")])
            except (OmegaConfBaseException, yaml.YAMLError) as e:  # a value is parsed as YAML
                raise UserError(f"bad override {item!r}: {_yaml_problem(e)}") from None
        dot = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
        return _to_config(OmegaConf.merge(base, dot))

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException

    swept: list[SweepParam] = []
    for item in list(overrides):  # one at a time, so the message names the bad one
        try:
            parsed = OverridesParser.create().parse_override(item)
        except HydraException as e:
            raise UserError(f"bad override {item!r}: {first_line(e)}") from None
        if parsed.is_sweep_override():  # a search space axis, as Hydra's sweepers take it
            if not sweeps:
                raise UserError(f"{item} is a sweep (Hydra's interval/choice/range): only "
                                "`mupsweep tune` sweeps; give one value here")
            swept.append(hydra_sweep_param(parsed.key_or_group, parsed.value(), item))
            overrides.remove(item)
    _check_group_names(overrides, config_dir)
    # Looked up in this order: the root config (the user's configs/config.yaml if there is
    # one, else the packaged one), the user's groups, the packaged groups.
    user_dirs = config_search_path(config_dir)[1:]
    root = next((d for d in user_dirs if (d / "config.yaml").is_file()), ROOT_CONFIG_DIR)
    search = ",".join(f"file://{p}" for p in [*user_dirs, CONFIG_DIR] if p != root)
    hydra_overrides = [*overrides, f"hydra.searchpath=[{search}]"]
    # The schema with its booleans loose (`_loose`): 2 or "yes" reach `_check_booleans` as
    # given, instead of becoming true inside Hydra.
    ConfigStore.instance().store(name="schema", node=_loose(Config))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(root), version_base="1.3"):
            node = hydra_compose(config_name="config", overrides=hydra_overrides,
                                 return_hydra_config=True)
        sweeper_params = OmegaConf.select(node, "hydra.sweeper.params") or {}
        with open_dict(node):
            node.pop("hydra")
    except MissingConfigException as e:
        raise UserError(_missing_option_message(e, config_dir)) from None
    except yaml.YAMLError as e:  # a preset or experiment file that is not YAML (Hydra lets it out)
        raise UserError(f"not valid YAML: {_yaml_problem(e)}") from None
    except (HydraException, OmegaConfBaseException) as e:
        known = _unknown_key_message(e.__cause__) or _unknown_key_message(e)
        if known:
            where = re.match(r"In '([^']+)'", str(e))  # the group file that has the key
            raise UserError((f"{where.group(1)}.yaml: " if where else "") + known) from None
        cause = f" ({first_line(e.__cause__)})" if e.__cause__ is not None else ""
        raise UserError(f"config error: {first_line(e)}{cause}") from None
    finally:
        GlobalHydra.instance().clear()
    cfg = _to_config(node)
    if sweeps:  # a config's hydra.sweeper.params (as an experiment file for Hydra writes it)
        for key, text in sweeper_params.items():
            item = f"{key}={text}"
            try:
                value = OverridesParser.create().parse_override(item).value()
            except HydraException as e:
                raise UserError(f"hydra.sweeper.params {item!r}: {first_line(e)}") from None
            swept.append(hydra_sweep_param(str(key), value, f"hydra.sweeper.params {item}"))
    if swept:
        cfg.sweep.params = [*(cfg.sweep.params or []), *swept]
    return cfg


def hydra_sweep_param(key: str, value: Any, where: str) -> SweepParam:
    """One search space axis from Hydra's sweep syntax, as hydra-optuna-sweeper reads it:
    interval(a, b) a float in [a, b] (tag(log, ...) log-uniform, tag(int, ...) an integer),
    choice(...) / a,b,c categorical, range(start, stop, step) the integers start, ..., < stop.
    The values are Optuna's real values (its dashboard shows lr, not log2 lr)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    tags = set(getattr(value, "tags", None) or ())
    if isinstance(value, IntervalSweep):
        kind = "int" if "int" in tags else "float"
        low, high = (int(value.start), int(value.end)) if kind == "int" else (value.start, value.end)
        return SweepParam(name=key, type=kind, low=low, high=high, log="log" in tags)
    if isinstance(value, ChoiceSweep):
        return SweepParam(name=key, type="categorical", choices=list(value.list))
    if isinstance(value, RangeSweep):
        if not all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            raise UserError(f"{where}: range() of non-integers; use choice(...) or interval(a, b)")
        values = list(range(value.start, value.stop, value.step)) if value.step else []
        if not values:
            raise UserError(f"{where}: the range is empty")
        return SweepParam(name=key, type="categorical", choices=values)
    raise UserError(f"{where}: not a sweep; use interval(a, b), choice(a, b, ...) or range(a, b)")


# Hydra's own keys a user may type: mupsweep runs no Hydra job (it composes with Hydra's
# compose API), so each would do nothing; the ones with an equivalent name it.
HYDRA_KEYS = {
    "hydra.run.dir": "train.run_dir (a run's directory) or sweep.out_dir (a sweep's)",
    "hydra.sweep.dir": "sweep.out_dir",
    "hydra.searchpath": "./configs or --config-dir DIR for your own configs",
    "hydra.job.chdir": "nothing: mupsweep never changes directory; paths are relative to here",
}


def _check_override_keys(overrides: list[str]) -> None:
    """Refuse an override with no key, and Hydra's runtime keys (which would be ignored in
    silence), naming mupsweep's equivalent."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" in item and not key:
            raise UserError(f"override {item!r} has no key: write KEY=VALUE, e.g. model.width=128")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            instead = next((v for k, v in HYDRA_KEYS.items() if key.startswith(k)), None)
            raise UserError(f"{item}: mupsweep runs no Hydra job, so Hydra's {key} would do "
                            "nothing" + (f"; use {instead}" if instead else ""))


def _yaml_problem(e: BaseException) -> str:
    """A YAML error in one line: what is wrong and where ('expected ... in FILE, line 2,
    column 8'); other errors' first line."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not isinstance(e, yaml.YAMLError) or problem is None or mark is None:
        return first_line(e)
    where = f"{mark.name}, " if mark.name and not mark.name.startswith("<") else ""
    return f"{problem} ({where}line {mark.line + 1}, column {mark.column + 1})"


def _check_group_names(overrides: list[str], config_dir: str | Path | None) -> None:
    """A group override whose group is on no search path (`+experiment=x` run outside the
    directory that has configs/experiment/) would be dropped by Hydra in silence: refuse it."""
    groups = config_groups(config_dir)
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" in item and "." not in key and key not in groups and not key.startswith("hydra"):
            where = ", ".join(str(p) for p in config_search_path(config_dir))
            if key in {f.name for f in dataclasses.fields(Config)}:
                continue  # a whole section given as a value; the schema checks it
            hint = _did_you_mean(key, list(groups))
            raise UserError(f"unknown config group {key!r}{'; ' + hint if hint else ' '}"
                            f"(groups: {', '.join(groups)}; searched {where}; your own go in "
                            f"./configs/{key}/NAME.yaml or --config-dir DIR)")


def _missing_option_message(e: Any, config_dir: str | Path | None) -> str:
    """'unknown model 'dit-tny'; did you mean dit-tiny? (options: ...)' from Hydra's
    MissingConfigException (whose one-line form drops its list of options)."""
    missing = str(getattr(e, "missing_cfg_file", "") or "")
    group, _, name = missing.rpartition("/")
    if not group:
        return f"config error: {first_line(e)}"
    options = list(getattr(e, "options", None) or config_groups(config_dir).get(group, []))
    if not options:
        where = ", ".join(str(p / group) for p in config_search_path(config_dir))
        return f"unknown config group {group!r} (no {group}/*.yaml in {where})"
    hint = _did_you_mean(name, options)
    return f"unknown {group} {name!r}{'; ' + hint if hint else ' '}(options: {', '.join(options)})"


def _check_resolved(base: Any, path: Path) -> None:
    """A --config file is a whole resolved config (from `transfer`, or a run's config.yaml):
    an empty or cut-off file would otherwise train the defaults in silence. Sections are
    written in schema order with provenance last, so a truncated file lacks provenance."""
    if not isinstance(base, DictConfig):
        raise UserError(f"config file {path} is not a mapping of config sections")
    missing = [f.name for f in dataclasses.fields(Config) if f.name not in base]
    if missing:
        raise UserError(f"config file {path} is not a complete resolved config: missing "
                        f"{', '.join(missing)} (write one with `mupsweep transfer`, or use a "
                        "run directory's config.yaml)")


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
# Resume: which differences between two configs of one run directory change its results
# --------------------------------------------------------------------------------------------

# Keys that cannot change what a run computes: how often it logs, evaluates and checkpoints,
# where and how fast it runs, what it saves at the end, and the other commands' sections.
RESULT_NEUTRAL = ("train.progress", "train.tensorboard", "train.log_every", "train.eval_every", "train.ckpt_every",
                  "train.device", "train.compile", "train.samples", "train.save",
                  "train.run_dir", "train.resume", "coord", "sweep", "provenance")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key that changes results (train.steps may grow)."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == n or key.startswith(n + ".") for n in RESULT_NEUTRAL):
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if key == "train.steps" and isinstance(va, int) and isinstance(vb, int):
            if vb < va:
                out.append(f"train.steps: {va} -> {vb} (steps may only grow)")
        elif va != vb:
            out.append(f"{key}: {va} -> {vb}")
    return out


# --------------------------------------------------------------------------------------------
# Validation: every message names the key, its value and what would be valid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """The valid values of a number: finite, within [low, high], ends excluded when open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def describe(self, integer: bool) -> str:
        """'an integer >= 1', 'a finite number > 0', 'a number in [0, 1)', ..."""
        what = "an integer" if integer else "a number"
        if self.high is None:
            op = ">" if self.low_open else ">="
            return f"{what if integer else 'a finite number'} {op} {_num(self.low)}"
        return (f"{what} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
UNIT = Range(0, 1)  # [0, 1]
SEED = Range(0, 2**31 - 1)  # numpy and Optuna samplers take seeds below 2**32; workers add k


# Every number in the schema and its valid values (None: the field may also be null).
# Relations between fields are checked in `check_config` below.
RANGES: dict[str, Range] = {
    "model.width": AT_LEAST_1, "model.depth": AT_LEAST_1, "model.head_dim": AT_LEAST_1,
    "model.patch_size": AT_LEAST_1, "model.mlp_ratio": POSITIVE, "model.class_dropout": UNIT,
    "model.base_width": AT_LEAST_1, "model.delta_width": AT_LEAST_1,
    "model.init_mult": POSITIVE, "model.output_mult": POSITIVE, "model.attn_mult": POSITIVE,
    "model.base_depth": AT_LEAST_1, "model.depth_alpha": Range(0.5, 1),  # 1 CompleteP, 0.5 depth-muP
    "data.val_fraction": Range(0, 1, low_open=True, high_open=True), "data.split_seed": SEED,
    "data.image_size": AT_LEAST_1, "data.max_items": Range(2), "data.latent_scale": POSITIVE,
    "diffusion.num_timesteps": Range(2), "diffusion.beta_start": Range(0, 1, True, True),
    "diffusion.beta_end": Range(0, 1, True, True), "diffusion.sample_steps": AT_LEAST_1,
    "diffusion.cfg_scale": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": Range(0, 1, high_open=True), "optim.beta2": Range(0, 1, high_open=True),
    "optim.eps": POSITIVE, "optim.warmup_steps": NON_NEGATIVE, "optim.min_lr_ratio": UNIT,
    "optim.grad_clip": NON_NEGATIVE,
    "train.steps": NON_NEGATIVE, "train.batch_size": AT_LEAST_1, "train.seed": SEED,
    "train.eval_every": AT_LEAST_1, "train.val_size": AT_LEAST_1, "train.val_seed": SEED,
    "train.log_every": AT_LEAST_1, "train.ckpt_every": NON_NEGATIVE,
    "train.ema_decay": Range(0, 1, high_open=True), "train.samples": NON_NEGATIVE,
    "train.diverge_factor": Range(1, low_open=True),
    "coord.steps": AT_LEAST_1, "coord.seeds": AT_LEAST_1, "coord.lr": POSITIVE,
    "coord.batch_size": AT_LEAST_1, "coord.tolerance": POSITIVE,
    "sweep.n_trials": AT_LEAST_1, "sweep.seed": SEED, "sweep.heartbeat_s": NON_NEGATIVE,
    "sweep.grace_s": AT_LEAST_1, "sweep.max_retry": NON_NEGATIVE, "sweep.pack": AT_LEAST_1,
}

# Upper bounds on sizes, so that an absurd value is one line here, not the allocator's traceback
# later (or an hour of swapping). Each is far beyond any real use, so nothing that could run is
# refused. They are machine-independent on purpose: a config composed here (transfer, --cfg)
# may be meant for a bigger machine, so this machine's memory is no limit on it. Checked once a
# value is in its RANGES.
MAX_WIDTH = 2**16
WIDTH_WHY = "3.5x the widest published transformer, PaLM's 18432"
MAX_DEPTH = 1024
MAX_IMAGE = 2**14
MAX_IMAGES = 2**20
IMAGES_WHY = "every rank draws the whole global batch; published diffusion training uses a few thousand"
MAX_TIMESTEPS = 100_000
TIMESTEPS_WHY = "DDPM and DiT use 1000; the schedule keeps tables of this length"
MAX_TOKENS = 2**14  # caption tokens (PixArt-alpha: 120, SD3: 154; T5's context is 512)
CAPS: dict[str, tuple[int, str]] = {
    "model.width": (MAX_WIDTH, WIDTH_WHY), "model.base_width": (MAX_WIDTH, WIDTH_WHY),
    "model.delta_width": (MAX_WIDTH, WIDTH_WHY), "model.head_dim": (MAX_WIDTH, WIDTH_WHY),
    "model.depth": (MAX_DEPTH, "the deepest trained transformers have 1000 layers (DeepNet)"),
    "model.base_depth": (MAX_DEPTH, "the deepest trained transformers have 1000 layers (DeepNet)"),
    "model.mlp_ratio": (64, "transformer MLPs are 4x the width"),
    "model.patch_size": (MAX_IMAGE, "no image is wider"),
    "data.image_size": (MAX_IMAGE, "one 16384^2 RGB image is 3 GiB of float32"),
    "diffusion.num_timesteps": (MAX_TIMESTEPS, TIMESTEPS_WHY),
    "diffusion.sample_steps": (MAX_TIMESTEPS, TIMESTEPS_WHY),
    "train.batch_size": (MAX_IMAGES, IMAGES_WHY), "train.val_size": (MAX_IMAGES, IMAGES_WHY),
    "train.samples": (MAX_IMAGES, IMAGES_WHY), "coord.batch_size": (MAX_IMAGES, IMAGES_WHY),
}

# Every name-valued field whose names are known here (model.arch, data.name, sweep.sampler and
# sweep.pruner are checked where the names are looked up: registry, data loaders, study).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.parametrization": ("mup", "sp"),
    "model.depth_parametrization": ("none", "completep"),
    "diffusion.kind": ("ddpm", "rectified_flow"),
    "optim.schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "bf16"),
}

# Paths and names that must not be empty ("" would mean the current directory, or no name).
NON_EMPTY = ("model.arch", "data.name", "data.root", "train.device", "train.run_dir",
             "coord.out_dir", "sweep.study", "sweep.storage", "sweep.out_dir")

# Each list of widths: non-empty (coord-check fits a slope, so two or more), positive, distinct.
WIDTH_LISTS = {"coord.widths": 2, "sweep.proxy_widths": 1}


@dataclass(frozen=True)
class ExtraKey:
    """One key of `model.extra` that an architecture reads: its type, default and valid values."""

    kind: type  # bool | int | str
    default: Any
    valid: Range | tuple[str, ...] | None = None  # int: a Range; str: the names; None: any
    nullable: bool = False  # null is a value (it means the default described in `why`)
    why: str = ""

    def problem(self, value: Any) -> str | None:
        """What `value` must be, when it is not valid; None when it is."""
        if value is None and self.nullable:
            return None
        null = f" or null ({self.why})" if self.nullable else ""
        if self.kind is bool:  # 2 or "yes" would be truthy: refused, never coerced
            return None if isinstance(value, bool) else f"true or false{null}"
        if self.kind is int:  # 1.7 or "64" would be cut or parsed: refused
            ok = isinstance(value, int) and not isinstance(value, bool) and value in self.valid
            return None if ok else self.valid.describe(integer=True) + null
        if isinstance(self.valid, tuple):
            return None if value in self.valid else "one of " + ", ".join(self.valid) + null
        return None if isinstance(value, str) and value.strip() else f"a non-empty path{null}"


# What each architecture reads from `model.extra` (the model files and the text conditioner read
# these through `model_extra`, so a value they use is one that was checked). A key its
# architecture does not read is refused: it would change nothing, in silence.
_TEXT_KEYS = {
    "text_encoder": ExtraKey(str, "hash", ("hash", "minilm", "file")),
    "text_file": ExtraKey(str, None, nullable=True, why="needed by text_encoder=file"),
    "text_dim": ExtraKey(int, 64, Range(1, MAX_WIDTH)),  # caption token size (T5-XXL: 4096)
    "text_len": ExtraKey(int, 16, Range(1, MAX_TOKENS)),  # caption tokens (PixArt-alpha: 120)
    # the pooled caption vector (MMDiT's input; the conditioner checks it for every text model)
    "pooled_dim": ExtraKey(int, None, Range(1, MAX_WIDTH), nullable=True, why="the text_dim"),
}
EXTRA_KEYS: dict[str, dict[str, ExtraKey]] = {
    "dit": {},
    "uvit": {"conv": ExtraKey(bool, False)},  # the optional 3x3 C->C output conv
    "pixart": _TEXT_KEYS,
    "mmdit": _TEXT_KEYS,
}

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def get_by_path(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _problems(cfg: Config) -> list[str]:
    """One message per invalid value, in schema order."""
    out: list[str] = []
    for key, valid in RANGES.items():
        value = get_by_path(cfg, key)
        if value is not None and value not in valid:
            out.append(f"{key}={value} must be {valid.describe(isinstance(value, int))}")
        elif key in CAPS and value is not None and value > CAPS[key][0]:
            out.append(f"{key}={value} is over the limit of {CAPS[key][0]} ({CAPS[key][1]})")
    for key, names in CHOICES.items():
        value = get_by_path(cfg, key)
        if value not in names:
            out.append(f"{key}={value!r}: use {', '.join(names[:-1])} or {names[-1]}")
    for key in NON_EMPTY:
        value = get_by_path(cfg, key)
        if value is not None and not value.strip():
            out.append(f"{key} is empty: give a value" + (" or leave it null" if key in (
                "data.root", "train.run_dir", "sweep.storage") else ""))
    for key, least in WIDTH_LISTS.items():
        widths = get_by_path(cfg, key)
        if len(widths) < least or any(w <= 0 for w in widths) or len(set(widths)) < len(widths):
            out.append(f"{key}={list(widths)} must list {'two or more' if least > 1 else 'one or more'} "
                       "distinct positive widths")
        elif max(widths) > MAX_WIDTH:
            out.append(f"{key}={list(widths)}: {max(widths)} is over the limit of {MAX_WIDTH} ({WIDTH_WHY})")
    if not DEVICE.fullmatch(cfg.train.device):
        out.append(f"train.device={cfg.train.device!r}: use auto, cpu, cuda or cuda:N")
    return out + _arch_problems(cfg.model) + _relations(cfg)


def _arch_problems(m: ModelConfig) -> list[str]:
    """`model.extra` against what m.arch reads (`EXTRA_KEYS`), and each architecture's own rules.
    An architecture registered elsewhere (not in EXTRA_KEYS) checks its own keys."""
    keys = EXTRA_KEYS.get(m.arch)
    if keys is None:
        return []
    out: list[str] = []
    for name, value in m.extra.items():
        spec = keys.get(name)
        if spec is None:
            hint = _did_you_mean(str(name), list(keys), "model.extra.")
            reads = f"it reads {', '.join(keys)}" if keys else "it reads no model.extra keys"
            out.append(f"unknown key model.extra.{name} for model.arch={m.arch}"
                       f"{'; ' + hint if hint else ' '}({reads})")
        elif (problem := spec.problem(value)) is not None:
            out.append(f"model.extra.{name}={value!r} must be {problem}")
    if m.arch == "uvit" and m.depth >= 1 and m.depth % 2 == 0:
        out.append(f"model.depth={m.depth}: U-ViT needs an odd depth (depth//2 in-blocks, 1 "
                   f"mid-block, depth//2 out-blocks); try {m.depth + 1}")
    return out


def model_extra(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg.extra` with its architecture's defaults filled in, checked as check_config checks it
    (a UserError naming the key otherwise): what the model files and the text conditioner read,
    also when they are given a ModelConfig that was never composed."""
    problems = _arch_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
    defaults = {name: spec.default for name, spec in EXTRA_KEYS.get(cfg.arch, {}).items()}
    return {**defaults, **cfg.extra}


def _relations(cfg: Config) -> list[str]:
    """Checks across fields (only where each field is valid on its own)."""
    m, d, o, t, s = cfg.model, cfg.diffusion, cfg.optim, cfg.train, cfg.sweep
    out: list[str] = []
    if t.resume and t.run_dir is None:  # it would start a new run in silence
        out.append("train.resume=true needs train.run_dir, the run to continue (or use "
                   "`mupsweep train --resume RUN_DIR`)")
    if m.width >= 1 and m.head_dim >= 1 and m.width % m.head_dim:
        out.append(f"model.width={m.width} is not divisible by model.head_dim={m.head_dim}; "
                   f"width = heads x head_dim, try {max(1, m.width // m.head_dim) * m.head_dim}")
    if m.base_width >= 1 and m.head_dim >= 1 and m.base_width % m.head_dim:
        out.append(f"model.base_width={m.base_width} is not divisible by model.head_dim={m.head_dim}")
    if m.delta_width is not None and m.delta_width >= 1 and (
            m.delta_width == m.base_width or m.delta_width % max(1, m.head_dim)):
        out.append(f"model.delta_width={m.delta_width} must differ from model.base_width and be "
                   "divisible by model.head_dim")
    narrowest = min(m.width, m.base_width, m.delta_width or m.base_width)
    if m.mlp_ratio in POSITIVE and narrowest >= 1 and int(narrowest * m.mlp_ratio) < 1:
        out.append(f"model.mlp_ratio={m.mlp_ratio} gives an MLP of no units at width {narrowest}; "
                   f"use >= {1 / narrowest:g}")
    if d.beta_start in RANGES["diffusion.beta_start"] and d.beta_end in RANGES["diffusion.beta_end"] \
            and not d.beta_start < d.beta_end:
        out.append(f"diffusion.beta_start={d.beta_start} must be < diffusion.beta_end={d.beta_end}")
    if d.kind == "ddpm" and d.sample_steps > d.num_timesteps >= 2:
        out.append(f"diffusion.sample_steps={d.sample_steps} is more than diffusion.num_timesteps="
                   f"{d.num_timesteps}: DDIM steps are distinct timesteps")
    # A run that ends inside its warmup never trains at optim.lr: a sweep would tune the wrong
    # number. (warmup_steps == steps is allowed: the lr reaches optim.lr at the last step.)
    if o.warmup_steps > t.steps >= 0:
        out.append(f"optim.warmup_steps={o.warmup_steps} is more than train.steps={t.steps}: the "
                   "run would end before its lr reaches optim.lr; lower the warmup or train longer")
    if m.depth_parametrization == "completep" and m.parametrization == "sp":
        # CompleteP's Table 1 is muP plus depth factors; under SP the width factors it builds
        # on are absent and HPs do not transfer across width, so there is nothing to complete.
        out.append("model.depth_parametrization=completep needs model.parametrization=mup "
                   "(got sp); use depth_parametrization=none with sp")
    if s.grace_s is not None and s.heartbeat_s > 0 and s.grace_s <= s.heartbeat_s:
        out.append(f"sweep.grace_s={s.grace_s} must be more than sweep.heartbeat_s={s.heartbeat_s}, "
                   "or a live worker's trial is failed between two heartbeats")
    return out


def check_config(cfg: Config) -> None:
    """Raise one UserError naming every invalid value of every section (ranges, NaN / inf,
    names, relations between fields): one line, each problem separated by '; '."""
    problems = _problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
