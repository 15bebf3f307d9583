"""A run's state and its checkpoint file: what `last.pt` holds, written and read back safely.

`RunState.state_dict()` is what a checkpoint holds and `RunState.load_state_dict()` is what
resume reads: one list of fields serves both. Every field is a tensor or a plain Python value
(RNG states are uint8 tensors, the history and config plain dicts), so a checkpoint is read
with `torch.load(weights_only=True)`: a file from elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mupsweep.config import Config, as_today, config_differences, to_dict
from mupsweep.errors import UserError
from mupsweep.util import atomic_write, first_line


class RunState:
    """Everything a run needs to go on where it stopped: weights, optimizer (whose step count
    sets the lr schedule), EMA, the two generators (data order; timesteps, noise and dropout),
    the step, the wall time so far, the validation history and the config it was started with.

    Every member of a training group has one (`train.Member`); only a run alone (a group of
    one) has a model and optimizer in it, and is saved."""

    def __init__(self, cfg: Config, model: nn.Module | None, optimizer: Any,
                 ema: nn.Module | None, gen_index: torch.Generator, gen_noise: torch.Generator):
        self.cfg = cfg
        self.model, self.optimizer, self.ema = model, optimizer, ema  # optimizer: a GroupAdamW
        self.gen_index, self.gen_noise = gen_index, gen_noise
        self.step = 0
        self.history: list[dict] = []  # [{"step", "validation_loss"}, ...]
        self.wall_time_s = 0.0  # this run's training time, earlier processes of it included

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),  # torch AdamW's format
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "gen_index": self.gen_index.get_state(),
            "gen_noise": self.gen_noise.get_state(),  # a CPU uint8 tensor for any device
            "step": self.step,
            "wall_time_s": self.wall_time_s,
            "history": self.history,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`'s output. The config is not restored: the caller checks
        it against its own (`restore`). A checkpoint from before the group optimizer (torch's
        AdamW and a LambdaLR "scheduler") reads the same: its optimizer state has this format,
        and its scheduler's position is the step."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.gen_index.set_state(state["gen_index"])
        self.gen_noise.set_state(state["gen_noise"].to(self.gen_noise.get_state().device))
        self.step, self.wall_time_s, self.history = state["step"], state["wall_time_s"], state["history"]
        self.optimizer.steps = self.step  # the schedule's position (empty state: step 0)


def save_checkpoint(state: RunState, path: Path) -> None:
    """Write `state` to `path` atomically: a kill mid-write, or a failed write (full disk,
    read-only directory: one line naming the file), leaves the previous checkpoint."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a Python file, so a failed write keeps its OSError
            torch.save(state.state_dict(), f)

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        cause = e if isinstance(e, OSError) else e.__context__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(e)
        raise UserError(f"cannot write checkpoint {path}: {reason} (the previous checkpoint, "
                        "if any, is intact)") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's fields, read without running any code the file might hold."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise UserError(f"checkpoint {path} holds Python objects besides tensors and plain "
                            "values, which could run code when loaded; refused: delete it (the "
                            "run then starts over) or choose another train.run_dir") from None
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                        "delete it (the run then starts over) or choose another train.run_dir") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise UserError(f"checkpoint {path} is not a mupsweep checkpoint")
    return ckpt


def restore(state: RunState, path: Path) -> None:
    """Resume `state` from the checkpoint at `path`, which must have been written by a run of
    the same config (up to keys that cannot change results; train.steps may grow)."""
    ckpt = load_checkpoint(path)
    saved = ckpt.get("config")
    diff = (config_differences(as_today(saved), to_dict(state.cfg)) if isinstance(saved, dict)
            else ["the checkpoint records no config"])
    if diff:
        raise UserError(f"{path} was written by a run with another config ({'; '.join(diff)}); "
                        "resume it with its own values, or choose another train.run_dir")
    problem = _contents_problem(state, ckpt)
    if problem is None:
        try:
            state.load_state_dict(ckpt)
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as e:
            problem = f"does not load into this run ({first_line(e)})"
    if problem is not None:
        raise UserError(f"checkpoint {path} {problem}; delete it (the run then starts over) or "
                        "choose another train.run_dir")


def _contents_problem(state: RunState, ckpt: dict[str, Any]) -> str | None:
    """What in a checkpoint whose config matches does not fit the run (a file edited, cut, or
    from another version), as 'has ...'; None when it fits. Checked before anything is loaded:
    torch accepts a wrong step or a wrong-shaped optimizer moment and fails (or trains wrong)
    only later."""
    step = ckpt.get("step")
    steps = state.cfg.train.steps
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= steps:
        return f"has step {step!r}, not an integer in [0, train.steps={steps}]"
    for key, kind in (("optimizer", dict), ("history", list)):
        if not isinstance(ckpt.get(key), kind):
            return f"has no {key} state" if key not in ckpt else f"has a {key} that is not a {kind.__name__}"
    wall = ckpt.get("wall_time_s")
    if not isinstance(wall, int | float) or isinstance(wall, bool) or not 0 <= wall < float("inf"):
        return f"has wall_time_s {wall!r}, not a number >= 0"
    for key in ("gen_index", "gen_noise"):
        if not isinstance(ckpt.get(key), torch.Tensor) or ckpt[key].dtype != torch.uint8:
            return f"has no random generator state {key} (a uint8 tensor)"
    for key, module in (("model", state.model), ("ema", state.ema)):
        if module is not None and (key == "model" or ckpt.get(key) is not None):
            problem = _tensors_problem(ckpt.get(key), module.state_dict(), key)
            if problem:
                return problem
    return _optimizer_problem(ckpt["optimizer"], state.optimizer)


def _tensors_problem(saved: Any, expected: dict[str, torch.Tensor], what: str) -> str | None:
    """A saved state dict against the module's own: the same names, each tensor the same shape."""
    if not isinstance(saved, dict):
        return f"has no {what} weights"
    missing, extra = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    if missing or extra:
        name = sorted(missing or extra)[0]
        return f"{'lacks' if missing else 'has an unknown'} {what} tensor {name}"
    for name, tensor in expected.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"has {what} tensor {name} of shape {shape}, this run's is {tuple(tensor.shape)}"
    return None


def _optimizer_problem(saved: dict[str, Any], optimizer: Any) -> str | None:
    """The optimizer state against the run's parameters: the same groups of the same sizes, and
    each parameter's moments its shape (torch only finds a wrong shape at the next step)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict) or [
            len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups] != [
            len(g["params"]) for g in optimizer.param_groups]:
        return "has an optimizer state for other parameters"
    params = {i: p for g_saved, g in zip(groups, optimizer.param_groups, strict=True)
              for i, p in zip(g_saved["params"], g["params"], strict=True)}
    for i, moments in saved["state"].items():
        if i not in params or not isinstance(moments, dict):
            return f"has an optimizer state for an unknown parameter {i!r}"
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[i].shape:
                return (f"has optimizer {name} of shape {tuple(value.shape)} for a parameter of "
                        f"shape {tuple(params[i].shape)}")
    return None
