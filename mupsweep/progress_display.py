"""A training run's progress on stderr: a rich bar on a terminal, one plain line per
`train.log_every` steps in a log file (SLURM, nohup, CI), or nothing.

`Progress(...)` is a context manager that yields a display: call it with (step, loss) after
every step and `.log(step, loss, lr)` at every log step.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path


class NoProgress:
    """The display that shows nothing (and the interface of the others)."""

    def __call__(self, step: int, loss: float) -> None:
        pass

    def log(self, step: int, loss: float, lr: float) -> None:
        pass


class Progress:
    """Progress on stderr: a rich bar on a terminal; otherwise one plain line per log step:
    step, loss, lr, steps/s, ETA (`PlainLines`). Or nothing, when not `enabled`."""

    def __init__(self, enabled: bool, total: int, start: int, run_dir: Path):
        self.enabled, self.total, self.start, self.run_dir = enabled, total, start, run_dir
        self.bar = None

    def __enter__(self) -> NoProgress:
        if not self.enabled:
            return NoProgress()
        from rich.console import Console

        console = Console(stderr=True)
        # Said before the first step, so an interrupted run can be found and resumed.
        console.print(f"run dir {self.run_dir} (continue it: mupsweep train --resume {self.run_dir})",
                      highlight=False, soft_wrap=True, markup=False)
        t0, s0 = time.perf_counter(), self.start

        def rate(step: int) -> float:
            return (step - s0) / max(1e-9, time.perf_counter() - t0)

        if not console.is_terminal:
            return PlainLines(self.total, rate)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"),
                                TextColumn("{task.fields[rate]:.1f} steps/s"), TimeRemainingColumn(),
                                console=console, transient=False)
        self.bar.__enter__()
        task = self.bar.add_task("train", total=self.total, completed=self.start, loss=float("nan"),
                                 rate=0.0)
        return Bar(self.bar, task, rate)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


class Bar(NoProgress):
    """A rich progress bar: step, loss, steps/s, time left."""

    def __init__(self, bar, task, rate: Callable[[int], float]):
        self.bar, self.task, self.rate = bar, task, rate

    def __call__(self, step: int, loss: float) -> None:
        self.bar.update(self.task, completed=step, loss=loss, rate=self.rate(step))


class PlainLines(NoProgress):
    """One line per log step, flushed at once, for logs that are files."""

    def __init__(self, total: int, rate: Callable[[int], float]):
        self.total, self.rate = total, rate

    def log(self, step: int, loss: float, lr: float) -> None:
        r = self.rate(step)
        eta = (self.total - step) / r if r > 0 else math.inf
        if math.isfinite(eta):
            minutes, seconds = divmod(int(eta), 60)
            eta_text = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
        else:
            eta_text = "-"
        sys.stderr.write(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  "
                         f"{r:.2f} steps/s  ETA {eta_text}\n")
        sys.stderr.flush()
