"""What a run writes as it trains: metrics.jsonl (and TensorBoard beside it), each write whole
or refused in one line naming the file (`writing`).

One `MetricsLog` per run; a group of runs trained together (`mupsweep.train`) has one per
member, each in the member's own run directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mupsweep.errors import UserError
from mupsweep.util import append_lines, atomic_write_text, first_line


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write (read-only directory, full disk) is one line naming the file."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or first_line(e)}") from None


def write_text(path: Path, text: str) -> None:
    """`path` replaced whole by `text` (atomic), or one line naming it."""
    with writing(path):
        atomic_write_text(path, text)


class MetricsLog:
    """metrics.jsonl, one JSON object per line. On resume, lines past the checkpoint's step are
    dropped so the file matches the weights. With `tensorboard_dir` (train.tensorboard=true)
    every record also goes to TensorBoard: train/loss, validation/loss, lr/base and lr/<role>,
    throughput/steps_per_s and images_per_s (events past a resumed step are purged)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool,
                 tensorboard_dir: Path | None = None, batch_size: int = 0):
        self.path, self.enabled, self.batch_size = path, enabled, batch_size
        self.tb, self.last_log = None, None
        if not enabled:
            return
        kept = []
        with writing(path):
            if resume_step and path.exists():
                for line in path.read_text().splitlines():
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line)
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: everything after it is stale too
            elif path.exists():
                path.unlink()
            if kept:  # replaced whole: a full disk leaves the old file, not half of it
                atomic_write_text(path, "\n".join(kept) + "\n")
        if tensorboard_dir is not None:
            self.tb = tensorboard_writer(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        if self.enabled:
            with writing(self.path):  # a whole line or none: readers never see a torn one
                append_lines(self.path, json.dumps(record) + "\n")
            if self.tb is not None:
                self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "loss":
                self.tb.add_scalar("train/loss", value, step)
            elif key == "validation_loss":
                self.tb.add_scalar("validation/loss", value, step)
            elif key == "lr":
                self.tb.add_scalar("lr/base", value, step)
            elif key.startswith("lr_"):
                self.tb.add_scalar(f"lr/{key[3:]}", value, step)
            elif key.endswith("_time_s") and key != "time_s":  # a metric's cost
                self.tb.add_scalar(f"eval_time_s/{key[:-len('_time_s')]}", value, step)
            elif key not in ("step", "time_s"):  # another metric of the evaluation
                self.tb.add_scalar(f"validation/{key}", value, step)
        if "time_s" in record:
            if self.last_log is not None and record["time_s"] > self.last_log[1]:
                rate = (step - self.last_log[0]) / (record["time_s"] - self.last_log[1])
                self.tb.add_scalar("throughput/steps_per_s", rate, step)
                self.tb.add_scalar("throughput/images_per_s", rate * self.batch_size, step)
            self.last_log = (step, record["time_s"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def tensorboard_writer(log_dir: Path, purge_step: int | None = None):
    """A TensorBoard SummaryWriter (needs the `tensorboard` package: the .[tensorboard] extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: "
                        "pip install 'mupsweep[tensorboard]' (or pip install tensorboard)") from None
    with writing(log_dir):
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
