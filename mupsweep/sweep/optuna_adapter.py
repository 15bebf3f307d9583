"""Every use of Optuna's private API in mupsweep, in one place (checked against Optuna 5.0).

Each function says which private attribute it touches and why the public API does not do the
job. When an Optuna upgrade breaks the sweep, read this file first.
"""

from __future__ import annotations

import contextlib

import optuna
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, Trial, TrialState


def opened_storage(study: optuna.Study) -> BaseStorage:
    """The storage object the study was created or loaded with (an RDBStorage, a
    JournalStorage, ...), so `mupsweep.sweep.storage` can tell which URL it was opened from.

    Touches `Study._storage` (Optuna has no public accessor for a study's storage) and
    `_CachedStorage._backend`: Optuna wraps every RDBStorage in a private `_CachedStorage`,
    whose `_backend` is the RDBStorage that was passed in."""
    storage = study._storage
    if isinstance(storage, _CachedStorage):
        return storage._backend
    return storage


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> FrozenTrial | None:
    """Set another process's RUNNING trial to FAIL with user attr `reason`; return the failed
    trial as stored now, or None when another worker finished or failed it first.

    Touches `Study._storage` (the study's storage, cache included, so this process sees the
    change at once) and `FrozenTrial._trial_id` (the storage's key of the trial). The public
    `Study.tell(number, state=FAIL)` would run this process's sampler `after_trial` hook on a
    trial it never sampled (GridSampler may then stop the study), and the public API has no
    way to set a user attr on a trial this process did not ask for."""
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None  # another worker got there first
    return storage.get_trial(trial._trial_id)


def heartbeat(study: optuna.Study, trial: Trial) -> contextlib.AbstractContextManager:
    """Optuna's heartbeat for `trial` while the context is open (a no-op where the storage has
    none), exactly as `study.optimize` runs it around each trial it runs.

    A worker that trains several trials at once (sweep.pack > 1) asks and tells them itself, so
    it must run their heartbeats itself: the public API has no way to. Touches the private
    `optuna.storages._heartbeat.get_heartbeat_thread` (what study.optimize uses),
    `Study._storage` and `Trial._trial_id` (the storage's key of the trial)."""
    return get_heartbeat_thread(trial._trial_id, study._storage)


def set_study_system_attr(study: optuna.Study, key: str, value: object) -> None:
    """Store `value` in the study's system attributes.

    mupsweep keeps the study's base config (~2 KB of JSON) there: user attributes are what
    `optuna studies` prints and optuna-dashboard shows (cut at 1024 characters), while system
    attributes live in every storage (SQLite, PostgreSQL, journal), so every machine that
    opens the study reads them. `Study.set_system_attr` was removed in Optuna 5: touches
    `Study._storage` and `Study._study_id` (the storage's key of the study)."""
    study._storage.set_study_system_attr(study._study_id, key, value)


def study_system_attrs(study: optuna.Study) -> dict:
    """The study's system attributes (`Study.system_attrs` was removed in Optuna 5): touches
    `Study._storage` and `Study._study_id`."""
    return dict(study._storage.get_study_system_attrs(study._study_id))
