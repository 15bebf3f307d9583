"""Where a study lives: `sweep.storage` / `--storage` parsed once for every command, opened
for `tune` (created when new) or read-only for `transfer` / `report`, never a password printed.

Forms: None -> SQLite file `sweep.out_dir/study.db`; `PATH.journal` or `journal:PATH` -> an
Optuna journal file; anything with `://` -> a SQLAlchemy URL (sqlite:///study.db,
postgresql://user:pass@host/db). Every failure is a UserError of one line with the password
hidden (docs/design.md section 6).

A storage that cannot grow (a full disk, a quota, a file size limit) raises `StorageFull`, a
UserError naming the storage, from the write that failed: SQLite and PostgreSQL through an
SQLAlchemy error hook on the engine, a journal file through its own append, which writes whole
lines only. The study keeps every finished trial (a failed SQL transaction is rolled back, a
failed journal append is cut off); `storage_failure` finds that error behind the errors Optuna
raises while it handles it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mupsweep.config import Config
from mupsweep.errors import UserError
from mupsweep.sweep.optuna_adapter import opened_storage
from mupsweep.util import append_lines, first_line, is_full

# A whole URL is redacted by SQLAlchemy's own parser (redact_url). This regex is only for
# free text that merely contains URLs, such as a driver's error message echoing the URL it
# failed on, where there is no URL to parse.
_PASSWORD_IN_TEXT = re.compile(r"(://[^/:@\s]*:)[^@\s]*@")

# The label each storage was opened under, for `label_of`. Optuna storages carry no name of
# ours, and an RDBStorage's own `url` has the driver we chose (postgresql+psycopg2://), not
# the URL the user gave. Weak keys: a closed study's storage is not kept alive by this.
_LABELS: weakref.WeakKeyDictionary[optuna.storages.BaseStorage, str] = weakref.WeakKeyDictionary()


def redact_text(text: str) -> str:
    """Hide the password of every URL inside `text`: user:pass@host -> user:***@host."""
    return _PASSWORD_IN_TEXT.sub(r"\1***@", text)


def redact_url(url: str | None) -> str | None:
    """A storage URL fit to print: `postgresql://user:secret@host/db` ->
    `postgresql://user:***@host/db`. A string SQLAlchemy cannot parse (a journal label, free
    text) has the password of every URL inside it hidden instead."""
    if url is None:
        return None
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL (ValueError: e.g. a port that is no number)
        return redact_text(url)


@dataclass(frozen=True)
class StorageSpec:
    """A parsed storage setting: what to open, and what may be printed or stored."""

    kind: str  # rdb | journal
    target: str  # SQLAlchemy URL, or the journal file's absolute path
    label: str  # the URL with its password hidden, or journal:PATH


def parse_storage(value: str | None, option: str = "sweep.storage",
                  default_dir: str | Path | None = None) -> StorageSpec:
    """Interpret a storage setting; `option` names it in errors. None means SQLite file
    `default_dir/study.db` (tune's default; a reader has no default and must be told)."""
    if value is None:
        if default_dir is None:
            raise UserError(f"{option}: give a storage URL or a journal file")
        path = Path(default_dir).resolve() / "study.db"
        return StorageSpec("rdb", f"sqlite:///{path}", f"sqlite:///{path}")
    s = value.strip()
    if not s:
        # An empty string is usually an unset shell variable (--storage "$DB"): silently
        # falling back to a local file would split one study into several.
        hint = ("omit it for the default SQLite file, or give a URL" if default_dir is not None
                else "give a URL or a journal file")
        raise UserError(f"{option} is empty; {hint}")
    if s.startswith("journal:") or s.endswith(".journal"):
        path = str(Path(s.removeprefix("journal:")).expanduser().resolve())
        return StorageSpec("journal", path, f"journal:{path}")
    if "://" in s:
        return StorageSpec("rdb", s, redact_url(s) or "")
    raise UserError(f"{option}={redact_url(s)!r}: give a SQLAlchemy URL (sqlite:///study.db, "
                    "postgresql://user:pass@host/db) or a journal file (PATH.journal, journal:PATH)")


def storage_spec(cfg: Config) -> StorageSpec:
    """`cfg.sweep.storage`, with the default SQLite file in `cfg.sweep.out_dir`."""
    return parse_storage(cfg.sweep.storage, "sweep.storage", default_dir=cfg.sweep.out_dir)


def uses_heartbeat(cfg: Config) -> bool:
    """Whether tune's storage runs Optuna's heartbeat (RDB storages with sweep.heartbeat_s > 0;
    Optuna 5.0's JournalStorage has none)."""
    return storage_spec(cfg).kind == "rdb" and cfg.sweep.heartbeat_s > 0


class StorageFull(UserError):
    """A study's storage could not take a write: its disk, quota or file size limit is full."""


def storage_full(label: str, e: BaseException) -> StorageFull:
    reason = "the disk or a size limit is full"
    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
            break
        if "database or disk is full" in str(cause):
            reason = "database or disk is full"
            break
    return StorageFull(f"storage {label} cannot grow ({reason}): the study keeps every finished "
                       "trial (the one cut off is retried); free space and re-run the same "
                       "command to continue")


def storage_failure(e: BaseException) -> StorageFull | None:
    """The StorageFull behind `e`, if any. A write that fails inside a trial is followed by
    Optuna's own failing write of the trial's FAIL state and its "Should not reach" assertion,
    so the StorageFull is then the context of another error, not the error itself."""
    return next((c for c in _chain(e) if isinstance(c, StorageFull)), None)


def _chain(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _db_full(e: BaseException) -> bool:
    """A database error that means "no room": SQLite's SQLITE_FULL, an OSError ENOSPC/EFBIG,
    PostgreSQL's disk_full (SQLSTATE 53100)."""
    if is_full(e):
        return True
    return any(getattr(c, "pgcode", None) == "53100" or getattr(c, "sqlstate", None) == "53100"
               for c in _chain(e))


def open_for_tune(cfg: Config, spec: StorageSpec,
                  on_stale: Callable[[optuna.Study, FrozenTrial], Any] | None = None
                  ) -> optuna.storages.BaseStorage:
    """Connect, creating the database (and its folder) or journal file when new, with the
    heartbeat of `uses_heartbeat`; on_stale(study, trial) runs on each trial the heartbeat
    fails (tune re-queues it).

    Workers started together race to create the schema of a new database; the loser sees a
    unique-constraint error (alembic_version) and simply tries again, finding the tables made."""
    sw = cfg.sweep

    def connect() -> optuna.storages.BaseStorage:
        if spec.kind == "journal":
            Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
            return _journal(spec.target, spec.label)
        sqlite_file = _sqlite_file(spec.target)
        if sqlite_file is not None:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        heartbeat: dict[str, Any] = {}
        if sw.heartbeat_s > 0:
            heartbeat = dict(heartbeat_interval=sw.heartbeat_s, grace_period=sw.grace_s,
                             heartbeat_stale_trial_callback=on_stale)
        return _rdb(spec.target, **heartbeat)

    return _open(spec, connect)


def open_for_reading(spec: StorageSpec) -> optuna.storages.BaseStorage:
    """Connect to read a study. Never creates a database or journal file: reading from a
    mistyped path must not leave an empty one behind."""
    if spec.kind == "journal":
        if not Path(spec.target).is_file():
            raise UserError(f"journal file not found: {spec.target}")
        return _open(spec, lambda: _journal(spec.target, spec.label))
    sqlite_file = _sqlite_file(spec.target)
    if sqlite_file is not None and not sqlite_file.is_file():
        raise UserError(f"storage {spec.label}: no such SQLite file {sqlite_file}")
    return _open(spec, lambda: _rdb(spec.target))


def label_of(study: optuna.Study) -> str:
    """The storage of `study` as it may be printed: the label it was opened under, else the
    RDB URL with its password hidden, else the label tune recorded in the study."""
    storage = opened_storage(study)
    if storage in _LABELS:
        return _LABELS[storage]
    if isinstance(storage, optuna.storages.RDBStorage):
        return redact_url(storage.url) or ""
    return study.user_attrs.get("storage", "")


def _open(spec: StorageSpec, connect: Callable[[], optuna.storages.BaseStorage]
          ) -> optuna.storages.BaseStorage:
    """connect(), retrying the schema-creation race; any failure becomes one redacted line."""
    for attempt in range(5):
        try:
            storage = connect()
        except StorageFull:
            raise
        except Exception as e:  # sqlalchemy / driver errors: many types, multi-line messages
            text = str(e)
            if attempt < 4 and ("UNIQUE constraint" in text or "already exists" in text
                                or "duplicate key" in text):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise UserError(f"cannot open storage {spec.label}: {redact_text(first_line(e))}") from None
        _LABELS[storage] = spec.label
        return storage
    raise AssertionError("unreachable")


class _WholeLineJournal(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file, appended in whole lines: a failed append (a full disk) is cut
    back under the lock and raised as StorageFull. Optuna's own append can leave half a line,
    which the next process's append then glues onto: an entry no reader can parse, in the middle
    of the file, and the study no longer opens. The format and the lock are Optuna's own (the
    lock is passed in through the public `lock_obj`, so this class can take it)."""

    def __init__(self, path: str, label: str):
        self._whole_path, self._label = path, label
        self._whole_lock = optuna.storages.journal.JournalFileSymlinkLock(path)
        try:
            super().__init__(path, lock_obj=self._whole_lock)
        except OSError as e:
            if is_full(e):
                raise storage_full(label, e) from e
            raise

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        try:
            self._whole_lock.acquire()
            try:
                append_lines(self._whole_path, text, fsync=True)
            finally:
                self._whole_lock.release()
        except OSError as e:
            if is_full(e):
                raise storage_full(self._label, e) from e
            raise


def _journal(path: str, label: str | None = None) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(_WholeLineJournal(path, label or f"journal:{path}"))


def _rdb(url: str, **heartbeat: Any) -> optuna.storages.RDBStorage:
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Workers share one file: wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 300}}
    elif url.startswith(("postgresql", "postgres")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    with warnings.catch_warnings():  # the heartbeat arguments are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = _RDBStorage(_with_driver(url), engine_kwargs=engine_kwargs, **heartbeat)
    if url.startswith("sqlite"):
        _serialize_sqlite_transactions(storage.engine)
    _raise_storage_full(storage.engine, redact_url(url) or "")
    return storage


class _RDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose heartbeat skips a beat that finds no room. The beat runs on
    Optuna's own thread, where an error would print a traceback and end the heartbeat; the
    trial's next write, on the main thread, fails the same way and says so in one line."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except StorageFull:
            pass


def _raise_storage_full(engine: Any, label: str) -> None:
    """Make a write that finds no room raise StorageFull (one line naming the storage) instead
    of Optuna's StorageInternalError, which says "invalid data" and spans a hundred lines of
    chained tracebacks. SQLAlchemy rolls the transaction back first, so nothing half-written
    stays."""
    from sqlalchemy import event

    @event.listens_for(engine, "handle_error")
    def _full(context) -> None:
        if _db_full(context.original_exception):
            raise storage_full(label, context.original_exception)


def _serialize_sqlite_transactions(engine: Any) -> None:
    """Make every SQLite transaction BEGIN IMMEDIATE (SQLAlchemy's documented recipe).

    Python's sqlite3 driver runs a SELECT outside any transaction, so Optuna's "pop a WAITING
    trial" (read its state, then set it RUNNING; atomic on PostgreSQL through SELECT ... FOR
    UPDATE) let two worker processes take the same enqueued trial: both trained it and the
    second crashed telling a finished trial. An immediate transaction takes the write lock
    first, so the read and the update are one step; the other workers wait (timeout 300 s)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_leaves_begin_to_us(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks reconnect with them


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; our extra installs psycopg2.
    Name the driver that is importable (an explicit +driver in the URL is kept)."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2{sep}{rest}"
    return url


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other URLs and in-memory databases."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None  # connecting will fail with its own message
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)
