"""Trials that ended without a result of their own: why (the `reason` user attr of a FAIL that
is not a failure of its HPs), and re-queueing one with the same parameters.

A retry is a fresh WAITING trial: the same params and distributions, the failed trial's system
attrs (GridSampler's grid_id among them, so the grid point is not counted twice) plus Optuna's
`failed_trial` / `retry_history`, and none of its user attrs: a retry that completes must not
show the dead trial's reason or start from its partial losses.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

INTERRUPTED = "interrupted"  # the reason of a trial stopped by Ctrl-C or SIGTERM; always retried
SURPLUS = "surplus: the budget was reached by other workers"  # started after the budget was met
# A grid trial that yields its point (another trial holds it) says "surplus: <why>" too.


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and trial.user_attrs.get("reason") == INTERRUPTED


def is_surplus(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get("reason", "")).startswith("surplus")


def retry_trial(study: optuna.Study, trial: FrozenTrial, max_retry: int | None) -> bool:
    """Queue `trial`'s parameters again as a new WAITING trial; False (nothing queued) when it
    was already retried max_retry times. max_retry=None: always (an interrupted trial is not
    the HPs' fault, and does not count against sweep.max_retry)."""
    history = list(trial.system_attrs.get("retry_history", []))
    if max_retry is not None:
        history.append(trial.number)
        if len(history) > max_retry:
            return False
    system_attrs: dict[str, Any] = {**trial.system_attrs,
                                    "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                                    "retry_history": history}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions,
                                              system_attrs=system_attrs))
    return True
