"""Lists of config keys, derived from the rules each key declares in the schema: which keys
are result-neutral, out of a study's signature, per pack member, not carried by width transfer,
set or kept by a model preset, and why a key is no hyperparameter; and `config_differences`,
which resume reads the result-neutral ones for.

A listed key stands for every key below it: `coord` makes coord.lr result-neutral too
(`covers`). Lists are in schema order, a section before its keys.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

from mupsweep.config.rules import INHERITED, KeyRules, rules_of
from mupsweep.config.schema import NEUTRAL_WHY, Config


def schema_fields(cls: type = Config, prefix: str = ""):
    """(dotted key, field, type) for every field of the schema `cls`, the fields of each
    section after the section, in schema order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f, hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], f"{prefix}{f.name}.")


def undeclared_keys(cls: type = Config) -> list[str]:
    """The keys of the schema `cls` whose field declares no rules (made without `key()` /
    `section()`): each must, so that every list below holds a new key or says why not."""
    return [path for path, f, _ in schema_fields(cls) if rules_of(f) is None]


@functools.cache
def declared_rules(cls: type = Config) -> types.MappingProxyType[str, KeyRules]:
    """{dotted key: the rules its field declares} for every key of the schema `cls`, sections
    included, in schema order (a field declared without rules has the defaults). Read-only:
    the schema is fixed once imported."""
    return types.MappingProxyType({path: rules_of(f) or KeyRules()
                                   for path, f, _ in schema_fields(cls)})


def ancestors(path: str) -> list[str]:
    """The sections above a key: coord.lr -> [coord]; a.b.c -> [a, a.b]."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def covers(keys: typing.Iterable[str], key: str) -> bool:
    """Whether `key` is one of `keys` or below one of them."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def keys_where(rule: str, value: Any = True) -> tuple[str, ...]:
    """The keys that declare `rule` (one of rules.INHERITED) as `value`, in schema order; a key
    below one listed is not listed again (the section stands for it)."""
    if rule not in INHERITED:
        raise ValueError(f"{rule!r} is no rule a section passes down; use one of {INHERITED}")
    rules = declared_rules()
    return tuple(path for path, r in rules.items() if getattr(r, rule) == value
                 and not any(getattr(rules[a], rule) == value for a in ancestors(path)))


def conflicting_rules(cls: type = Config) -> list[str]:
    """'key: rule=value under section's rule=other' for each key of the schema `cls` that
    declares a rule its section already declares otherwise: the section's would be taken for
    it in silence (a listed section stands for every key in it)."""
    rules = declared_rules(cls)
    out = []
    for path, r in rules.items():
        for rule in INHERITED:
            mine = getattr(r, rule)
            for above in ancestors(path):
                theirs = getattr(rules[above], rule)
                if mine is not None and theirs is not None and mine != theirs:
                    out.append(f"{path}: {rule}={mine!r} under {above}'s {rule}={theirs!r}")
    return out


# --------------------------------------------------------------------------------------------
# The lists the rest of mupsweep reads
# --------------------------------------------------------------------------------------------


def result_neutral_keys() -> tuple[str, ...]:
    """Keys that cannot change what a run computes: how often it logs, evaluates and
    checkpoints, where and how fast it runs, what it saves at the end, and the other commands'
    sections. A resumed run may change them (`config_differences`)."""
    return keys_where("neutral")


def keys_outside_signature() -> tuple[str, ...]:
    """Keys that cannot change a trial's loss, so the trials of one study may differ in them
    (`mupsweep.sweep.study.signature`): where the study lives and how many trials it runs, how
    trials are drawn, how a run is shown, where it writes, what runs it, the sample grid it does
    not draw, and model.width, which every trial sets to each proxy width."""
    return keys_where("signature", False)


def per_member_keys() -> tuple[str, ...]:
    """Keys in which the members of one pack may differ (seed, init and output multipliers,
    the optimizer, ...); everything else the pack's members share (mupsweep/group.py)."""
    return keys_where("per_member")


def is_per_member(key: str) -> bool:
    """Whether config key `key` (e.g. optim.lr) may differ between the members of a pack."""
    return covers(per_member_keys(), key)


def untransferred_keys() -> tuple[str, ...]:
    """Keys width transfer does not cover: a difference between proxy and target in one means
    the tuned HPs may not be optimal for the target (transfer warns)."""
    return keys_where("transfers", False)


def preset_keys(what: str) -> tuple[str, ...]:
    """The keys a model preset sets on a transfer's target (rules.PRESET_SETS), or whose
    proxy's or study's value is kept whatever the preset says (PRESET_KEEPS_PROXY /
    PRESET_KEEPS_STUDY)."""
    return keys_where("preset", what)


def not_hyperparameters() -> dict[str, str]:
    """{key: why it is no hyperparameter}: the keys that declare a reason, and the
    result-neutral keys (schema.NEUTRAL_WHY, unless they declare their own)."""
    declared = {path: r.not_hp for path, r in declared_rules().items() if r.not_hp is not None}
    return {**{path: NEUTRAL_WHY for path in result_neutral_keys()}, **declared}


def why_not_a_hyperparameter(key: str) -> str | None:
    """Why `key` may not be tuned, or None when it may. The most specific entry wins:
    train.run_dir's own reason before its section's."""
    reasons = not_hyperparameters()
    covering = [k for k in reasons if covers([k], key)]
    return reasons[max(covering, key=len)] if covering else None


# --------------------------------------------------------------------------------------------
# Resume: which differences between two configs of one run directory change its results
# --------------------------------------------------------------------------------------------


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict; an empty dict is a value of its own."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key that changes results (train.steps may grow)."""
    a, b = flatten(old), flatten(new)
    neutral = result_neutral_keys()
    out = []
    for key in sorted(a.keys() | b.keys()):
        if covers(neutral, key):
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if key == "train.steps" and isinstance(va, int) and isinstance(vb, int):
            if vb < va:
                out.append(f"train.steps: {va} -> {vb} (steps may only grow)")
        elif va != vb:
            out.append(f"{key}: {va} -> {vb}")
    return out
