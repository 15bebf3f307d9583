"""Hydra composition: the search path (the user's ./configs or --config-dir, then the packaged
groups), `compose` (Hydra's compose API, or a resolved --config file, plus key=value
overrides), `with_overrides` (the same overrides on a Config in memory), Hydra's sweep syntax as
sweep.params axes, and `copy_preset`.

Hydra YAML files fill the schema's dataclasses: the user's own `./configs` of the current
directory (or `--config-dir DIR`) first, so `configs/model/mine.yaml` is `model=mine`, then the
packaged defaults under `mupsweep/configs/` (so an installed mupsweep composes anywhere; the
root defaults list is `mupsweep/config_root/config.yaml`). Merging into the dataclass schema
rejects unknown keys and wrong types, so a typo on the command line is an error naming the
nearest valid name, not a silently ignored override.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mupsweep.config.checks import did_you_mean
from mupsweep.config.convert import (
    loose_schema,
    model_extra_gone,
    to_config,
    to_dict,
    unknown_key_message,
)
from mupsweep.config.schema import Config, SweepParam
from mupsweep.errors import UserError
from mupsweep.util import first_line

PACKAGE_DIR = Path(__file__).parent.parent  # mupsweep/
CONFIG_DIR = PACKAGE_DIR / "configs"  # the packaged config groups (model/, data/, ...)
# The packaged root config (defaults list) lives apart from the groups, so that Hydra's search
# path can be: root, then the user's configs, then the packaged groups; a user's
# configs/model/dit-tiny.yaml then wins over the packaged one, as Hydra users expect.
ROOT_CONFIG_DIR = PACKAGE_DIR / "config_root"
USER_CONFIG_DIR = "configs"  # the user's presets, relative to the current directory


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
        raise UserError(f"unknown config group {group!r}; {did_you_mean(group, groups)}"
                        f"(groups: {', '.join(groups)})")
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    if source not in options:
        raise UserError(f"unknown packaged {group} {source!r}; {did_you_mean(source, options)}"
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
        return _merge_overrides(_load_resolved(Path(config_file)), overrides)
    return _compose_with_hydra(overrides, config_dir, sweeps)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with `key=value` overrides applied, in memory, parsed and checked as the
    overrides of `compose(config_file=...)` are (a field each, no group switched); the result
    is checked whole, also with no overrides."""
    overrides = list(overrides)
    _check_override_keys(overrides)
    return _merge_overrides(OmegaConf.create(to_dict(cfg)), overrides)


def _load_resolved(path: Path) -> DictConfig:
    """A --config file: a whole resolved config (`_check_resolved`)."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        base = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry multi-line messages
        raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    _check_resolved(base, path)
    return base


def _merge_overrides(base: DictConfig, overrides: list[str]) -> Config:
    """Overrides of single fields merged onto a whole config (no Hydra: no groups)."""
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
    return to_config(OmegaConf.merge(base, dot))


def _compose_with_hydra(overrides: list[str], config_dir: str | Path | None,
                        sweeps: bool) -> Config:
    """`compose` from the search path, with Hydra's compose API."""
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
    # The schema with its booleans loose (`loose_schema`): 2 or "yes" reach `_check_booleans` as
    # given, instead of becoming true inside Hydra.
    ConfigStore.instance().store(name="schema", node=loose_schema(Config))
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
        known = unknown_key_message(e.__cause__) or unknown_key_message(e)
        if known:
            where = re.match(r"In '([^']+)'", str(e))  # the group file that has the key
            raise UserError((f"{where.group(1)}.yaml: " if where else "") + known) from None
        cause = f" ({first_line(e.__cause__)})" if e.__cause__ is not None else ""
        raise UserError(f"config error: {first_line(e)}{cause}") from None
    finally:
        GlobalHydra.instance().clear()
    cfg = to_config(node)
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
    """Refuse an override with no key, Hydra's runtime keys (which would be ignored in
    silence), naming mupsweep's equivalent, and model.extra (its keys are model keys now)."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" in item and not key:
            raise UserError(f"override {item!r} has no key: write KEY=VALUE, e.g. model.width=128")
        if key.split(".")[:2] == ["model", "extra"]:
            raise UserError(model_extra_gone(key))
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
            hint = did_you_mean(key, list(groups))
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
    hint = did_you_mean(name, options)
    return f"unknown {group} {name!r}{'; ' + hint if hint else ' '}(options: {', '.join(options)})"


# Sections added after mupsweep first wrote configs: a file written before one of them lacks
# it and takes its defaults (`eval`: what a run measures besides the validation loss).
SECTIONS_ADDED_SINCE = ("eval",)


def _check_resolved(base: Any, path: Path) -> None:
    """A --config file is a whole resolved config (from `transfer`, or a run's config.yaml):
    an empty or cut-off file would otherwise train the defaults in silence. Sections are
    written in schema order with provenance last, so a truncated file lacks provenance."""
    if not isinstance(base, DictConfig):
        raise UserError(f"config file {path} is not a mapping of config sections")
    missing = [f.name for f in dataclasses.fields(Config)
               if f.name not in base and f.name not in SECTIONS_ADDED_SINCE]
    if missing:
        raise UserError(f"config file {path} is not a complete resolved config: missing "
                        f"{', '.join(missing)} (write one with `mupsweep transfer`, or use a "
                        "run directory's config.yaml)")

