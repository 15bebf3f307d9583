"""Model presets as a transfer's target: list them, load one as {config key: value}, and apply
one to the target, which may take the preset's size only.

A preset is the wide model the proxy stands for. What it may do to each key, the key declares
in the schema (`preset=`): the size (model.width, model.depth) is set on the target; the
proxy's base shapes and head_dim are kept, with a warning when the preset's differ; the study's
parametrization is kept in silence. A preset of another architecture is refused, and so is any
other difference from the proxy (learn_sigma, patch_size, diffusion.kind, the caption
settings model.text_*, ...), in one error listing every difference, unless that key is also given as an
override: an explicit override is accepted, and recorded in provenance (`accepted`).

Also the small helpers a transfer's messages share: the keys a list of overrides sets, a value
written as in an override, and a value made YAML-safe for provenance.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from mupsweep.config import (
    PRESET_KEEPS_PROXY,
    PRESET_KEEPS_STUDY,
    PRESET_SETS,
    Config,
    config_groups,
    config_search_path,
    covers,
    preset_keys,
    set_by_path,
)
from mupsweep.errors import UserError
from mupsweep.util import MISSING, get_dotted


def list_presets(config_dir: str | Path | None = None) -> list[str]:
    """The model presets on the config search path: the packaged ones and the user's
    (`config_dir`, else ./configs)."""
    return config_groups(config_dir).get("model", [])


def load_preset(name: str, config_dir: str | Path | None = None) -> dict[str, Any]:
    """A model preset (`model=NAME`: CONFIG_DIR/model/NAME.yaml or ./configs/model/NAME.yaml,
    else the packaged one, the order `compose` uses) as {config key: value}, flattened:
    {"model.arch": "pixart", "model.text_dim": 4096, "diffusion.kind": ...}. A preset in
    Hydra's `_global_` package (mmdit*) sets whole sections; the others set model fields."""
    from omegaconf import OmegaConf

    found = [root / "model" / f"{name}.yaml" for root in reversed(config_search_path(config_dir))]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        presets = list_presets(config_dir)
        close = difflib.get_close_matches(name, presets, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"--preset {name!r} is unknown; {hint}presets: {', '.join(presets)}")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # model.args keeps its ${...}
    is_global = "@package _global_" in path.read_text().split("\n", 1)[0]
    return _flatten(node if is_global else {"model": node})


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a preset's leaves (an empty mapping sets nothing)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def apply_preset(cfg: Config, proxy: Config, preset: str, settings: dict[str, Any],
                 overrides: list[str], tuned: dict[str, Any]
                 ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Set the preset's size (`settings`, from `load_preset`) on `cfg`; refuse any other
    difference between the preset and the proxy that the user did not accept by overriding
    that key.

    Returns (accepted, warnings): each differing key the user overrides, with its proxy and
    preset values (the override sets the target's value later; see `accepted_differences`)."""
    arch = settings.get("model.arch", proxy.model.arch)
    if arch != proxy.model.arch:
        raise UserError(f"--preset {preset} is a {arch} model but the proxy is a "
                        f"{proxy.model.arch}: tuned HPs do not transfer across architectures; "
                        f"tune a narrow {arch} proxy (model={preset} model.width=...)")
    explicit = override_keys(overrides)
    sets, keeps_study, keeps_proxy = (preset_keys(what) for what in (
        PRESET_SETS, PRESET_KEEPS_STUDY, PRESET_KEEPS_PROXY))
    kept: list[str] = []
    differences: list[tuple[str, Any, Any]] = []
    accepted: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        before = get_dotted(proxy, key)
        if covers(sets, key):
            set_by_path(cfg, key, value)
        elif covers(keeps_study, key) or key in tuned:
            continue  # the study's parametrization and tuned values win
        elif covers(keeps_proxy, key):
            if value != before:
                kept.append(f"{key}={value} (kept {before})")
        elif before != value:
            if key in explicit:
                accepted[key] = {"proxy": None if before is MISSING else plain(before),
                                 "preset": plain(value)}
            else:
                differences.append((key, before, value))
    if differences:
        listed = "; ".join(f"{k}: proxy {override_text(a)}, preset {override_text(b)}"
                           for k, a, b in differences)
        keep = " ".join(f"{k}={override_text(a)}" for k, a, _ in differences if a is not MISSING)
        take = " ".join(f"{k}={override_text(b)}" for k, _, b in differences)
        raise UserError(f"--preset {preset} changes what muP does not transfer ({listed}); the "
                        "tuned HPs were not tuned for that model. Accept each by name on the "
                        f"transfer command line ({take})" + (f", or keep the proxy's ({keep})"
                                                             if keep else ""))
    warnings = []
    if kept:
        warnings.append(f"preset {preset} sets {', '.join(kept)}: the proxy's base shapes "
                        "and head_dim are kept so the tuned HPs apply; override them to "
                        "change them (then the HPs are not transferred by muP)")
    return accepted, warnings


def accepted_differences(overridden: dict[str, dict[str, Any]],
                         cfg: Config) -> dict[str, dict[str, Any]]:
    """The preset differences the overrides accepted: those whose target value is not the
    proxy's (overriding a key back to the proxy's value keeps the proxy's model)."""
    out = {}
    for key, values in overridden.items():
        target = plain(get_dotted(cfg, key))
        if target != values["proxy"]:
            out[key] = {**values, "target": target}
    return out


def preset_choices(preset: str, settings: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """{config key: (value, "--preset NAME")} for what the preset chooses for the target: its
    settings, less those whose proxy's or study's value is kept."""
    kept = (*preset_keys(PRESET_KEEPS_PROXY), *preset_keys(PRESET_KEEPS_STUDY))
    return {key: (value, f"--preset {preset}") for key, value in settings.items()
            if not covers(kept, key)}


# --------------------------------------------------------------------------------------------
# Overrides and values, as transfer's messages and provenance show them
# --------------------------------------------------------------------------------------------


def override_keys(overrides: list[str]) -> set[str]:
    """The keys a list of `key=value` overrides sets (`+key=value` sets key)."""
    return {item.split("=", 1)[0].lstrip("+") for item in overrides}


def override_text(value: Any) -> str:
    """A value the way it is written in an override: true, null, 4096, rectified_flow; a key
    a config lacks is "unset"."""
    if value is MISSING:
        return "unset"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def plain(v: Any) -> Any:
    """Only YAML-safe scalars and containers go into provenance."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    return str(v)
