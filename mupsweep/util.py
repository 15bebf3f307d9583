"""Small shared utilities: JSON-safe values, atomic file writes, one-line error text, output
folders checked before work, appends of whole lines, and telling a full disk.

Imports nothing of the project, so every module may use it (so it returns problems as text:
the caller raises them as its UserError).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def json_safe(x: Any) -> Any:
    """NaN / inf are not JSON: write them as null (dicts, lists and tuples are walked)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def first_line(e: BaseException | str) -> str:
    """The first non-empty line of an error message (library errors often span many lines);
    the exception's type name when it has no message."""
    text = str(e).strip()
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    return text.splitlines()[0]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`.

    A reader (or a crash) never sees a half-written file: the rename is atomic on POSIX."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


# --------------------------------------------------------------------------------------------
# Output folders and full disks
# --------------------------------------------------------------------------------------------

# errno values that mean "the file system (or this process's file size limit) is full":
# ENOSPC no space, EDQUOT over quota, EFBIG past RLIMIT_FSIZE or the file system's largest file.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_full(e: BaseException) -> bool:
    """Whether `e` (or an error it was raised from) says the disk or a size limit is full:
    OSError ENOSPC / EDQUOT / EFBIG, or SQLite's "database or disk is full"."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if "database or disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def os_reason(e: OSError) -> str:
    """An OSError's reason without its (possibly long) file name: 'No space left on device'."""
    return e.strerror or first_line(e)


def output_dir_problem(path: str | Path | None, what: str) -> str | None:
    """Why an output folder can never be written, in one line naming `what` (the option or
    key, e.g. "-o", "coord.out_dir") and the path; None when it can. Checked before any work
    (`mupsweep.report.check_output_dir` raises it as a UserError).

    Refused: an empty string (usually an unset shell variable, which would write into the
    current directory), a path that exists and is not a folder, a path under a file, and a
    folder (or the nearest existing folder above one still to be made) where a file cannot be
    created. Writability is probed by creating and removing a file, not by reading modes: root
    ignores modes, but /proc, /sys and read-only mounts refuse it too. Nothing is created, so
    a refused command leaves no empty folder behind."""
    if path is None or not str(path).strip():
        return f"{what} is empty; give an output folder (. for the current one)"
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        return f"{what} {out} is a file, not a folder; give a folder name"
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{what} {out}: {existing} is a file, so the folder cannot be made; give another folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".mupsweep-probe-", dir=existing)
    except OSError as e:
        where = "" if existing == out else f" (nothing can be created in {existing})"
        # /proc answers ENOENT to a new file: say what it means
        reason = "it takes no new files" if e.errno == errno.ENOENT else os_reason(e)
        return f"{what} {out} is not writable{where}: {reason}; give another folder"
    os.close(fd)
    os.unlink(probe)
    return None


def append_lines(path: str | Path, text: str, fsync: bool = False) -> None:
    """Append whole lines to `path` (created when missing): on any failure (a full disk, a size
    limit) the file is cut back to its length before, so a reader never sees a torn last line
    and a later append does not glue onto half a line. `text` must end with a newline. Raises
    the OSError. Several processes appending to one file must hold a lock around it."""
    if not text.endswith("\n"):
        raise ValueError("append_lines takes whole lines, ending with a newline")
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # a short write (a disk that fills now) is followed by the error
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Dotted keys (model.width) in a tree of dataclasses and dicts: the one walker
# --------------------------------------------------------------------------------------------

MISSING = object()  # what `get_dotted` returns where a key names nothing


def get_dotted(tree: Any, key: str, default: Any = MISSING) -> Any:
    """The value at `key` ("model.width", "model.args.num_heads") in a tree of dataclasses,
    objects and dicts; `default` where a part of the key is absent."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part, MISSING)
        else:
            node = getattr(node, part, MISSING)
        if node is MISSING:
            return default
    return node


def pop_dotted(tree: dict, key: str) -> Any:
    """Remove and return the entry at `key` of a nested dict (MISSING where there is none)."""
    *path, last = key.split(".")
    node = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return MISSING
    return node.pop(last, MISSING) if isinstance(node, dict) else MISSING


def training_flops(forward_flops_per_image: float, images: int) -> float:
    """FLOPs of training on `images` images: forward + backward = 3 x the forward (the usual
    rule: the backward costs twice the forward). Every cost figure in mupsweep uses it."""
    return 3.0 * forward_flops_per_image * images
