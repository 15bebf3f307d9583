"""The study summary: a sweep's result as one JSON object, the contract between `tune` and its
readers (`transfer`, `report`, `validate`). Built from a study, written as best.json, loaded
(a file, stdin or the study's storage), checked, and read (per-width best lr, whose
spread is the drift `mupsweep.drift` defines).

    {"study", "storage" (password hidden), "parametrization", "objective" (the metric trials
     are ranked by), "direction" ("minimize" | "maximize"), "value", "trial", "hparams"
     {config key: value}, "proxy_widths", "base_config", "cost" {"flops", "wall_time_s",
     "eval_time_s", "n_complete", "n_pruned", "n_failed", "n_interrupted", "n_surplus"},
     "trials" [{"number", "state", "value", "hparams", "losses" {width: the objective's value},
     "metrics" {width: {metric: value}}, "flops", "wall_time_s", "eval_time_s", "reason"}]}

"losses" holds the objective's value at each width whatever the objective is: the name it
had when the objective was always the validation loss, kept so older summaries read the same.
A summary without "objective" is a validation loss one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mupsweep.config import from_dict
from mupsweep.errors import UserError
from mupsweep.sweep.retry import is_interrupted, is_surplus
from mupsweep.sweep.space import config_values
from mupsweep.sweep.storage import label_of, open_for_reading, parse_storage, redact_text
from mupsweep.sweep.study import study_base_config
from mupsweep.util import atomic_write_text, first_line, json_safe

# Keys every study summary must have (the rest are optional and only enrich provenance).
REQUIRED_KEYS = ("parametrization", "hparams", "base_config", "proxy_widths")

DRIFT_TOLERANCE_OCTAVES = 1.0  # max spread of per-width best log2 lr before transfer warns
# An optimum is placed at a width only when the lrs tried there bracket it: at least this many
# distinct lrs, the best not the smallest or largest of them (else it may lie beyond the range).
MIN_LRS_TO_PLACE = 3


# --------------------------------------------------------------------------------------------
# From a study, to best.json
# --------------------------------------------------------------------------------------------


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """The sweep's result: best trial, its resolved HPs, base config, cost and every trial."""
    attrs = study.user_attrs
    trials = study.get_trials(deepcopy=False)
    direction = "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    sign = -1.0 if direction == "maximize" else 1.0
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(complete, key=lambda t: (sign * t.value, t.number)) if complete else None
    base_config = study_base_config(study)
    rows = []
    for t in trials:
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "hparams": _hparams_of(t), "losses": dict(t.user_attrs.get("losses") or {}),
                     "metrics": dict(t.user_attrs.get("metrics") or {}),
                     "flops": float(t.user_attrs.get("flops", 0.0)),
                     "wall_time_s": float(t.user_attrs.get("wall_time_s", 0.0)),
                     "eval_time_s": float(t.user_attrs.get("eval_time_s", 0.0)),
                     "reason": t.user_attrs.get("reason", ""),
                     # the last loss the pruner saw (what a pruned trial reached), or None
                     "last_reported": (t.intermediate_values[max(t.intermediate_values)]
                                       if t.intermediate_values else None)})
    return {
        "study": study.study_name,
        "storage": label_of(study),
        "parametrization": attrs.get("parametrization"),
        "objective": ((base_config.get("sweep") or {}).get("objective") or "validation_loss"),
        "direction": direction,
        "value": best.value if best else None,
        "trial": best.number if best else None,
        "hparams": _hparams_of(best) if best else {},
        "proxy_widths": list(attrs.get("proxy_widths") or []),
        "base_config": base_config,
        "cost": {"flops": sum(r["flops"] for r in rows),
                 "wall_time_s": sum(r["wall_time_s"] for r in rows),
                 "eval_time_s": sum(r["eval_time_s"] for r in rows),
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


def check_summary(doc: Any, source: str) -> dict[str, Any]:
    """The one schema check of a study summary, wherever it comes from (a file, stdin, a study's
    storage, a caller of `transfer`): every field a reader uses has the type it needs, and the
    base config is one the schema and its architecture accept, so a wrong file fails here with
    one line naming the field and the source, never deep inside `transfer` or `report`."""
    if not isinstance(doc, dict):
        raise UserError(f"{source}: expected a JSON object (the study summary from "
                        f"`mupsweep tune --json`), got {type(doc).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise UserError(f"{source}: not a study summary from `mupsweep tune`; missing "
                        f"key(s) {', '.join(missing)}")
    problem = _document_problem(doc)
    if problem:
        raise UserError(f"{source}: {problem}")
    if doc["base_config"]:  # empty: a study without one; transfer says so, report needs none
        try:
            from_dict(doc["base_config"])
        except UserError as e:
            raise UserError(f"{source}: base_config: {e}") from None
    return doc


def _show(value: Any) -> str:
    return json.dumps(value)[:40]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What each field may be: (test, what it must be). None (JSON null) is allowed for every
# optional field and every trial field; the required ones are REQUIRED_KEYS.
_OPTIONAL_TOP = {"study": (lambda v: isinstance(v, str), "a string"),
                 "objective": (lambda v: isinstance(v, str) and v != "", "a metric name"),
                 "direction": (lambda v: v in ("minimize", "maximize"), '"minimize" or "maximize"'),
                 "storage": (lambda v: isinstance(v, str), "a string"),
                 "value": (_is_number, "a number"),
                 "trial": (_is_count, "a trial number (an integer >= 0)"),
                 "cost": (lambda v: isinstance(v, dict), "an object"),
                 "trials": (lambda v: isinstance(v, list), "a list")}
_COST = {"flops": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
         "wall_time_s": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
         "eval_time_s": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
         **{k: (_is_count, "a count (an integer >= 0)") for k in
            ("n_complete", "n_pruned", "n_failed", "n_interrupted", "n_surplus")}}
_TRIAL = {"number": (_is_count, "an integer >= 0"), "state": (lambda v: isinstance(v, str), "a string"),
          "value": (_is_number, "a number"), "hparams": (lambda v: isinstance(v, dict), "an object"),
          "losses": (lambda v: isinstance(v, dict), "an object"),
          "metrics": (lambda v: isinstance(v, dict), "an object"),
          "flops": (_is_number, "a number"), "wall_time_s": (_is_number, "a number"),
          "eval_time_s": (_is_number, "a number"),
          "last_reported": (_is_number, "a number"), "reason": (lambda v: isinstance(v, str), "a string")}


def _document_problem(doc: dict[str, Any]) -> str | None:
    """The first field of `doc` that is not what its readers need, as 'FIELD is X, not Y'."""
    if doc["parametrization"] not in ("mup", "sp"):
        return f"parametrization is {_show(doc['parametrization'])}, not \"mup\" or \"sp\""
    for key in ("hparams", "base_config"):
        if not isinstance(doc[key], dict):
            return f"{key} is {_show(doc[key])}, not an object"
    widths = doc["proxy_widths"]
    if not isinstance(widths, list) or not widths or not all(
            _is_count(w) and w >= 1 for w in widths) or len(set(widths)) < len(widths):
        return (f"proxy_widths is {_show(widths)}, not a list of distinct positive integers "
                "(the widths the study trained)")
    for key, (ok, what) in _OPTIONAL_TOP.items():
        if doc.get(key) is not None and not ok(doc[key]):
            return f"{key} is {_show(doc[key])}, not {what} or null"
    for key, (ok, what) in _COST.items():
        value = (doc.get("cost") or {}).get(key)
        if value is not None and not ok(value):
            return f"cost.{key} is {_show(value)}, not {what} or null"
    for i, trial in enumerate(doc.get("trials") or []):
        if not isinstance(trial, dict):
            return f"trials[{i}] is {_show(trial)}, not an object (number, state, value, hparams, losses)"
        for key, (ok, what) in _TRIAL.items():
            if trial.get(key) is not None and not ok(trial[key]):
                return f"trials[{i}].{key} is {_show(trial[key])}, not {what} or null"
        for width, loss in (trial.get("losses") or {}).items():
            if not str(width).isdigit() or not (loss is None or _is_number(loss)):
                return (f"trials[{i}].losses has {_show({width: loss})}: each entry is a proxy "
                        "width and its loss (a number or null)")
    return None


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a study summary from a JSON file, or from stdin when `path` is '-'."""
    if str(path) == "-":
        source = "stdin"
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        if not data.strip():
            raise UserError("stdin is empty; pipe `mupsweep tune --json` in, or give best.json")
    else:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"study summary not found: {p} (written by `mupsweep tune` as "
                            "OUT_DIR/best.json)")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {p}: {e.strerror or first_line(e)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text (byte {e.start}); give the best.json that "
                        "`mupsweep tune` wrote") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return check_summary(doc, source)


def load_summary_from_storage(storage: str, study: str) -> dict[str, Any]:
    """The study summary of an Optuna study, straight from its storage (`--storage`), which is
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
    return check_summary(study_summary(loaded), f"study {study!r}")


# --------------------------------------------------------------------------------------------
# Reading: complete trials, per-width losses, per-width best lr and its drift
# --------------------------------------------------------------------------------------------


def objective_of(doc: dict[str, Any]) -> str:
    """The metric a summary's trials are ranked by (older summaries: the validation loss)."""
    return doc.get("objective") or "validation_loss"


def sign_of(doc: dict[str, Any]) -> float:
    """1 when lower values of the summary's objective are better, -1 when higher are: sign x
    value is always to be minimized."""
    return -1.0 if doc.get("direction") == "maximize" else 1.0


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
    """For each proxy width, the lr of the COMPLETE trial with the best objective value ("loss")
    at that width (the lowest, or the highest for a metric to maximize).

    Rows: {"width", "lr", "log2_lr", "loss", "trials"} (trials: how many had a loss there).
    Widths without any usable trial are left out; trials without `hparams["optim.lr"]` are
    ignored (a sweep that does not tune lr has no lr to drift). The optimum is the best trial's
    lr, not a fit: a sweep's trials differ in more than the lr (`validate`'s lr-only grid fits
    a parabola, `mupsweep.drift.place_optimum`)."""
    widths = [int(w) for w in doc.get("proxy_widths", [])]
    rows, sign = [], sign_of(doc)
    for w in widths:
        best: tuple[float, float] | None = None  # (loss, lr)
        n, lrs = 0, set()
        for t in complete_trials(doc):
            lr = (t.get("hparams") or {}).get("optim.lr")
            loss = width_losses(t, widths).get(w)
            if not isinstance(lr, int | float) or lr <= 0 or loss is None:
                continue
            n += 1
            lrs.add(float(lr))
            if best is None or sign * loss < sign * best[0]:
                best = (loss, float(lr))
        if best is not None:
            rows.append({"width": w, "lr": best[1], "log2_lr": math.log2(best[1]),
                         "loss": best[0], "trials": n, "distinct_lrs": len(lrs),
                         "placed": len(lrs) >= MIN_LRS_TO_PLACE and min(lrs) < best[1] < max(lrs)})
    return rows


def why_not_placed(rows: list[dict[str, Any]]) -> str | None:
    """Why the per-width optima cannot be compared (too few lrs at a width, or the best at the
    edge of the lrs tried there), or None when every width's optimum is placed. A spread
    measured between optima that are not placed says nothing about transfer."""
    reasons = []
    for r in rows:
        if r.get("placed", True):
            continue
        if r["distinct_lrs"] < MIN_LRS_TO_PLACE:
            reasons.append(f"width {r['width']} has {r['distinct_lrs']} distinct lr"
                           f"{'' if r['distinct_lrs'] == 1 else 's'} among its complete trials "
                           f"(at least {MIN_LRS_TO_PLACE} place an optimum)")
        else:
            reasons.append(f"at width {r['width']} the best lr {r['lr']:.3g} is the edge of the "
                           "lrs tried there (the optimum may lie beyond)")
    return "; ".join(reasons) or None

