"""The config: the schema with each key's rules, the lists derived from them, the checks, and
Hydra composition; `from mupsweep.config import X` for every name the rest of mupsweep uses.

    rules.py        what a key's rules can say; key() / section() declare them on a field
    schema.py       the dataclasses: every key, its default, what it is, and its rules
    keys.py         lists of keys derived from the rules (result-neutral, signature, per pack
                    member, transfer, presets, not hyperparameters); config_differences
    checks.py       check_config: every invalid value named; the keys one architecture reads
    convert.py      a node into the schema (unknown keys, types, booleans) and back out
    composition.py  Hydra compose, the search path, overrides in memory, copy_preset
"""

from mupsweep.config.checks import check_config, did_you_mean
from mupsweep.config.composition import (
    CONFIG_DIR,
    HYDRA_KEYS,
    ROOT_CONFIG_DIR,
    USER_CONFIG_DIR,
    compose,
    config_groups,
    config_search_path,
    copy_preset,
    hydra_sweep_param,
    with_overrides,
)
from mupsweep.config.convert import as_today, from_dict, set_by_path, to_dict, to_yaml
from mupsweep.config.keys import (
    config_differences,
    covers,
    is_per_member,
    keys_outside_signature,
    keys_where,
    not_hyperparameters,
    per_member_keys,
    preset_keys,
    result_neutral_keys,
    untransferred_keys,
    why_not_a_hyperparameter,
)
from mupsweep.config.rules import (
    PRESET_KEEPS_PROXY,
    PRESET_KEEPS_STUDY,
    PRESET_SETS,
    KeyRules,
    Range,
    key,
    section,
)
from mupsweep.config.schema import (
    BUILTIN_ARCHS,
    Config,
    CoordCheckConfig,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    SweepConfig,
    SweepParam,
    TrainConfig,
)

__all__ = [
    "as_today",
    "BUILTIN_ARCHS", "CONFIG_DIR", "HYDRA_KEYS", "PRESET_KEEPS_PROXY", "PRESET_KEEPS_STUDY",
    "PRESET_SETS", "ROOT_CONFIG_DIR", "USER_CONFIG_DIR", "Config", "CoordCheckConfig",
    "DataConfig", "DiffusionConfig", "KeyRules", "ModelConfig", "OptimConfig",
    "Range", "EvalConfig", "SweepConfig", "SweepParam", "TrainConfig", "check_config", "compose",
    "config_differences", "config_groups", "covers", "config_search_path", "copy_preset", "did_you_mean",
    "from_dict", "hydra_sweep_param", "is_per_member", "key", "keys_outside_signature",
    "keys_where", "not_hyperparameters", "per_member_keys", "preset_keys",
    "result_neutral_keys", "section", "set_by_path", "to_dict", "to_yaml", "untransferred_keys",
    "why_not_a_hyperparameter", "with_overrides",
]
