"""What a config key's rules can say, and `key()` / `section()`, which declare them on a field.

A key's rules are declared with the key, in the schema (`mupsweep.config.schema`):

    lr: float = key(2e-3, valid=POSITIVE, per_member=True)

Every field of the schema goes through `key()` or `section()` (a test refuses one that does
not), so a new key's author answers, at the key, the questions the rest of mupsweep asks of
it: which values are valid, which architectures read it, whether it changes a run's result, whether it belongs to a study's
signature, whether it may differ between the members of a pack, whether width transfer carries
the tuned HPs over a change of it, what a model preset may do to it, and why it is no
hyperparameter. `mupsweep.config.keys` derives every list of keys from these declarations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

RULES = "mupsweep.rules"  # the field metadata entry that holds a key's KeyRules

# What `preset=` may say of a key: a model preset sets it on the target (the model's size), or
# the proxy's value is kept whatever the preset says (the base shapes, with a warning when they
# differ), or the study's value is kept in silence (its parametrization). A key with none of
# these must match the proxy's, unless the transfer command line overrides it by name.
PRESET_SETS = "sets"
PRESET_KEEPS_PROXY = "keeps proxy"
PRESET_KEEPS_STUDY = "keeps study"

# In `read_by=`: a user's own class (model.arch=module:Class), which may read the key.
YOUR_CLASS = "module:Class"


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
            return f"{what if integer else 'a finite number'} {op} {show_number(self.low)}"
        return (f"{what} in {'(' if self.low_open else '['}{show_number(self.low)}, "
                f"{show_number(self.high)}{')' if self.high_open else ']'}")


def show_number(x: float) -> str:
    """1 for 1.0, 0.5 for 0.5: a bound as a person writes it."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
UNIT = Range(0, 1)  # [0, 1]
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
BELOW_1 = Range(0, 1, high_open=True)  # [0, 1)
SEED = Range(0, 2**31 - 1)  # numpy and Optuna samplers take seeds below 2**32; workers add k


@dataclass(frozen=True)
class KeyRules:
    """The rules of one config key (a field) or of a whole section.

    The checks of a value (valid .. pattern) apply to the field that declares them. The other
    rules (neutral .. not_hp) cover every key below the one that declares them: `coord`'s
    neutral=True makes coord.lr result-neutral too. None means "not declared here": the
    section's declaration, else the default named below, applies."""

    # -- checks of the value (mupsweep.config.checks); None: any value of the field's type
    valid: Range | None = None  # a number's valid values (a null value is left to the type)
    cap: tuple[int, str] | None = None  # (limit, why): a size no real use comes near
    choices: tuple[str, ...] | None = None  # a name-valued key's names
    non_empty: bool = False  # a path or name: "" is refused (it would mean "here" or "none")
    pattern: tuple[re.Pattern[str], str] | None = None  # (full match, what to use instead)
    min_widths: int | None = None  # a list of widths: at least this many, distinct, positive
    # the model.arch values that read the key (YOUR_CLASS: any module:Class); set to other than
    # its default under another architecture it is refused, as it would change nothing
    read_by: tuple[str, ...] | None = None
    # -- what the rest of mupsweep does with the key
    neutral: bool | None = None  # True: cannot change what a run computes (resume ignores it)
    signature: bool | None = None  # False: out of a study's signature (cannot change a loss)
    per_member: bool | None = None  # True: the members of one pack may differ in it
    transfers: bool | None = None  # False: width transfer does not cover a proxy/target difference
    preset: str | None = None  # PRESET_SETS | PRESET_KEEPS_PROXY | PRESET_KEEPS_STUDY
    not_hp: str | None = None  # why it is no hyperparameter (sweep.params refuses it)

    def __post_init__(self) -> None:
        if self.preset not in (None, PRESET_SETS, PRESET_KEEPS_PROXY, PRESET_KEEPS_STUDY):
            raise ValueError(f"preset={self.preset!r}: use PRESET_SETS, PRESET_KEEPS_PROXY "
                             "or PRESET_KEEPS_STUDY")


# The rules a section's declaration passes down to every key below it.
INHERITED = ("neutral", "signature", "per_member", "transfers", "preset", "not_hp")


def key(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
        **rules: Any) -> Any:
    """A schema field with its default (or `factory` for a mutable one) and its rules (the
    keyword arguments of KeyRules; a misspelt rule is a TypeError at import)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={RULES: KeyRules(**rules)})


def section(cls: type, **rules: Any) -> Any:
    """A schema field holding a whole section (a dataclass), with the rules of every key in it."""
    return key(factory=cls, **rules)


def rules_of(f: dataclasses.Field) -> KeyRules | None:
    """The rules a field declares; None for a field declared without `key()` / `section()`."""
    return f.metadata.get(RULES)
