"""Coordinate check: is this model really muP (across width), or CompleteP (across depth)?

Train the same config at several widths for a few steps with the real diffusion loss, record
the mean |activation| of each tracked module on every training forward, and fit, per module and
step, the slope of log2(size) against log2(width). Under muP every slope stays near 0; under
SP the readout (and the model output) grows about x2 per doubling after the first update.

Across depth (`depths=[2, 4, 8, 16]`, width fixed) the same fit runs against log2(depth) on the
modules every depth has, plus two measures of the residual stream after the last block, taken
on one fixed probe batch (the first training batch) before every training forward: its size
(`stream`) and how much one optimizer step moved it (`stream_update`). Without depth scaling
the stream grows with the number of blocks at init and every block's update adds to the
stream's, so its per-step update grows about x2 per doubling of depth; under CompleteP both
stay put (mupsweep/completep.py).

mup's own `get_coord_data` is not used: it cannot take a diffusion loss and crashes on modules
that return None. A forward-hook recorder on our own `train()` is a few lines.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mupsweep.config import Config
from mupsweep.data import load_dataset
from mupsweep.errors import CheckFailed, UserError
from mupsweep.models.user import is_user_arch
from mupsweep.parametrize import build_model, data_spec_of
from mupsweep.report import check_output_dir, make_output_dir, plot_coord_check
from mupsweep.train import train
from mupsweep.util import atomic_write, is_full, os_reason


class ActivationRecorder:
    """Forward hooks that log mean |output| per module for each training forward.

    With `stream=True` it also runs the model on a fixed probe batch (the first training
    batch, no grad) before every training forward and logs the residual stream's size there
    (`stream`) and the change one optimizer step made to it (`stream_update`, at the number
    of that step)."""

    def __init__(self, width: int, seed: int, depth: int | None = None, stream: bool = False):
        self.width, self.seed, self.depth, self.stream = width, seed, depth, stream
        self.step = 0
        self.rows: list[dict] = []
        self._probe: tuple | None = None  # (args, kwargs) of the first training forward
        self._probing = False
        self._training = False  # the forward running now is a training forward
        self._last_stream: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._next_step, with_kwargs=True)
        model.register_forward_hook(self._hook("output"))
        for name, module in model.tracked_modules().items():
            module.register_forward_hook(self._hook(name))
        if self.stream:
            head = model.stream_head()
            if head is None:
                raise UserError("coord-check --depths measures the residual stream before the "
                                "readout; this model does not say where that is (stream_head)")
            head.register_forward_pre_hook(self._stream_hook)

    def _row(self, name: str, step: int, l1: float) -> None:
        row = {"module": name, "step": step, "width": self.width, "seed": self.seed, "l1": l1}
        if self.depth is not None:
            row["depth"] = self.depth
        self.rows.append(row)

    def _next_step(self, module: nn.Module, args, kwargs) -> None:
        # the model's own mode, not each tracked module's: a user's model runs its inner
        # modules in eval mode while it trains (models/user.UserModel.train)
        if self._probing:
            return
        self._training = module.training
        if not module.training:
            return
        self.step += 1
        if self.stream:
            if self._probe is None:
                self._probe = (_detached(args), _detached(kwargs))
            self._probing = True
            try:
                with torch.no_grad():
                    module(*self._probe[0], **self._probe[1])
            finally:
                self._probing = False

    def _stream_hook(self, module: nn.Module, args) -> None:
        if not self._probing:
            return
        h = args[0].detach().float()
        self._row("stream", self.step, h.abs().mean().item())
        if self._last_stream is not None:  # the change made by optimizer step `step - 1`
            self._row("stream_update", self.step - 1, (h - self._last_stream).abs().mean().item())
        self._last_stream = h

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            # a block may return a tuple (diffusers' joint blocks: text and image streams)
            tensors = [o for o in (output if isinstance(output, tuple | list) else [output])
                       if isinstance(o, torch.Tensor)]
            if self._training and tensors and not self._probing:
                l1 = sum(o.detach().abs().mean().item() for o in tensors) / len(tensors)
                self._row(name, self.step, l1)
        return hook


def _detached(value):
    """A copy of a forward's arguments that later steps cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached(v) for v in value)
    return value


@dataclass
class CoordCheckResult:
    parametrization: str  # the width parametrization (mup | sp), or the depth one (none | completep)
    table: pd.DataFrame  # module, step, width, seed, l1 (and depth, across depth)
    slopes: pd.DataFrame  # module, step, slope (NaN where the module output is exactly 0)
    max_abs_slope: float
    worst: str  # "module@step" with the largest |slope|
    tolerance: float
    plot_path: str | None = None
    axis: str = "width"  # what grows: width | depth

    @property
    def passed(self) -> bool:
        return self.max_abs_slope <= self.tolerance

    def summary(self) -> dict:
        return {"parametrization": self.parametrization, "axis": self.axis, "passed": self.passed,
                "max_abs_slope": self.max_abs_slope, "worst": self.worst,
                "tolerance": self.tolerance, "plot": self.plot_path,
                "slopes": self.slopes.to_dict(orient="records")}


def fit_slopes(table: pd.DataFrame, axis: str = "width") -> pd.DataFrame:
    """Slope of log2(mean over seeds of l1) vs log2(axis), per module and step."""
    rows = []
    means = table.groupby(["module", "step", axis], sort=False)["l1"].mean().reset_index()
    for (module, step), g in means.groupby(["module", "step"], sort=False):
        if (g["l1"] <= 0).any():  # zero-init readout before its first update: no scale yet
            rows.append({"module": module, "step": step, "slope": float("nan")})
            continue
        slope = np.polyfit(np.log2(g[axis]), np.log2(g["l1"]), 1)[0]
        rows.append({"module": module, "step": step, "slope": float(slope)})
    return pd.DataFrame(rows)


def coord_check(cfg: Config, out_dir: str | None = None, plot: bool = True,
                depths: list[int] | None = None) -> CoordCheckResult:
    """Run the check for cfg.model at cfg.coord.widths; returns slopes and the verdict.

    With `depths`, the width stays model.width and the depth grows instead; the verdict is
    then about cfg.model.depth_parametrization, with the base depth model.base_depth (or the
    smallest depth when it is not set).

    `out_dir` (the CLI passes coord.out_dir) is checked before any training: a folder that can
    never be written is refused at once. Its CSV and plot are each replaced whole, so a failed
    write (a full disk) is one line naming the file and carrying the verdict."""
    cc = cfg.coord
    m = cfg.model
    if depths is not None:
        if len(set(depths)) < 2 or any(d <= 0 for d in depths):
            raise UserError(f"--depths={','.join(map(str, depths))}: need two or more different "
                            "positive depths")
        sizes, axis = sorted(set(depths)), "depth"
        base_depth = m.base_depth if m.base_depth is not None else sizes[0]
    else:
        if len(cc.widths) < 2 or any(w < m.head_dim or w % m.head_dim for w in cc.widths):
            raise UserError(f"coord.widths={cc.widths}: need two or more widths, each a positive "
                            f"multiple of model.head_dim={m.head_dim}")
        sizes, axis = cc.widths, "width"
    if out_dir is not None:
        check_output_dir(out_dir, "coord.out_dir")
    dataset = load_dataset(cfg.data)
    recorders = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for seed in range(cc.seeds):
                run = copy.deepcopy(cfg)
                if axis == "width":
                    run.model.width = size
                    recorder = ActivationRecorder(size, seed)
                else:
                    run.model.depth, run.model.base_depth = size, base_depth
                    recorder = ActivationRecorder(m.width, seed, depth=size, stream=True)
                run.optim.lr, run.optim.warmup_steps = cc.lr, 0
                run.train.steps, run.train.batch_size, run.train.seed = cc.steps, cc.batch_size, seed
                run.train.eval_every, run.train.val_size = 10**9, 8
                run.train.save, run.train.resume, run.train.progress = False, False, False
                run.train.ema_decay = 0.0
                run.train.run_dir = f"{tmp}/{axis}{size}_s{seed}"
                train(run, dataset=dataset, on_model=recorder.attach)
                recorders.append(recorder)
    table = pd.DataFrame([r for rec in recorders for r in rec.rows])
    if axis == "depth":  # only what every depth has: blocks.7 is not there at depth 2
        common = table.groupby("module")["depth"].nunique() == len(sizes)
        table = table[table["module"].isin(common[common].index)].reset_index(drop=True)
    slopes = fit_slopes(table, axis)
    finite = slopes.dropna()
    worst_row = finite.loc[finite["slope"].abs().idxmax()]
    name = cfg.model.parametrization if axis == "width" else cfg.model.depth_parametrization
    result = CoordCheckResult(
        parametrization=name, table=table, slopes=slopes,
        max_abs_slope=float(abs(worst_row["slope"])),
        worst=f"{worst_row['module']}@step{int(worst_row['step'])}", tolerance=cc.tolerance,
        axis=axis)
    if out_dir is not None:
        _write_outputs(result, cfg, sizes, Path(out_dir), plot)
    return result


def gate(cfg: Config, command: str) -> CoordCheckResult | None:
    """Before `command` (tune, validate) spends compute on a model that mupsweep converted to
    muP itself (a user's class, models/automup.py): CheckFailed (exit 1) when its attention is
    written inline (a softmax over a score matrix outside F.scaled_dot_product_attention: no
    muP scale, no attn_mult can reach it; found on meta tensors, nothing computed), or when its
    coordinate check at cfg.coord's widths (a few steps) fails, naming the modules whose slope
    fails. Never a model trained as SP in silence when muP was asked for. coord.gate=false
    skips both."""
    m = cfg.model
    if m.parametrization != "mup" or not is_user_arch(m.arch) or not cfg.coord.gate:
        return None
    ahead = (f"Nothing was spent on {command}; coord.gate=false runs it anyway")
    inline = build_model(m, data_spec_of(load_dataset(cfg.data)), "meta").inline_attention
    if inline:
        raise CheckFailed(
            f"model.arch={m.arch} cannot be converted to muP: attention computed inline in "
            f"{', '.join(inline[:3])}{' ...' if len(inline) > 3 else ''} keeps its own fixed "
            "1/sqrt(head_dim) (muP needs 1/head_dim when the head dim grows, and model.attn_mult "
            "would change nothing); call torch.nn.functional.scaled_dot_product_attention there "
            f"and mupsweep gives it muP's scale. {ahead}")
    result = coord_check(cfg, out_dir=None, plot=False)
    if result.passed:
        return result
    failing = result.slopes[result.slopes["slope"].abs() > result.tolerance]
    worst = (failing.assign(size=failing["slope"].abs()).sort_values("size", ascending=False)
             .drop_duplicates("module"))
    modules = ", ".join(f"{r.module} (slope {r.slope:+.2f} at step {int(r.step)})"
                        for r in worst.head(4).itertuples())
    raise CheckFailed(
        f"model.arch={m.arch} is not muP after the automatic conversion: its coordinate check "
        f"fails (max |slope| {result.max_abs_slope:.2f} > coord.tolerance={result.tolerance} at "
        f"widths {cfg.coord.widths}) in {modules}; look for a layer that scales by the width "
        "itself or a readout that is not an nn.Linear (`mupsweep coord-check` with the same "
        f"overrides draws the plot). {ahead}")


def _write_outputs(result: CoordCheckResult, cfg: Config, sizes: list[int], out: Path,
                   plot: bool) -> None:
    """out/coord_<par>.csv (and .png): the table and its plot, each replaced whole, so a failed
    write leaves the file as it was; the error says so and carries the verdict."""
    name, axis = result.parametrization, result.axis
    stem = f"coord_{name}" if axis == "width" else f"coord_depth_{name}"
    verdict = (f"{'passed' if result.passed else 'FAILED'} (max |slope| "
               f"{result.max_abs_slope:.2f} at {result.worst})")
    try:
        make_output_dir(out, "coord.out_dir")
    except UserError as e:
        raise UserError(f"{e}; the check {verdict}") from None
    path = out / f"{stem}.csv"
    try:
        atomic_write(path, lambda tmp: result.table.to_csv(tmp, index=False))
        if plot:
            path = out / f"{stem}.png"
            title = (f"{cfg.model.arch} {name}: max |slope| vs {axis} "
                     f"{result.max_abs_slope:.2f} ({'pass' if result.passed else 'FAIL'})")
            result.plot_path = str(plot_coord_check(result.table, sizes, path, title, axis=axis))
    except OSError as e:
        kept = "left as it was" if path.suffix == ".csv" else "left as it was (the CSV is written)"
        again = "; free space and run it again" if is_full(e) else ""
        raise UserError(f"cannot write {path}: {os_reason(e)}; {path.name} {kept}; the check "
                        f"{verdict}{again}") from None
