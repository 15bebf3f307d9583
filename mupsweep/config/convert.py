"""Into the schema and back: a DictConfig merged into the dataclasses (unknown keys and wrong
types refused, with "did you mean"; a boolean given as 2 or "yes" refused, never coerced), and
a Config as YAML, a dict, or with one dotted key set.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mupsweep.config.checks import check_config, did_you_mean
from mupsweep.config.schema import Config
from mupsweep.errors import UserError
from mupsweep.util import MISSING, first_line, get_dotted


def to_config(node: Any) -> Config:
    """Merge a DictConfig into the schema (rejects unknown keys) and return a plain dataclass."""
    node, args = _take_model_args(lift_model_extra(node))
    _check_booleans(node)
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, node)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(unknown_key_message(e) or f"config error: {first_line(e)}") from None
    if args is not None:
        cfg.model.args = args
    check_config(cfg)
    return cfg


# Until issue 17, the keys one architecture reads lived in an untyped dict, model.extra; they
# are model keys now, checked as every key is. A config saved before (a run directory's, a
# study's, one transfer wrote) still loads: its model.extra entries become these keys.
EXTRA_RENAMED = {"conv": "output_conv", "text_encoder": "text_encoder", "text_file": "text_file",
                 "text_dim": "text_dim", "text_len": "text_len", "pooled_dim": "pooled_dim"}


def lift_model_extra(node: Any) -> Any:
    """`node` with a saved config's model.extra entries moved to their model keys
    (EXTRA_RENAMED); an entry that was never one of them is left there, for the schema to
    refuse by name."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    model = node.get("model") if isinstance(node, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("extra"), dict | DictConfig):
        return node
    model = dict(model)
    extra = dict(model.pop("extra"))
    for old, new in EXTRA_RENAMED.items():
        if old in extra:
            model[new] = extra.pop(old)
    if extra:
        model["extra"] = extra
    return {**node, "model": model}


def model_extra_gone(key: str) -> str:
    """The line for model.extra or a key below it, written today: which model key to use."""
    name = key.removeprefix("model.extra").lstrip(".")
    now = f"model.{EXTRA_RENAMED[name]}" if name in EXTRA_RENAMED else "the model key itself"
    return (f"{key}: model.extra is gone, its settings are model keys now; write {now} "
            f"(output_conv for U-ViT's conv; text_encoder, text_file, text_dim, text_len, "
            f"pooled_dim for a caption model)")


def as_today(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a run's config.yaml, a checkpoint's) as today's schema reads it: keys
    added since at their defaults, model.extra lifted; as saved (lifted) when it no longer
    loads, for the caller's comparison to name what differs."""
    lifted = lift_model_extra(saved)
    try:
        return to_dict(from_dict(lifted))
    except UserError:
        return lifted


def _take_model_args(node: Any) -> tuple[Any, dict[str, Any] | None]:
    """(the node without model.args, model.args as written). Its ${model.width}-style values
    stay unresolved: mupsweep resolves them at every size it builds (models/user.py), where
    OmegaConf would resolve them once, to the composed width, or fail on ${model.heads}."""
    if isinstance(node, DictConfig):  # Hydra's node is typed by the loose schema: drop that type
        node = OmegaConf.to_container(node, resolve=False)
    if not isinstance(node, dict) or not isinstance(node.get("model"), dict) or "args" not in node["model"]:
        return (OmegaConf.create(node) if isinstance(node, dict) else node), None
    model = dict(node["model"])
    args = model.pop("args")
    if isinstance(args, DictConfig):
        args = OmegaConf.to_container(args, resolve=False)
    if args is None:
        args = {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise UserError(f"model.args={args!r} must be a mapping of keyword arguments (name: value)")
    return OmegaConf.create({**node, "model": model}), args


# OmegaConf turns anything into a bool field's value: 2 and "yes" become true, 0 and "no" false.
# A typo'd boolean must not change a run in silence, so the schema Hydra composes into keeps its
# booleans loose (typed Any, every other field as strict as the schema), and `_check_booleans`
# reads them as given before the strict schema converts them.


@functools.cache
def loose_schema(cls: type) -> type:
    """`cls` (a schema dataclass) with every bool field, nested ones included, typed Any."""
    fields = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        kind, default = hint, f.default
        factory = f.default_factory
        if _is_bool(hint):
            kind = Any
        elif dataclasses.is_dataclass(hint):
            kind = factory = loose_schema(hint)
        elif typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            kind = list[loose_schema(typing.get_args(hint)[0])]  # type: ignore[misc]
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


def _schema_keys(path: str) -> list[str] | None:
    """The field names of the schema section at `path` ('' = top level); None if not one."""
    section = get_dotted(Config(), path) if path else Config()
    if section is MISSING or not dataclasses.is_dataclass(section):
        return None
    return [f.name for f in dataclasses.fields(section)]


def unknown_key_message(e: BaseException | None) -> str | None:
    """'unknown key model.widht; did you mean model.width? (keys of model: ...)' for an
    OmegaConf "Key 'x' not in 'Y'" error, else None."""
    full_key = getattr(e, "full_key", None)
    if not full_key:  # Hydra wraps the error of a key inside a group file in its message
        found = re.search(r"not in '\w+'\s+full_key: (\S+)", str(e or ""))
        full_key = found.group(1) if found else None
    if not full_key or "not in" not in str(e):
        return None
    if str(full_key).split(".")[:2] == ["model", "extra"]:
        return model_extra_gone(str(full_key))
    section, _, name = str(full_key).rpartition(".")
    keys = _schema_keys(section)
    if keys is None:
        return None
    where = f"keys of {section}" if section else "sections"
    hint = did_you_mean(name, keys, f"{section}." if section else "")
    return f"unknown key {full_key}{'; ' + hint if hint else ' '}({where}: {', '.join(keys)})"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any] | DictConfig) -> Config:
    return to_config(OmegaConf.create(d) if isinstance(d, dict) else d)


def set_by_path(cfg: Config, key: str, value: Any) -> None:
    """Set `model.width`-style keys on a Config dataclass (used by sweeps and coord-check);
    a dict entry (model.args.num_heads) is set or added."""
    section_key, _, name = key.rpartition(".")
    parent = get_dotted(cfg, section_key) if section_key else cfg
    if isinstance(parent, dict):
        parent[name] = value
    elif parent is MISSING or isinstance(parent, list) or not hasattr(parent, name):
        raise UserError(f"unknown config key {key!r}")
    else:
        setattr(parent, name, value)
