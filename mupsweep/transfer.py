"""Best proxy trial -> resolved config for the full-width model, with drift and cost checks.

Under muP the learning rate, init multiplier and output multiplier tuned on a narrow proxy stay
optimal when only the width grows. `transfer()` turns the sweep's "study summary" (written by
`mupsweep tune` as best.json) into a target `Config`, in named steps:

1. refuse what cannot transfer (an SP study unless `force`, no target, no trial, a tuned key
   that is no hyperparameter), and read the proxy (the base config with its tuned values);
2. size the target: the model preset (mupsweep/presets.py: its size only) and/or the target
   width and depth, keeping the proxy's base shapes (`model.base_width`, `model.delta_width`)
   and `model.head_dim`, without which the tuned numbers mean something else;
3. apply every tuned HP (`best["hparams"]`), then the user's overrides, then `--steps`;
4. check what width transfer does not cover, lr drift and cost (mupsweep/transfer_cost.py),
   and record where the numbers came from in `cfg.provenance` (study, trial, proxy widths,
   sweep cost, estimated target FLOPs and tuning cost as a share of one target run).

A tuned value never overrides a choice made on the command line in silence: a study summary
that tuned a key which is no hyperparameter (each key declares it in the schema: model.width,
the base shapes, ...) is refused, and so is a tuned value that differs from what --depth,
--steps or --preset sets (an explicit `key=value` override wins, with a warning). The target
config, provenance included, holds no password.

Checks, each a warning unless noted: an SP study (HPs do not transfer across width under SP;
an error unless `force`), proxy and target differing in a key width transfer does not cover
(each key declares it: base width, head_dim, depth, patch size, batch size), a nonzero gradient
clip carried across width (a clip threshold is not a muP-transferred HP), and lr drift: with two
or more proxy widths, each width's best lr should agree within one octave, or the transfer is
unreliable.

Depth: a study tuned with model.depth_parametrization=completep transfers across depth too
(`--depth`, or a preset's depth): the target keeps the proxy's base depth and alpha, and a
depth difference is no longer a warning. Under none it stays one.

The document's shape is fixed by `mupsweep.sweep.summary`; this module only reads it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mupsweep.completep import base_depth_of, why_depth_transfer_fails
from mupsweep.config import (
    Config,
    ModelConfig,
    from_dict,
    set_by_path,
    to_yaml,
    untransferred_keys,
    why_not_a_hyperparameter,
    with_overrides,
)
from mupsweep.drift import drift_octaves
from mupsweep.errors import UserError
from mupsweep.presets import (
    accepted_differences,
    apply_preset,
    list_presets,
    load_preset,
    override_keys,
    override_text,
    plain,
    preset_choices,
)
from mupsweep.rundir import without_passwords
from mupsweep.sweep.storage import redact_text, redact_url
from mupsweep.sweep.summary import (
    DRIFT_TOLERANCE_OCTAVES,
    check_summary,
    lr_by_width,
    objective_of,
)
from mupsweep.transfer_cost import Cost, estimate_cost
from mupsweep.util import atomic_write_text, get_dotted, output_dir_problem


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
# transfer: the steps, in order
# --------------------------------------------------------------------------------------------


def transfer(best: dict[str, Any], width: int | None = None, preset: str | None = None,
             overrides: list[str] | tuple[str, ...] = (), steps: int | None = None,
             force: bool = False, depth: int | None = None,
             config_dir: str | Path | None = None) -> TransferResult:
    """Build the target config from a study summary (see the module docstring for the steps).

    config_dir: the user's config groups (`--config-dir`; else ./configs), where --preset is
    looked up, as `compose` does.

    Raises UserError for an SP study (unless `force`), for a missing target (no width, preset
    or model.width override) and for any invalid resulting config."""
    best = check_summary(best, "study summary")
    overrides = list(overrides)
    tuned = best["hparams"]
    warnings = refuse_what_cannot_transfer(best, width, preset, depth, overrides, force,
                                           config_dir)
    proxy = read_proxy(best)
    # Passwords hidden from the start: no message or warning below can show one.
    cfg = without_passwords(read_base_config(best))

    accepted: dict[str, dict[str, Any]] = {}
    settings = load_preset(preset, config_dir) if preset is not None else {}
    if preset is not None:
        accepted, preset_warnings = apply_preset(cfg, proxy, preset, settings, overrides, tuned)
        warnings += preset_warnings
    check_tuned_against_command_line(
        tuned, command_line_choices(preset, settings, width, depth, steps), overrides)
    set_target_size(cfg.model, proxy.model, width, depth)
    apply_tuned(cfg, tuned, steps)
    cfg, accepted, override_warnings = apply_overrides(cfg, overrides, tuned, steps, accepted)
    warnings += override_warnings

    warnings += untransferred_warnings(proxy, cfg, best["proxy_widths"], overrides)
    rows, spread, drift_warnings = lr_drift(best)
    cost, cost_warnings = estimate_cost(best, proxy, cfg)
    warnings += drift_warnings + cost_warnings
    cfg.provenance = provenance(best, proxy, cfg, preset, overrides, accepted, rows, spread,
                                cost, warnings)
    # The target YAML (and --json's provenance) must hold no password: an override such as
    # sweep.storage=postgresql://u:pw@host/db lands in sweep.storage and provenance.overrides.
    cfg = without_passwords(cfg)
    return TransferResult(cfg, list(cfg.provenance["warnings"]), rows, spread, cost.line)


def refuse_what_cannot_transfer(best: dict[str, Any], width: int | None, preset: str | None,
                                depth: int | None, overrides: list[str], force: bool,
                                config_dir: str | Path | None) -> list[str]:
    """Refuse an SP study (a warning with `force`), a command line with no target, a study
    with no trial, a document without a base config, and tuned keys that are no
    hyperparameters. Returns the warnings."""
    warnings = []
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
        raise UserError("study summary has an empty base_config: cannot rebuild the proxy")
    check_tuned_keys(best["hparams"])
    return warnings


def read_base_config(best: dict[str, Any]) -> Config:
    """The sweep's base config, from the document."""
    try:
        return from_dict(best["base_config"])
    except UserError as e:
        raise UserError(f"study summary base_config: {e}") from None


def read_proxy(best: dict[str, Any]) -> Config:
    """The proxy the best trial trained: the base config with its tuned values (a swept
    model.depth included), which the checks compare the target with."""
    proxy = read_base_config(best)
    for key, value in best["hparams"].items():
        set_by_path(proxy, key, value)
    return proxy


def set_target_size(target: ModelConfig, proxy: ModelConfig, width: int | None,
                    depth: int | None) -> None:
    """--width and --depth (over a preset's); under CompleteP, the proxy's base depth, which
    the tuned HPs belong to as they do to its base width."""
    if width is not None:
        target.width = width
    if depth is not None:
        target.depth = depth
    if proxy.depth_parametrization == "completep":
        target.base_depth = base_depth_of(proxy)
        why = why_depth_transfer_fails(proxy)
        if why and target.depth != proxy.depth:
            raise UserError(f"target depth {target.depth} != proxy depth "
                            f"{proxy.depth}, but HPs do not carry across depth here: {why}")


def apply_tuned(cfg: Config, tuned: dict[str, Any], steps: int | None) -> None:
    """The tuned HPs (resolved values keyed by config path), and the target run's defaults: a
    new run directory for every `train --config` of it, as for any other run (a fixed one
    would refuse the second target trained from the same folder; a train.run_dir=DIR override
    names one), saved at the end (sweep trials may not be), trained --steps steps."""
    for key, value in tuned.items():
        set_by_path(cfg, key, value)
    cfg.train.run_dir = None
    cfg.train.save = True
    if steps is not None:
        cfg.train.steps = steps


def apply_overrides(cfg: Config, overrides: list[str], tuned: dict[str, Any], steps: int | None,
                    preset_accepted: dict[str, dict[str, Any]]
                    ) -> tuple[Config, dict[str, dict[str, Any]], list[str]]:
    """The user's `key=value` overrides, last (--steps still wins over a train.steps one), the
    result checked whole. Returns (target, the preset differences the overrides accepted,
    warnings): an override that replaces a tuned value, or accepts a preset's difference, says
    so."""
    warnings = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if key in tuned:
            warnings.append(f"override {redact_text(item)} replaces the tuned {key}={tuned[key]}")
    cfg = with_overrides(cfg, overrides)  # also with none: tuned values were set unchecked
    if steps is not None:
        cfg.train.steps = steps
    accepted = accepted_differences(preset_accepted, cfg)
    for key, values in accepted.items():
        warnings.append(f"{key}: the proxy had {override_text(values['proxy'])}, the preset "
                        f"{override_text(values['preset'])}; {override_text(values['target'])} "
                        "accepted by the override, but the tuned HPs were not tuned for it")
    return cfg, accepted, warnings


# --------------------------------------------------------------------------------------------
# Refusals and warnings of what a tuned value or the target may not do
# --------------------------------------------------------------------------------------------


def check_tuned_keys(hparams: dict[str, Any]) -> None:
    """Refuse a study summary that tuned a key which is no hyperparameter (model.width, the
    base shapes, ...; each key declares it in the schema): its value would silently replace the
    target's. `tune` refuses such a search space; this document came from elsewhere, or from
    before that check."""
    for key in hparams:
        why = why_not_a_hyperparameter(str(key))
        if why:
            raise UserError(f"the study summary's hparams hold {key}={hparams[key]}, which is not "
                            f"a hyperparameter ({why}); transfer refuses it: re-tune without "
                            f"{key} in sweep.params, or remove it from the document's hparams")


def command_line_choices(preset: str | None, preset_settings: dict[str, Any], width: int | None,
                         depth: int | None, steps: int | None) -> dict[str, tuple[Any, str]]:
    """{config key: (value, the option that chose it)} for what the command line sets besides
    `key=value` overrides: the preset's settings, then --width, --depth and --steps (which win
    over the preset's width and depth, as `transfer` applies them)."""
    choices = preset_choices(preset, preset_settings) if preset is not None else {}
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
    explicit = override_keys(overrides)
    for key, (chosen, option) in choices.items():
        if key in hparams and key not in explicit and plain(hparams[key]) != plain(chosen):
            raise UserError(f"{option} sets {key}={override_text(chosen)} but the study tuned "
                            f"{key}={override_text(hparams[key])}; say which the target gets with "
                            f"{key}=VALUE on the transfer command line")


def untransferred_warnings(proxy: Config, cfg: Config, proxy_widths: list[int],
                           overrides: list[str]) -> list[str]:
    """What width transfer does not cover: a key that declares so (transfers=False) and
    differs between proxy and target, a depth parametrization that differs, and a gradient
    clip carried across width."""
    warnings = []
    for key in untransferred_keys():
        a, b = get_dotted(proxy, key), get_dotted(cfg, key)
        if key == "model.depth" and transfers_across_depth(proxy.model, cfg.model):
            continue  # CompleteP carries the tuned HPs across depth
        if a != b:
            why = ("muP base shapes differ, so the tuned HPs mean something else"
                   if key in ("model.base_width", "model.delta_width") else
                   "not covered by width transfer; the tuned HPs may not be optimal")
            if key == "model.depth":
                why += " (tune with model.depth_parametrization=completep to transfer across depth)"
            warnings.append(f"proxy {key}={a} but target {key}={b}: {why}")
    warnings += depth_warnings(proxy.model, cfg.model)

    # A clip threshold binds on the global gradient norm, which falls as width grows under muP
    # (dit-tiny at init on digits, batch 64: 1.13 at width 32, 0.41 at 256, 0.28 at 512), so
    # the same number clips a different share of the steps at the target width.
    widths = [int(w) for w in proxy_widths]
    if (cfg.optim.grad_clip > 0 and "optim.grad_clip" not in override_keys(overrides)
            and cfg.model.width not in widths):
        warnings.append(f"optim.grad_clip={cfg.optim.grad_clip:g} is carried from the proxy "
                        f"(widths {', '.join(map(str, widths))}) to width "
                        f"{cfg.model.width}: a clip threshold is not a muP-transferred HP (the "
                        "global gradient norm falls as width grows, so it clips more or less "
                        "often there); re-tune it at the target width, or disable it with "
                        "optim.grad_clip=0")
    return warnings


def transfers_across_depth(p: ModelConfig, t: ModelConfig) -> bool:
    """Whether the tuned HPs carry over a change of depth from proxy p to target t: both
    completep, same base depth and alpha (mupsweep/completep.py)."""
    return (p.depth_parametrization == t.depth_parametrization == "completep"
            and base_depth_of(p) == base_depth_of(t) and p.depth_alpha == t.depth_alpha)


def depth_warnings(p: ModelConfig, t: ModelConfig) -> list[str]:
    """A depth parametrization, base depth or alpha of target t that differs from proxy p's:
    the tuned HPs then belong to another parametrization."""
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



# --------------------------------------------------------------------------------------------
# Drift and provenance (the cost: mupsweep/transfer_cost.py)
# --------------------------------------------------------------------------------------------


def lr_drift(best: dict[str, Any]) -> tuple[list[dict[str, Any]], float | None, list[str]]:
    """(each proxy width's best lr, their spread in octaves, a warning when it is over the
    tolerance): the best lr of each proxy width should agree."""
    rows = lr_by_width(best)
    spread = drift_octaves(r["log2_lr"] for r in rows)
    if spread is not None and spread > DRIFT_TOLERANCE_OCTAVES:
        table = ", ".join(f"width {r['width']}: 2^{r['log2_lr']:.2f}" for r in rows)
        return rows, spread, [f"transfer looks unreliable: the best lr by {objective_of(best)} "
                              f"differs by {spread:.2f} octaves across proxy widths ({table}); "
                              "check the parametrization "
                              "(mupsweep coord-check) or tune longer"]
    return rows, spread, []

def provenance(best: dict[str, Any], proxy: Config, cfg: Config, preset: str | None,
               overrides: list[str], accepted: dict[str, dict[str, Any]],
               rows: list[dict[str, Any]], spread: float | None, cost: Cost,
               warnings: list[str]) -> dict[str, Any]:
    """Where the target's numbers came from (plain types only: it must round-trip through
    YAML)."""
    sweep_cost = best.get("cost") or {}
    return {
        "source": "mupsweep transfer",
        "study": best.get("study"),
        "storage": redact_url(best.get("storage")),
        "trial": best.get("trial"),
        "objective": objective_of(best),
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
        "proxy_flops_pct": {str(w): v for w, v in cost.proxy_share.items()},  # per image
        "preset": preset,
        "hparams": {str(k): plain(v) for k, v in best["hparams"].items()},
        "lr_by_width": {str(r["width"]): r["lr"] for r in rows},
        "lr_drift_octaves": spread,
        "sweep_cost": {k: plain(sweep_cost.get(k)) for k in
                       ("flops", "wall_time_s", "n_complete", "n_pruned", "n_failed")},
        "target_flops_per_image": cost.per_image,
        "target_train_flops": cost.target_flops,
        "tuning_cost_pct": cost.tuning_pct,
        "overrides": overrides,
        "accepted_differences": accepted,
        "warnings": list(warnings),
    }

# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


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
