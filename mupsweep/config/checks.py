"""check_config: every invalid value of a config named in one error, with what would be valid.

Each key's own checks are the rules it declares in the schema (a range and a cap, names, not
empty, a list of widths, a pattern, the architectures that read it); checks across keys come
last, one function per section they read.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing

from mupsweep.config.keys import declared_rules, schema_fields
from mupsweep.config.rules import POSITIVE, YOUR_CLASS
from mupsweep.config.schema import (
    BUILTIN_ARCHS,
    MAX_WIDTH,
    WIDTH_WHY,
    Config,
    DiffusionConfig,
    ModelConfig,
    OptimConfig,
    SweepConfig,
    TrainConfig,
)
from mupsweep.errors import UserError
from mupsweep.util import get_dotted


def did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    """'did you mean PREFIXoption? ' for the nearest option, or '' when none is near."""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {prefix}{close[0]}? " if close else ""


@functools.cache
def nullable_keys() -> frozenset[str]:
    """The keys whose type allows null (`str | None`, ...)."""
    return frozenset(path for path, _, hint in schema_fields()
                     if typing.get_origin(hint) in (typing.Union, types.UnionType)
                     and type(None) in typing.get_args(hint))


def check_config(cfg: Config) -> None:
    """Raise one UserError naming every invalid value of every section (ranges, NaN / inf,
    names, relations between fields): one line, each problem separated by '; '."""
    problems = (key_problems(cfg) + arch_problems(cfg.model) + train_relations(cfg.train)
                + shape_relations(cfg.model) + diffusion_relations(cfg.diffusion)
                + warmup_relation(cfg.optim, cfg.train) + depth_relations(cfg.model)
                + sweep_relations(cfg.sweep))
    if problems:
        raise UserError("; ".join(problems))


def key_problems(cfg: Config) -> list[str]:
    """One message per value that breaks its own key's rules: numbers (range, then cap) in
    schema order, then names, empty paths, width lists and patterns."""
    rules = declared_rules()
    out: list[str] = []
    for key, r in rules.items():
        value = get_dotted(cfg, key)
        if r.valid is None or value is None:
            continue
        if value not in r.valid:
            out.append(f"{key}={value} must be {r.valid.describe(isinstance(value, int))}")
        elif r.cap is not None and value > r.cap[0]:
            out.append(f"{key}={value} is over the limit of {r.cap[0]} ({r.cap[1]})")
    for key, r in rules.items():
        names = r.choices
        if names is not None and (value := get_dotted(cfg, key)) not in names:
            out.append(f"{key}={value!r}: use {', '.join(names[:-1])} or {names[-1]}")
    for key, r in rules.items():
        value = get_dotted(cfg, key)
        if r.non_empty and value is not None and not value.strip():
            out.append(f"{key} is empty: give a value"
                       + (" or leave it null" if key in nullable_keys() else ""))
    for key, r in rules.items():
        if r.min_widths is not None:
            out += width_list_problems(key, get_dotted(cfg, key), r.min_widths)
    for key, r in rules.items():
        if r.pattern is not None and not r.pattern[0].fullmatch(value := get_dotted(cfg, key)):
            out.append(f"{key}={value!r}: {r.pattern[1]}")
    return out


def width_list_problems(key: str, widths: list[int], least: int) -> list[str]:
    """A list of widths: non-empty (coord-check fits a slope, so two or more), positive,
    distinct, none over the width cap."""
    if len(widths) < least or any(w <= 0 for w in widths) or len(set(widths)) < len(widths):
        return [f"{key}={list(widths)} must list {'two or more' if least > 1 else 'one or more'} "
                "distinct positive widths"]
    if max(widths) > MAX_WIDTH:
        return [f"{key}={list(widths)}: {max(widths)} is over the limit of {MAX_WIDTH} ({WIDTH_WHY})"]
    return []


# --------------------------------------------------------------------------------------------
# model: the keys one architecture reads, and each architecture's own rules
# --------------------------------------------------------------------------------------------


def reads(arch: str, readers: tuple[str, ...]) -> bool | None:
    """Whether model.arch=`arch` reads a key declared `read_by=readers`: a built-in by name, a
    user's class (module:Class) where YOUR_CLASS is listed; None (not known) for an
    architecture registered elsewhere, which checks its own settings."""
    if arch in BUILTIN_ARCHS:
        return arch in readers
    return YOUR_CLASS in readers if ":" in arch else None


def arch_problems(m: ModelConfig) -> list[str]:
    """The model keys m.arch does not read, set to other than their default (they would change
    nothing, in silence), and each architecture's own rules."""
    out: list[str] = []
    if m.args and m.arch in BUILTIN_ARCHS:
        out.append(f"model.args is for your own model class (model.arch=module.path:Class); "
                   f"model.arch={m.arch} is built in and reads none of it")
    defaults = ModelConfig()
    for key, r in declared_rules().items():
        name = key.removeprefix("model.")
        if r.read_by is None or not key.startswith("model.") or reads(m.arch, r.read_by) is not False:
            continue
        value = getattr(m, name)
        if value != getattr(defaults, name):
            who = ", ".join("your own class" if a == YOUR_CLASS else a for a in r.read_by)
            shown = str(value).lower() if isinstance(value, bool) else value  # as written
            out.append(f"{key}={shown} is not read by model.arch={m.arch} (only by {who}): "
                       "it would change nothing; leave it out")
    if m.arch == "uvit" and m.depth >= 1 and m.depth % 2 == 0:
        out.append(f"model.depth={m.depth}: U-ViT needs an odd depth (depth//2 in-blocks, 1 "
                   f"mid-block, depth//2 out-blocks); try {m.depth + 1}")
    return out


# --------------------------------------------------------------------------------------------
# Checks across keys (each only where the keys it reads are valid on their own)
# --------------------------------------------------------------------------------------------


def train_relations(t: TrainConfig) -> list[str]:
    if t.resume and t.run_dir is None:  # it would start a new run in silence
        return ["train.resume=true needs train.run_dir, the run to continue (or use "
                "`mupsweep train --resume RUN_DIR`)"]
    return []


def shape_relations(m: ModelConfig) -> list[str]:
    """Width = heads x head_dim at every width the model is built at, and an MLP of units."""
    out: list[str] = []
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
    return out


def diffusion_relations(d: DiffusionConfig) -> list[str]:
    rules = declared_rules()
    out: list[str] = []
    if d.beta_start in rules["diffusion.beta_start"].valid \
            and d.beta_end in rules["diffusion.beta_end"].valid and not d.beta_start < d.beta_end:
        out.append(f"diffusion.beta_start={d.beta_start} must be < diffusion.beta_end={d.beta_end}")
    if d.kind == "ddpm" and d.sample_steps > d.num_timesteps >= 2:
        out.append(f"diffusion.sample_steps={d.sample_steps} is more than diffusion.num_timesteps="
                   f"{d.num_timesteps}: DDIM steps are distinct timesteps")
    return out


def warmup_relation(o: OptimConfig, t: TrainConfig) -> list[str]:
    # A run that ends inside its warmup never trains at optim.lr: a sweep would tune the wrong
    # number. (warmup_steps == steps is allowed: the lr reaches optim.lr at the last step.)
    if o.warmup_steps > t.steps >= 0:
        return [f"optim.warmup_steps={o.warmup_steps} is more than train.steps={t.steps}: the "
                "run would end before its lr reaches optim.lr; lower the warmup or train longer"]
    return []


def depth_relations(m: ModelConfig) -> list[str]:
    if m.depth_parametrization == "completep" and m.parametrization == "sp":
        # CompleteP's Table 1 is muP plus depth factors; under SP the width factors it builds
        # on are absent and HPs do not transfer across width, so there is nothing to complete.
        return ["model.depth_parametrization=completep needs model.parametrization=mup "
                "(got sp); use depth_parametrization=none with sp"]
    return []


def sweep_relations(s: SweepConfig) -> list[str]:
    if s.grace_s is not None and s.heartbeat_s > 0 and s.grace_s <= s.heartbeat_s:
        return [f"sweep.grace_s={s.grace_s} must be more than sweep.heartbeat_s={s.heartbeat_s}, "
                "or a live worker's trial is failed between two heartbeats"]
    return []
