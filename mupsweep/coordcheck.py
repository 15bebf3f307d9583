"""Coordinate check: is this model really muP?

Train the same config at several widths for a few steps with the real diffusion loss, record
the mean |activation| of each tracked module on every training forward, and fit, per module and
step, the slope of log2(size) against log2(width). Under muP every slope stays near 0; under
SP the readout (and the model output) grows about x2 per doubling after the first update.

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
from torch import nn

from mupsweep.config import Config
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.train import train


class ActivationRecorder:
    """Forward hooks that log mean |output| per module for each training forward."""

    def __init__(self, width: int, seed: int):
        self.width, self.seed = width, seed
        self.step = 0
        self.rows: list[dict] = []

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._next_step)
        model.register_forward_hook(self._hook("output"))
        for name, module in model.tracked_modules().items():
            module.register_forward_hook(self._hook(name))

    def _next_step(self, module: nn.Module, args) -> None:
        if module.training:
            self.step += 1

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if module.training and output is not None:
                self.rows.append({"module": name, "step": self.step, "width": self.width,
                                  "seed": self.seed, "l1": output.detach().abs().mean().item()})
        return hook


@dataclass
class CoordCheckResult:
    parametrization: str
    table: pd.DataFrame  # module, step, width, seed, l1
    slopes: pd.DataFrame  # module, step, slope (NaN where the module output is exactly 0)
    max_abs_slope: float
    worst: str  # "module@step" with the largest |slope|
    tolerance: float
    plot_path: str | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs_slope <= self.tolerance

    def summary(self) -> dict:
        return {"parametrization": self.parametrization, "passed": self.passed,
                "max_abs_slope": self.max_abs_slope, "worst": self.worst,
                "tolerance": self.tolerance, "plot": self.plot_path,
                "slopes": self.slopes.to_dict(orient="records")}


def fit_slopes(table: pd.DataFrame) -> pd.DataFrame:
    """Slope of log2(mean over seeds of l1) vs log2(width), per module and step."""
    rows = []
    means = table.groupby(["module", "step", "width"], sort=False)["l1"].mean().reset_index()
    for (module, step), g in means.groupby(["module", "step"], sort=False):
        if (g["l1"] <= 0).any():  # zero-init readout before its first update: no scale yet
            rows.append({"module": module, "step": step, "slope": float("nan")})
            continue
        slope = np.polyfit(np.log2(g["width"]), np.log2(g["l1"]), 1)[0]
        rows.append({"module": module, "step": step, "slope": float(slope)})
    return pd.DataFrame(rows)


def coord_check(cfg: Config, out_dir: str | None = None, plot: bool = True) -> CoordCheckResult:
    """Run the check for cfg.model at cfg.coord.widths; returns slopes and the verdict."""
    cc = cfg.coord
    m = cfg.model
    if len(cc.widths) < 2 or any(w < m.head_dim or w % m.head_dim for w in cc.widths):
        raise UserError(f"coord.widths={cc.widths}: need two or more widths, each a positive "
                        f"multiple of model.head_dim={m.head_dim}")
    dataset = load_dataset(cfg.data)
    recorders = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in cc.widths:
            for seed in range(cc.seeds):
                run = copy.deepcopy(cfg)
                run.model.width = width
                run.optim.lr, run.optim.warmup_steps = cc.lr, 0
                run.train.steps, run.train.batch_size, run.train.seed = cc.steps, cc.batch_size, seed
                run.train.eval_every, run.train.val_size = 10**9, 8
                run.train.save, run.train.resume, run.train.progress = False, False, False
                run.train.ema_decay = 0.0
                run.train.run_dir = f"{tmp}/w{width}_s{seed}"
                recorder = ActivationRecorder(width, seed)
                train(run, dataset=dataset, on_model=recorder.attach)
                recorders.append(recorder)
    table = pd.DataFrame([r for rec in recorders for r in rec.rows])
    slopes = fit_slopes(table)
    finite = slopes.dropna()
    worst_row = finite.loc[finite["slope"].abs().idxmax()]
    result = CoordCheckResult(
        parametrization=cfg.model.parametrization, table=table, slopes=slopes,
        max_abs_slope=float(abs(worst_row["slope"])),
        worst=f"{worst_row['module']}@step{int(worst_row['step'])}", tolerance=cc.tolerance)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / f"coord_{cfg.model.parametrization}.csv", index=False)
        if plot:
            from mupsweep.report import plot_coord_check

            title = (f"{cfg.model.arch} {cfg.model.parametrization}: max |slope| "
                     f"{result.max_abs_slope:.2f} ({'pass' if result.passed else 'FAIL'})")
            result.plot_path = str(plot_coord_check(
                table, cc.widths, out / f"coord_{cfg.model.parametrization}.png", title))
    return result
