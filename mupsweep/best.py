"""The best document: a sweep's result as one JSON object, the contract between `tune` and its
readers (`transfer`, `report`, `validate`). Built from a study, written as best.json, loaded
(a file, stdin or the study's storage), checked, and read (per-width best lr and its drift).

    {"study", "storage" (password hidden), "parametrization", "value", "trial", "hparams"
     {config key: value}, "proxy_widths", "base_config", "cost" {"flops", "wall_time_s",
     "n_complete", "n_pruned", "n_failed", "n_interrupted", "n_surplus"}, "trials"
     [{"number", "state", "value", "hparams", "losses" {width: loss}, "flops", "wall_time_s",
     "reason"}]}
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mupsweep.errors import UserError
from mupsweep.storage import label_of, open_for_reading, parse_storage, redact_text
from mupsweep.sweep.retry import is_interrupted, is_surplus
from mupsweep.sweep.space import config_values
from mupsweep.sweep.study import study_base_config
from mupsweep.util import atomic_write_text, first_line, json_safe

# Keys every best document must have (the rest are optional and only enrich provenance).
REQUIRED_KEYS = ("parametrization", "hparams", "base_config", "proxy_widths")

DRIFT_TOLERANCE_OCTAVES = 1.0  # max spread of per-width best log2 lr before transfer warns


# --------------------------------------------------------------------------------------------
# From a study, to best.json
# --------------------------------------------------------------------------------------------


def best_document(study: optuna.Study) -> dict[str, Any]:
    """The sweep's result: best trial, its resolved HPs, base config, cost and every trial."""
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(complete, key=lambda t: (t.value, t.number)) if complete else None
    rows = []
    for t in trials:
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "hparams": _hparams_of(t), "losses": dict(t.user_attrs.get("losses") or {}),
                     "flops": float(t.user_attrs.get("flops", 0.0)),
                     "wall_time_s": float(t.user_attrs.get("wall_time_s", 0.0)),
                     "reason": t.user_attrs.get("reason", ""),
                     # the last loss the pruner saw (what a pruned trial reached), or None
                     "last_reported": (t.intermediate_values[max(t.intermediate_values)]
                                       if t.intermediate_values else None)})
    return {
        "study": study.study_name,
        "storage": label_of(study),
        "parametrization": attrs.get("parametrization"),
        "value": best.value if best else None,
        "trial": best.number if best else None,
        "hparams": _hparams_of(best) if best else {},
        "proxy_widths": list(attrs.get("proxy_widths") or []),
        "base_config": study_base_config(study),
        "cost": {"flops": sum(r["flops"] for r in rows),
                 "wall_time_s": sum(r["wall_time_s"] for r in rows),
                 "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
                 "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
                 # A surplus trial (started after others met the budget) and an interrupted
                 # one (re-queued) are FAIL in Optuna, but no failure of their HPs.
                 "n_failed": sum(t.state == TrialState.FAIL and not (is_surplus(t) or is_interrupted(t))
                                 for t in trials),
                 "n_interrupted": sum(is_interrupted(t) for t in trials),
                 "n_surplus": sum(is_surplus(t) for t in trials)},
        "trials": rows,
    }


def _hparams_of(t: FrozenTrial) -> dict[str, Any]:
    """Resolved config values; from the params when a trial died before recording them."""
    if "hparams" in t.user_attrs:
        return dict(t.user_attrs["hparams"])
    return config_values(t.params)


def write_best_json(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the document as JSON (NaN/inf as null), atomically: concurrent machines writing
    the same best.json never leave a torn file."""
    return atomic_write_text(path, json.dumps(json_safe(doc), indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Loading and checking
# --------------------------------------------------------------------------------------------


def check_best_document(doc: Any, source: str) -> dict[str, Any]:
    """Check the document's shape, so a wrong file fails here with one line, not deep inside."""
    if not isinstance(doc, dict):
        raise UserError(f"{source}: expected a JSON object (the best document from "
                        f"`mupsweep tune --json`), got {type(doc).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise UserError(f"{source}: not a best document from `mupsweep tune`; missing "
                        f"key(s) {', '.join(missing)}")
    if not isinstance(doc["hparams"], dict) or not isinstance(doc["base_config"], dict):
        raise UserError(f"{source}: 'hparams' and 'base_config' must be JSON objects")
    if not isinstance(doc["proxy_widths"], list) or not all(
            isinstance(w, int) for w in doc["proxy_widths"]):
        raise UserError(f"{source}: 'proxy_widths' must be a list of integers")
    if not isinstance(doc.get("trials", []), list):
        raise UserError(f"{source}: 'trials' must be a list")
    for i, trial in enumerate(doc.get("trials", [])):
        problem = _trial_problem(trial)
        if problem:
            raise UserError(f"{source}: trials[{i}] {problem} (each trial is an object: "
                            "number, state, value, hparams, losses)")
    return doc


def _trial_problem(trial: Any) -> str | None:
    """What is wrong with one entry of 'trials' for the readers (report, transfer), or None."""
    if not isinstance(trial, dict):
        return f"is {json.dumps(trial)[:40]}, not an object"
    for key, types, what in (("hparams", dict, "an object"), ("losses", dict, "an object"),
                             ("value", int | float, "a number"), ("number", int, "an integer"),
                             ("state", str, "a string")):
        value = trial.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            return f"has {key} {json.dumps(value)[:40]}, not {what} or null"
    return None


def load_best(path: str | Path) -> dict[str, Any]:
    """Read a best document from a JSON file, or from stdin when `path` is '-'."""
    if str(path) == "-":
        text, source = sys.stdin.read(), "stdin"
        if not text.strip():
            raise UserError("stdin is empty; pipe `mupsweep tune --json` in, or give best.json")
    else:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"best document not found: {p} (written by `mupsweep tune` as "
                            "OUT_DIR/best.json)")
        text = p.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return check_best_document(doc, source)


def load_best_from_storage(storage: str, study: str) -> dict[str, Any]:
    """The best document of an Optuna study, straight from its storage (`--storage`), which is
    only read: nothing is created there."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = parse_storage(storage, "--storage")
    opened = open_for_reading(spec)
    try:
        loaded = optuna.load_study(study_name=study, storage=opened)
    except KeyError:  # optuna's "Record does not exist" for an unknown study name
        raise UserError(f"study {study!r} not found in storage {spec.label}") from None
    except Exception as e:  # driver errors while reading; messages may echo the URL
        raise UserError(f"cannot open storage {spec.label}: {redact_text(first_line(e))}") from None
    return check_best_document(best_document(loaded), f"study {study!r}")


# --------------------------------------------------------------------------------------------
# Reading: complete trials, per-width losses, per-width best lr and its drift
# --------------------------------------------------------------------------------------------


def complete_trials(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Trials that finished (state COMPLETE) with a finite objective value."""
    out = []
    for t in doc.get("trials", []):
        value = t.get("value")
        if t.get("state") == "COMPLETE" and isinstance(value, int | float) and math.isfinite(value):
            out.append(t)
    return out


def width_losses(trial: dict[str, Any], widths: list[int]) -> dict[int, float]:
    """A trial's finite loss at each proxy width. A single-width study may omit `losses`;
    its objective value is then that width's loss."""
    losses = {int(k): v for k, v in (trial.get("losses") or {}).items()
              if isinstance(v, int | float) and math.isfinite(v)}
    if not losses and len(widths) == 1 and trial.get("value") is not None:
        losses = {widths[0]: float(trial["value"])}
    return losses


def lr_by_width(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """For each proxy width, the lr of the COMPLETE trial with the lowest loss at that width.

    Rows: {"width", "lr", "log2_lr", "loss", "trials"} (trials: how many had a loss there).
    Widths without any usable trial are left out; trials without `hparams["optim.lr"]` are
    ignored (a sweep that does not tune lr has no lr to drift)."""
    widths = [int(w) for w in doc.get("proxy_widths", [])]
    rows = []
    for w in widths:
        best: tuple[float, float] | None = None  # (loss, lr)
        n = 0
        for t in complete_trials(doc):
            lr = (t.get("hparams") or {}).get("optim.lr")
            loss = width_losses(t, widths).get(w)
            if not isinstance(lr, int | float) or lr <= 0 or loss is None:
                continue
            n += 1
            if best is None or loss < best[0]:
                best = (loss, float(lr))
        if best is not None:
            rows.append({"width": w, "lr": best[1], "log2_lr": math.log2(best[1]),
                         "loss": best[0], "trials": n})
    return rows


def drift_octaves(rows: list[dict[str, Any]]) -> float | None:
    """Spread (max - min) of the per-width best log2 lr; None with fewer than two widths."""
    if len(rows) < 2:
        return None
    logs = [r["log2_lr"] for r in rows]
    return max(logs) - min(logs)
