"""Best proxy trial -> resolved config for the full-width model, with drift and cost checks.

Under muP the learning rate, init multiplier and output multiplier tuned on a narrow proxy stay
optimal when only the width grows. `transfer()` turns the sweep's "best
document" (written by `mupsweep tune` as best.json) into a target `Config`:

1. start from the sweep's base config (`best["base_config"]`);
2. apply the model preset's width and depth and/or the target width, keeping the proxy's base
   shapes (`model.base_width`, `model.delta_width`) and `model.head_dim`, without which the
   tuned numbers mean something else;
3. apply every tuned HP (`best["hparams"]`), then the user's overrides, then `--steps`;
4. record where the numbers came from in `cfg.provenance` (study, trial, proxy widths, sweep
   cost, estimated target FLOPs and tuning cost as a share of one target run).

A tuned value never overrides a choice made on the command line in silence: a best document
that tuned a key which is no hyperparameter (`sweep.space.NOT_HYPERPARAMETERS`: model.width,
the base shapes, ...) is refused, and so is a tuned value that differs from what --depth,
--steps or --preset sets (an explicit `key=value` override wins, with a warning). The target
config, provenance included, holds no password.

A preset is the wide model the proxy stands for, so it may change width and depth only. A
preset of another architecture is refused; anything else it sets that differs from the proxy
(learn_sigma, patch_size, mlp_ratio, diffusion.kind, model.extra's text settings, ...) is
refused in one error listing every difference, unless that key is also given as an override:
an explicit override is accepted, and recorded in provenance (`accepted_differences`).

Checks, each a warning unless noted: an SP study (HPs do not transfer across width under SP;
an error unless `force`), proxy and target differing in something width transfer does not cover
(base width, head_dim, depth, patch size, batch size), a nonzero gradient clip carried across
width (a clip threshold is not a muP-transferred HP), and lr drift: with two or more proxy
widths, each width's best lr should agree within one octave, or the transfer is unreliable.

Depth: a study tuned with model.depth_parametrization=completep transfers across depth too
(`--depth`, or a preset's depth): the target keeps the proxy's base depth and alpha, and a
depth difference is no longer a warning. Under none it stays one.

The document's shape is fixed by `mupsweep.sweep.summary`; this module only reads it.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mupsweep.sweep.summary import DRIFT_TOLERANCE_OCTAVES, check_best_document, drift_octaves, lr_by_width
from mupsweep.completep import base_depth_of, why_depth_transfer_fails
from mupsweep.config import (
    Config,
    compose,
    config_groups,
    config_search_path,
    from_dict,
    set_by_path,
)
from mupsweep.errors import UserError
from mupsweep.rundir import without_passwords
from mupsweep.sweep.storage import redact_text, redact_url
from mupsweep.sweep.space import not_a_hyperparameter
from mupsweep.util import atomic_write_text, output_dir_problem

# Architecture fields that width transfer does not cover: a difference between proxy and target
# in any of these means the tuned HPs may not be optimal for the target.
NOT_TRANSFERRED = ("model.base_width", "model.delta_width", "model.head_dim", "model.depth",
                   "model.patch_size", "train.batch_size")

# Fields a model preset may not change: muP's base shapes, and head_dim (the attention scale
# and base shapes are tied to it). The proxy's values are kept; override them explicitly to
# change them (and accept the warning).
PROXY_SHAPE_FIELDS = ("base_width", "delta_width", "head_dim")

# What a preset may change: the size of the model, the one thing muP (width) and the depth
# warning above are about. The study's parametrization always wins over the preset's.
PRESET_SIZE_FIELDS = ("model.width", "model.depth")



@dataclass
class TransferResult:
    """What `transfer()` built: the target config, warnings, and the per-width lr table."""

    config: Config
    warnings: list[str] = field(default_factory=list)
    # One row per proxy width: {"width", "lr", "log2_lr", "loss", "trials"} (see lr_by_width).
    drift: list[dict[str, Any]] = field(default_factory=list)
    drift_octaves: float | None = None  # max - min of the per-width best log2 lr
    cost_line: str = ""  # human summary of tuning cost vs one target run

    @property
    def provenance(self) -> dict[str, Any]:
        return self.config.provenance

    @property
    def unreliable(self) -> bool:
        return self.drift_octaves is not None and self.drift_octaves > DRIFT_TOLERANCE_OCTAVES


# --------------------------------------------------------------------------------------------
# Cost: analytic FLOPs of the target run
# --------------------------------------------------------------------------------------------

def _data_spec(cfg: Config):
    """The data's shape: a built-in dataset's is known without loading it (a FLOP estimate
    needs no data); other datasets are loaded to learn theirs."""
    from mupsweep.data import builtin_shape
    from mupsweep.models import DataSpec

    if (shape := builtin_shape(cfg.data.name)) is not None:
        size, channels, classes = shape
        return DataSpec(image_size=cfg.data.image_size or size, channels=channels,
                        num_classes=classes)
    from mupsweep.data import load_dataset
    from mupsweep.parametrize import data_spec_of

    return data_spec_of(load_dataset(cfg.data))


def estimate_train_flops(cfg: Config) -> tuple[float, float]:
    """(FLOPs per image forward, FLOPs of the whole run = 3 x forward x batch x steps).

    The model is built on the meta device: no memory, no init, any width."""
    import torch

    from mupsweep.models import get_model_class

    spec = _data_spec(cfg)
    with torch.device("meta"):
        model = get_model_class(cfg.model.arch)(cfg.model, spec)
    per_image = float(model.flops_per_image(spec))
    return per_image, 3.0 * per_image * cfg.train.batch_size * cfg.train.steps


def _fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


# --------------------------------------------------------------------------------------------
# Building the target config
# --------------------------------------------------------------------------------------------


def list_presets(config_dir: str | Path | None = None) -> list[str]:
    """The model presets on the config search path: the packaged ones and the user's
    (`config_dir`, else ./configs)."""
    return config_groups(config_dir).get("model", [])


def load_preset(name: str, config_dir: str | Path | None = None) -> dict[str, Any]:
    """A model preset (`model=NAME`: CONFIG_DIR/model/NAME.yaml or ./configs/model/NAME.yaml,
    else the packaged one, the order `compose` uses) as {config key: value}, flattened:
    {"model.arch": "dit", "model.extra.text_dim": 4096, "diffusion.kind": ...}. A preset in
    Hydra's `_global_` package (mmdit*) sets whole sections; the others set model fields."""
    from omegaconf import OmegaConf

    found = [root / "model" / f"{name}.yaml" for root in reversed(config_search_path(config_dir))]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        presets = list_presets(config_dir)
        close = difflib.get_close_matches(name, presets, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"--preset {name!r} is unknown; {hint}presets: {', '.join(presets)}")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    is_global = "@package _global_" in path.read_text().split("\n", 1)[0]
    return _flatten(node if is_global else {"model": node})


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_MISSING = object()


def _get(cfg: Config, key: str) -> Any:
    """The value at `key` (dict entries included, as model.extra.text_dim); _MISSING if none."""
    obj: Any = cfg
    for part in key.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part, _MISSING)
        else:
            obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _yaml(value: Any) -> str:
    """A value the way it is written in an override: true, null, 4096, rectified_flow."""
    if value is _MISSING:
        return "unset"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _override_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].lstrip("+") for item in overrides}


def apply_preset(cfg: Config, proxy: Config, preset: str, overrides: list[str],
                 tuned: dict[str, Any], config_dir: str | Path | None = None
                 ) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Set the preset's width and depth on `cfg`; refuse any other difference between the
    preset and the proxy that the user did not accept by overriding that key.

    Returns (warnings, overridden): each differing key the user overrides, with its proxy and
    preset values (the override sets the target's value later; see `_accepted`)."""
    settings = load_preset(preset, config_dir)
    arch = settings.get("model.arch", proxy.model.arch)
    if arch != proxy.model.arch:
        raise UserError(f"--preset {preset} is a {arch} model but the proxy is a "
                        f"{proxy.model.arch}: tuned HPs do not transfer across architectures; "
                        f"tune a narrow {arch} proxy (model={preset} model.width=...)")
    explicit = _override_keys(overrides)
    warnings: list[str] = []
    kept: list[str] = []
    differences: list[tuple[str, Any, Any]] = []
    accepted: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        field_name = key.removeprefix("model.")
        if key in PRESET_SIZE_FIELDS:
            set_by_path(cfg, key, value)
        elif key == "model.parametrization" or key in tuned:
            continue  # the study's parametrization and tuned values win
        elif field_name in PROXY_SHAPE_FIELDS:
            if value != getattr(proxy.model, field_name):
                kept.append(f"{key}={value} (kept {getattr(proxy.model, field_name)})")
        elif _get(proxy, key) != value:
            if key in explicit:
                before = _get(proxy, key)
                accepted[key] = {"proxy": None if before is _MISSING else _plain(before),
                                 "preset": _plain(value)}
            else:
                differences.append((key, _get(proxy, key), value))
    if differences:
        listed = "; ".join(f"{k}: proxy {_yaml(a)}, preset {_yaml(b)}" for k, a, b in differences)
        keep = " ".join(f"{k}={_yaml(a)}" for k, a, _ in differences if a is not _MISSING)
        take = " ".join(f"{k}={_yaml(b)}" for k, _, b in differences)
        raise UserError(f"--preset {preset} changes what muP does not transfer ({listed}); the "
                        "tuned HPs were not tuned for that model. Accept each by name on the "
                        f"transfer command line ({take})" + (f", or keep the proxy's ({keep})"
                                                             if keep else ""))
    if kept:
        warnings.append(f"preset {preset} sets {', '.join(kept)}: the proxy's base shapes "
                        "and head_dim are kept so the tuned HPs apply; override them to "
                        "change them (then the HPs are not transferred by muP)")
    return warnings, accepted


def _apply_overrides(cfg: Config, overrides: list[str],
                     config_dir: str | Path | None = None) -> Config:
    """`key=value` overrides on top of a Config, parsed and validated the way `--config` is."""
    import tempfile

    from mupsweep.config import to_dict, to_yaml

    if not overrides:  # still re-validate: hparams were set without type checks
        return from_dict(to_dict(cfg))
    # compose() validates keys, types and values against the schema; reuse it on a YAML copy
    # rather than re-implementing OmegaConf's override parsing here.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(to_yaml(cfg))
    try:
        return compose(overrides, config_file=f.name, config_dir=config_dir)
    finally:
        Path(f.name).unlink(missing_ok=True)


def _base_config(best: dict[str, Any]) -> Config:
    try:
        return from_dict(best["base_config"])
    except UserError as e:
        raise UserError(f"best document base_config: {e}") from None


def transfer(best: dict[str, Any], width: int | None = None, preset: str | None = None,
             overrides: list[str] | tuple[str, ...] = (), steps: int | None = None,
             force: bool = False, depth: int | None = None,
             config_dir: str | Path | None = None) -> TransferResult:
    """Build the target config from a best document (see the module docstring for the order).

    config_dir: the user's config groups (`--config-dir`; else ./configs), where --preset and
    group overrides (model=NAME, +experiment=NAME) are looked up, as `compose` does.

    Raises UserError for an SP study (unless `force`), for a missing target (no width, preset
    or model.width override) and for any invalid resulting config."""
    best = check_best_document(best, "best document")
    overrides = list(overrides)
    warnings: list[str] = []

    if best["parametrization"] == "sp":
        msg = ("the study used model.parametrization=sp: HPs do not transfer across width "
               "under SP")
        if not force:
            raise UserError(f"{msg}; re-tune with mup, or pass --force to write it anyway")
        warnings.append(msg + " (--force given)")

    if width is None and preset is None and depth is None and not any(
            o.startswith(("model.width=", "model.depth=")) for o in overrides):
        raise UserError("no target given: pass --width N, --depth N and/or --preset NAME "
                        f"(presets: {', '.join(list_presets(config_dir))})")

    if best.get("trial") is None and not best["hparams"]:
        raise UserError("the study has no complete trial yet: nothing to transfer")
    if not best["base_config"]:
        raise UserError("best document has an empty base_config: cannot rebuild the proxy")
    check_tuned_keys(best["hparams"])
    # The proxy the best trial trained: the base config with its tuned values (a swept
    # model.depth included), which the checks below compare the target with.
    proxy = _base_config(best)
    for key, value in best["hparams"].items():
        set_by_path(proxy, key, value)
    # Passwords hidden from the start: _apply_overrides writes this config to a temporary file.
    cfg = without_passwords(_base_config(best))

    # 1. Model preset (its size; nothing else may differ unless overridden) and target width;
    # the proxy's base shapes stay.
    accepted: dict[str, dict[str, Any]] = {}
    preset_settings: dict[str, Any] = {}
    if preset is not None:
        preset_warnings, accepted = apply_preset(cfg, proxy, preset, overrides, best["hparams"],
                                                 config_dir)
        warnings += preset_warnings
        preset_settings = load_preset(preset, config_dir)
    check_tuned_against_command_line(
        best["hparams"], command_line_choices(preset, preset_settings, width, depth, steps),
        overrides)
    if width is not None:
        cfg.model.width = width
    if depth is not None:
        cfg.model.depth = depth
    if proxy.model.depth_parametrization == "completep":
        # The tuned HPs belong to the proxy's base depth, as they do to its base width.
        cfg.model.base_depth = base_depth_of(proxy.model)
        why = why_depth_transfer_fails(proxy.model)
        if why and cfg.model.depth != proxy.model.depth:
            raise UserError(f"target depth {cfg.model.depth} != proxy depth "
                            f"{proxy.model.depth}, but HPs do not carry across depth here: {why}")

    # 2. The tuned HPs: resolved values keyed by config path.
    for key, value in best["hparams"].items():
        set_by_path(cfg, key, value)

    # 3. Target-run defaults: a new run directory for every `train --config` of it, as for any
    # other run (a fixed one would refuse the second target trained from the same folder);
    # a train.run_dir=DIR override names one. It saves (sweep trials may not).
    cfg.train.run_dir = None
    cfg.train.save = True
    if steps is not None:
        cfg.train.steps = steps

    # 4. The user's overrides last; say so when one replaces a tuned value.
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if key in best["hparams"]:
            warnings.append(f"override {redact_text(item)} replaces the tuned "
                            f"{key}={best['hparams'][key]}")
    cfg = _apply_overrides(cfg, overrides, config_dir)
    if steps is not None:  # --steps wins over a train.steps override given alongside it
        cfg.train.steps = steps
    accepted = _accepted(accepted, cfg)
    for key, values in accepted.items():
        warnings.append(f"{key}: the proxy had {_yaml(values['proxy'])}, the preset "
                        f"{_yaml(values['preset'])}; {_yaml(values['target'])} accepted by the "
                        "override, but the tuned HPs were not tuned for it")

    # 5. What width transfer does not cover.
    for key in NOT_TRANSFERRED:
        a, b = _get(proxy, key), _get(cfg, key)
        if key == "model.depth" and transfers_across_depth(proxy, cfg):
            continue  # CompleteP carries the tuned HPs across depth
        if a != b:
            why = ("muP base shapes differ, so the tuned HPs mean something else"
                   if key in ("model.base_width", "model.delta_width") else
                   "not covered by width transfer; the tuned HPs may not be optimal")
            if key == "model.depth":
                why += " (tune with model.depth_parametrization=completep to transfer across depth)"
            warnings.append(f"proxy {key}={a} but target {key}={b}: {why}")
    warnings += depth_warnings(proxy, cfg)

    # A clip threshold binds on the global gradient norm, which falls as width grows under muP
    # (dit-tiny at init on digits, batch 64: 1.13 at width 32, 0.41 at 256, 0.28 at 512), so
    # the same number clips a different share of the steps at the target width.
    proxy_widths = [int(w) for w in best["proxy_widths"]]
    if (cfg.optim.grad_clip > 0 and "optim.grad_clip" not in _override_keys(overrides)
            and cfg.model.width not in proxy_widths):
        warnings.append(f"optim.grad_clip={cfg.optim.grad_clip:g} is carried from the proxy "
                        f"(widths {', '.join(map(str, proxy_widths))}) to width "
                        f"{cfg.model.width}: a clip threshold is not a muP-transferred HP (the "
                        "global gradient norm falls as width grows, so it clips more or less "
                        "often there); re-tune it at the target width, or disable it with "
                        "optim.grad_clip=0")

    # 6. Drift: each proxy width's best lr should agree.
    rows = lr_by_width(best)
    spread = drift_octaves(rows)
    if spread is not None and spread > DRIFT_TOLERANCE_OCTAVES:
        table = ", ".join(f"width {r['width']}: 2^{r['log2_lr']:.2f}" for r in rows)
        warnings.append(f"transfer looks unreliable: the best lr differs by {spread:.2f} "
                        f"octaves across proxy widths ({table}); check the parametrization "
                        "(mupsweep coord-check) or tune longer")

    # 7. Cost, and the provenance block (plain types only: it must round-trip through YAML).
    cost = best.get("cost") or {}
    sweep_flops = cost.get("flops")
    try:
        per_image, target_flops = estimate_train_flops(cfg)
    except UserError as e:  # e.g. the data is not on this machine: the config is still good
        per_image, target_flops = None, None
        warnings.append(f"target FLOPs not estimated: {e}")
    pct = (100.0 * sweep_flops / target_flops
           if isinstance(sweep_flops, int | float) and target_flops else None)
    cost_line = _cost_line(cost, per_image, target_flops, pct, cfg)
    proxy_share = proxy_flops_share(proxy, best["proxy_widths"], per_image)
    if proxy_share:
        cost_line += "; per image, " + ", ".join(
            f"the proxy (width {w}, depth {proxy.model.depth}) costs {share:.3g}%"
            for w, share in proxy_share.items()) + " of the target"

    cfg.provenance = {
        "source": "mupsweep transfer",
        "study": best.get("study"),
        "storage": redact_url(best.get("storage")),
        "trial": best.get("trial"),
        "value": best.get("value"),
        "parametrization": best["parametrization"],
        "proxy_widths": [int(w) for w in best["proxy_widths"]],
        "base_width": proxy.model.base_width,
        "delta_width": proxy.model.delta_width,
        "head_dim": proxy.model.head_dim,
        "target_width": cfg.model.width,
        "proxy_depth": proxy.model.depth,
        "target_depth": cfg.model.depth,
        "depth_parametrization": proxy.model.depth_parametrization,
        "base_depth": base_depth_of(proxy.model),
        "proxy_flops_pct": {str(w): v for w, v in proxy_share.items()},  # per image
        "preset": preset,
        "hparams": {str(k): _plain(v) for k, v in best["hparams"].items()},
        "lr_by_width": {str(r["width"]): r["lr"] for r in rows},
        "lr_drift_octaves": spread,
        "sweep_cost": {k: _plain(cost.get(k)) for k in
                       ("flops", "wall_time_s", "n_complete", "n_pruned", "n_failed")},
        "target_flops_per_image": per_image,
        "target_train_flops": target_flops,
        "tuning_cost_pct": pct,
        "overrides": overrides,
        "accepted_differences": accepted,
        "warnings": list(warnings),
    }
    # The target YAML (and --json's provenance) must hold no password: an override such as
    # sweep.storage=postgresql://u:pw@host/db lands in sweep.storage and provenance.overrides.
    cfg = without_passwords(cfg)
    return TransferResult(cfg, list(cfg.provenance["warnings"]), rows, spread, cost_line)


def check_tuned_keys(hparams: dict[str, Any]) -> None:
    """Refuse a best document that tuned a key which is no hyperparameter (model.width, the
    base shapes, ...; `sweep.space.NOT_HYPERPARAMETERS`): its value would silently replace the
    target's. `tune` refuses such a search space; this document came from elsewhere, or from
    before that check."""
    for key in hparams:
        why = not_a_hyperparameter(str(key))
        if why:
            raise UserError(f"the best document's hparams hold {key}={hparams[key]}, which is not "
                            f"a hyperparameter ({why}); transfer refuses it: re-tune without "
                            f"{key} in sweep.params, or remove it from the document's hparams")


def command_line_choices(preset: str | None, preset_settings: dict[str, Any], width: int | None,
                         depth: int | None, steps: int | None) -> dict[str, tuple[Any, str]]:
    """{config key: (value, the option that chose it)} for what the command line sets besides
    `key=value` overrides: the preset's settings, then --width, --depth and --steps (which win
    over the preset's width and depth, as `transfer` applies them)."""
    choices: dict[str, tuple[Any, str]] = {}
    for key, value in preset_settings.items():
        if key != "model.parametrization" and key.removeprefix("model.") not in PROXY_SHAPE_FIELDS:
            choices[key] = (value, f"--preset {preset}")  # the proxy's values of these are kept
    for key, value, option in (("model.width", width, "--width"), ("model.depth", depth, "--depth"),
                               ("train.steps", steps, "--steps")):
        if value is not None:
            choices[key] = (value, f"{option} {value}")
    return choices


def check_tuned_against_command_line(hparams: dict[str, Any],
                                     choices: dict[str, tuple[Any, str]],
                                     overrides: list[str]) -> None:
    """Refuse a tuned value that differs from the one an option on the command line chose (the
    tuned one would replace it in silence), naming both. An explicit `key=value` override of
    that key settles it: the override wins, with a warning (`transfer`)."""
    explicit = _override_keys(overrides)
    for key, (chosen, option) in choices.items():
        if key in hparams and key not in explicit and _plain(hparams[key]) != _plain(chosen):
            raise UserError(f"{option} sets {key}={_yaml(chosen)} but the study tuned "
                            f"{key}={_yaml(hparams[key])}; say which the target gets with "
                            f"{key}=VALUE on the transfer command line")


def _accepted(overridden: dict[str, dict[str, Any]], cfg: Config) -> dict[str, dict[str, Any]]:
    """The preset differences the overrides accepted: those whose target value is not the
    proxy's (overriding a key back to the proxy's value keeps the proxy's model)."""
    out = {}
    for key, values in overridden.items():
        target = _plain(_get(cfg, key))
        if target != values["proxy"]:
            out[key] = {**values, "target": target}
    return out


def transfers_across_depth(proxy: Config, target: Config) -> bool:
    """Whether the tuned HPs carry over a change of depth: both completep, same base depth
    and alpha (mupsweep/completep.py)."""
    p, t = proxy.model, target.model
    return (p.depth_parametrization == t.depth_parametrization == "completep"
            and base_depth_of(p) == base_depth_of(t) and p.depth_alpha == t.depth_alpha)


def depth_warnings(proxy: Config, target: Config) -> list[str]:
    """A depth parametrization, base depth or alpha that differs from the proxy's: the tuned
    HPs then belong to another parametrization."""
    p, t = proxy.model, target.model
    if p.depth_parametrization != t.depth_parametrization:
        return [f"proxy model.depth_parametrization={p.depth_parametrization} but target "
                f"{t.depth_parametrization}: the tuned HPs belong to the proxy's parametrization"]
    if p.depth_parametrization == "none":
        return []
    out = []
    if base_depth_of(p) != base_depth_of(t):
        out.append(f"proxy base depth {base_depth_of(p)} but target model.base_depth="
                   f"{base_depth_of(t)}: CompleteP's depth factors are relative to the base "
                   "depth, so the tuned HPs mean something else")
    if p.depth_alpha != t.depth_alpha:
        out.append(f"proxy model.depth_alpha={p.depth_alpha} but target {t.depth_alpha}: "
                   "the tuned HPs belong to the proxy's alpha")
    return out


def proxy_flops_share(proxy: Config, widths: list[int], target_per_image: float | None) -> dict[int, float]:
    """FLOPs per image of the proxy at each proxy width, as % of the target's."""
    import copy

    if not target_per_image:
        return {}
    share = {}
    for w in widths:
        probe = copy.deepcopy(proxy)
        probe.model.width = int(w)
        try:
            share[int(w)] = 100.0 * estimate_train_flops(probe)[0] / target_per_image
        except UserError:  # the data is not on this machine: the ledger says less
            return {}
    return share


def _plain(v: Any) -> Any:
    """Only YAML-safe scalars and containers go into provenance."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return str(v)


def _cost_line(cost: dict, per_image: float | None, target: float | None, pct: float | None,
               cfg: Config) -> str:
    sweep = cost.get("flops")
    parts = []
    if isinstance(sweep, int | float):
        n = cost.get("n_complete")
        wall = cost.get("wall_time_s")
        extra = ", ".join(x for x in (f"{n} complete trials" if n is not None else "",
                                      f"{wall:.0f} s" if isinstance(wall, int | float) else "") if x)
        parts.append(f"tuning cost {_fmt_flops(sweep)}" + (f" ({extra})" if extra else ""))
    if target is not None:
        parts.append(f"one target run {_fmt_flops(target)} (3 x {_fmt_flops(per_image)}/image "
                     f"x batch {cfg.train.batch_size} x {cfg.train.steps} steps)")
    line = "; ".join(parts) or "cost unknown"
    if pct is not None:
        line += f": tuning = {pct:.3g}% of one target run"
    return line


def check_output(out: str | Path) -> None:
    """Refuse an output path that can never be written (a folder; a folder that takes no
    file: /proc, read-only, under a file), before any work is done or anything printed."""
    if str(out) == "-":
        return
    if not str(out).strip():
        raise UserError("-o is empty; give the target YAML's file name (or - for stdout)")
    if Path(out).is_dir():
        raise UserError(f"-o {out} is a directory; give the target YAML's file name, e.g. "
                        f"{Path(out) / 'target.yaml'}")
    problem = output_dir_problem(Path(out).parent, f"-o {out}: its folder")
    if problem:
        raise UserError(problem)


def write_config(cfg: Config, out: str | Path) -> str:
    """Write the resolved YAML to `out` ('-' for stdout), atomically: a full disk or a size
    limit leaves the previous file as it was, never half a config. Returns where it went."""
    from mupsweep.config import to_yaml

    text = to_yaml(cfg)
    if str(out) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return "-"
    check_output(out)
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return str(path)
