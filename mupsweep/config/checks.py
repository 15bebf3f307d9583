"""check_config: every invalid value of a config named in one error, with what would be valid.

Each key's own checks are the rules it declares in the schema (a range and a cap, names, not
empty, a list of widths, a pattern); `model.extra` is checked against what its architecture
reads (`EXTRA_KEYS`); checks across keys come last, one function per section they read.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

from mupsweep.config.keys import declared_rules, schema_fields
from mupsweep.config.rules import POSITIVE, Range
from mupsweep.config.schema import (
    MAX_TOKENS,
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
# model.extra: what each architecture reads
# --------------------------------------------------------------------------------------------


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
TEXT_KEYS = {
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
    "pixart": TEXT_KEYS,
    "mmdit": TEXT_KEYS,
}


def arch_problems(m: ModelConfig) -> list[str]:
    """`model.extra` against what m.arch reads (`EXTRA_KEYS`), and each architecture's own rules.
    An architecture registered elsewhere (not in EXTRA_KEYS) checks its own keys."""
    keys = extra_keys_of(m.arch)
    if m.args and m.arch in EXTRA_KEYS:
        return [f"model.args is for your own model class (model.arch=module.path:Class); "
                f"model.arch={m.arch} is built in and reads none of it"]
    if keys is None:
        return []
    out: list[str] = []
    for name, value in m.extra.items():
        spec = keys.get(name)
        if spec is None:
            hint = did_you_mean(str(name), list(keys), "model.extra.")
            reads = f"it reads {', '.join(keys)}" if keys else "it reads no model.extra keys"
            out.append(f"unknown key model.extra.{name} for model.arch={m.arch}"
                       f"{'; ' + hint if hint else ' '}({reads})")
        elif (problem := spec.problem(value)) is not None:
            out.append(f"model.extra.{name}={value!r} must be {problem}")
    if m.arch == "uvit" and m.depth >= 1 and m.depth % 2 == 0:
        out.append(f"model.depth={m.depth}: U-ViT needs an odd depth (depth//2 in-blocks, 1 "
                   f"mid-block, depth//2 out-blocks); try {m.depth + 1}")
    return out


def extra_keys_of(arch: str) -> dict[str, ExtraKey] | None:
    """What `arch` reads from model.extra: a built-in's EXTRA_KEYS entry; a user's class
    (module:Class) the text keys, which its caption conditioner reads when its forward takes
    captions; None for an architecture registered elsewhere (it checks its own)."""
    return EXTRA_KEYS.get(arch, TEXT_KEYS if ":" in arch else None)


def model_extra(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg.extra` with its architecture's defaults filled in, checked as check_config checks it
    (a UserError naming the key otherwise): what the model files and the text conditioner read,
    also when they are given a ModelConfig that was never composed."""
    problems = arch_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
    defaults = {name: spec.default for name, spec in (extra_keys_of(cfg.arch) or {}).items()}
    return {**defaults, **cfg.extra}


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
