"""Run directories: a new one per run by default, the rule for writing into one that already
holds a run (only `train.resume=true` with the same config), and the lock that keeps a second
process out of a directory in use.

A run directory holds config.yaml, last.pt, metrics.jsonl and result.json (see `train`). No
file there holds a password: the config is written, and checked on resume, as
`without_passwords` gives it (a storage URL's password hidden). Its `.lock` file is locked with flock(2) by the process writing there and records that process's
pid and host; the kernel drops the lock when the process ends, however it ends, so a lock left
by a dead process is taken over without anyone deleting it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mupsweep.config import Config, as_today, config_differences, to_dict
from mupsweep.errors import UserError
from mupsweep.util import first_line

DEFAULT_ROOT = Path("runs/train")
RUN_FILES = ("config.yaml", "last.pt", "metrics.jsonl", "result.json")
LOCK_FILE = ".lock"


def without_passwords(cfg: Config) -> Config:
    """A copy of `cfg` fit to be written to a file: the password of every URL in it hidden
    (sweep.storage, and a URL anywhere else, as in provenance.overrides). What a run writes
    (config.yaml, the checkpoint's config) and what it is compared with on resume both go
    through here, so a hidden password never makes an honest resume differ."""
    return _hide_passwords(cfg)


def _hide_passwords(value: Any) -> Any:
    if isinstance(value, str):
        return _hide_password(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _hide_passwords(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        return {k: _hide_passwords(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_hide_passwords(v) for v in value)
    return value


def _hide_password(text: str) -> str:
    """`text` with the password of a URL in it hidden: a whole URL or an override's value
    (`sweep.storage=postgresql://u:pw@host/db`) by SQLAlchemy's own parser (`redact_url`, which
    falls back to hiding every URL's password in free text). Text without a password comes back unchanged, so nothing else moves."""
    if "://" not in text:
        return text
    # Here only: mupsweep.sweep.storage loads optuna and SQLAlchemy, which a run without URLs skips.
    from mupsweep.sweep.storage import redact_url

    key, equals, value = text.partition("=")
    if equals and "://" in value and "://" not in key:  # key=URL, as an override
        hidden = f"{key}={redact_url(value)}"
    else:
        hidden = redact_url(text) or text
    if hidden == text or "***" not in hidden:  # no password there: keep the text as it was
        return text
    return hidden


def _os_error(path: Path, what: str, e: OSError) -> UserError:
    return UserError(f"cannot {what} {path}: {e.strerror or first_line(e)}")


def make_dir(path: Path) -> None:
    """mkdir -p, with one line naming the path when it cannot be made."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a directory; choose another train.run_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(path, "create the directory", e) from None


def new_run_dir(root: Path = DEFAULT_ROOT, name: str | None = None) -> Path:
    """Create and return root/name (default: the current local time, YYYY-MM-DD_HH-MM-SS), or
    root/name-1, -2, ... when that exists: a directory no other run has."""
    name = name or time.strftime("%Y-%m-%d_%H-%M-%S")
    make_dir(root)
    for n in range(10_000):
        path = root / (name if n == 0 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise _os_error(path, "create the directory", e) from None
    raise UserError(f"{root}: no free name {name}-N; clean up that directory")


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse to write cfg's run into `run_dir` when it holds another run: without
    train.resume, any run; with it, a run whose config.yaml differs in a key that changes
    results (the checkpoint's own config is checked again when it is loaded)."""
    if not holds_run(run_dir):
        return
    if not cfg.train.resume:
        raise UserError(f"train.run_dir={run_dir} already holds a run; continue it with "
                        f"`mupsweep train --resume {run_dir}` (or train.resume=true), or choose "
                        "another train.run_dir (or leave it unset for a new one)")
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise UserError(f"{path} is unreadable ({first_line(e)}); cannot check that the run "
                        "there has this config") from None
    # The run wrote its config with passwords hidden (without_passwords): compare like that.
    diff = config_differences(as_today(old) if isinstance(old, dict) else {},
                              to_dict(without_passwords(cfg)))
    if diff:
        raise UserError(f"train.run_dir={run_dir} holds a run with another config ({'; '.join(diff)}"
                        "); resume it with its own values, or choose another train.run_dir")


class RunDirLock:
    """An exclusive lock on a run directory (flock on run_dir/.lock, which names its holder)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _os_error(self.path.parent, "write in", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use() from None
        except OSError as e:  # a file system without locks: say so rather than run unguarded
            os.close(fd)
            raise _os_error(self.path, "lock", e) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as e:  # a full disk: nothing else in the run directory was touched yet
            os.close(fd)
            raise _os_error(self.path, "write", e) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (see module docstring)
            self._fd = None

    def check_free(self) -> None:
        """Raise UserError if another process holds the lock now (without taking it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody has run here
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use() from None
        finally:
            os.close(fd)

    def _in_use(self) -> UserError:
        try:
            holder = self.path.read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        return UserError(f"train.run_dir={self.path.parent} is in use by {holder}; wait for that "
                         "run to end, or choose another train.run_dir")


def open_run_dir(cfg: Config) -> tuple[Path, RunDirLock]:
    """The directory cfg's run writes in (train.run_dir, or a new one), created and locked,
    after `check_run_dir` allowed it. The caller releases the lock when the run ends."""
    run_dir = Path(cfg.train.run_dir) if cfg.train.run_dir is not None else new_run_dir()
    make_dir(run_dir)
    lock = RunDirLock(run_dir)
    lock.acquire()
    try:
        check_run_dir(cfg, run_dir)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock
