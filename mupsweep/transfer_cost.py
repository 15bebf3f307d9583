"""What a transfer's target costs: the FLOPs of one target run, estimated on the meta device
(no memory, no init, any width), the proxies' FLOPs per image as a share of the target's, and
the sweep's FLOPs as a share of one target run (`estimate_cost`, recorded in provenance)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from mupsweep.config import Config
from mupsweep.errors import UserError
from mupsweep.util import training_flops


@dataclass
class Cost:
    """What the target costs, and the sweep as a share of it (None where it is unknown)."""

    per_image: float | None  # FLOPs of one image's forward pass at the target
    target_flops: float | None  # FLOPs of one target run
    tuning_pct: float | None  # the sweep's FLOPs, as % of one target run
    proxy_share: dict[int, float]  # per image, each proxy width's FLOPs as % of the target's
    line: str  # human summary of tuning cost vs one target run


def estimate_cost(best: dict[str, Any], proxy: Config, cfg: Config) -> tuple[Cost, list[str]]:
    """The target run's FLOPs, estimated on the meta device, against the sweep's. Returns the
    cost and a warning when it could not be estimated (e.g. the data is not on this machine:
    the config is still good)."""
    cost = best.get("cost") or {}
    sweep_flops = cost.get("flops")
    warnings = []
    try:
        per_image, target_flops = estimate_train_flops(cfg)
    except UserError as e:
        per_image, target_flops = None, None
        warnings.append(f"target FLOPs not estimated: {e}")
    pct = (100.0 * sweep_flops / target_flops
           if isinstance(sweep_flops, int | float) and target_flops else None)
    line = _cost_line(cost, per_image, target_flops, pct, cfg)
    share = proxy_flops_share(proxy, best["proxy_widths"], per_image)
    if share:
        line += "; per image, " + ", ".join(
            f"the proxy (width {w}, depth {proxy.model.depth}) costs {width_pct:.3g}%"
            for w, width_pct in share.items()) + " of the target"
    return Cost(per_image, target_flops, pct, share, line), warnings


def _data_spec(cfg: Config):
    """The data's shape: a built-in dataset's is known without loading it (a FLOP estimate
    needs no data); other datasets are loaded to learn theirs."""
    from mupsweep.data import builtin_shape
    from mupsweep.models import DataSpec

    if (shape := builtin_shape(cfg.data.name)) is not None:
        size, channels, classes = shape
        return DataSpec(image_size=cfg.data.image_size or size, channels=channels,
                        num_classes=1 if cfg.data.unconditional else classes)
    from mupsweep.data import load_dataset
    from mupsweep.parametrize import data_spec_of

    return data_spec_of(load_dataset(cfg.data))


def estimate_train_flops(cfg: Config) -> tuple[float, float]:
    """(FLOPs per image forward, FLOPs of the whole run = 3 x forward x batch x steps).

    The model is built on the meta device and its forward counted (`mupsweep.flops`): no
    memory, no init, any width."""
    from mupsweep.flops import config_flops_per_image

    spec = _data_spec(cfg)
    per_image = float(config_flops_per_image(cfg.model, spec))
    return per_image, training_flops(per_image, cfg.train.batch_size) * cfg.train.steps


def _fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def proxy_flops_share(proxy: Config, widths: list[int], target_per_image: float | None) -> dict[int, float]:
    """FLOPs per image of the proxy at each proxy width, as % of the target's."""
    if not target_per_image:
        return {}
    share = {}
    for w in widths:
        probe = copy.deepcopy(proxy)
        probe.model.width = int(w)
        try:
            share[int(w)] = 100.0 * estimate_train_flops(probe)[0] / target_per_image
        except UserError:  # the data is not on this machine: the ledger says less
            return {}
    return share


def _cost_line(cost: dict, per_image: float | None, target: float | None, pct: float | None,
               cfg: Config) -> str:
    sweep = cost.get("flops")
    parts = []
    if isinstance(sweep, int | float):
        n = cost.get("n_complete")
        wall = cost.get("wall_time_s")
        extra = ", ".join(x for x in (f"{n} complete trials" if n is not None else "",
                                      f"{wall:.0f} s" if isinstance(wall, int | float) else "") if x)
        parts.append(f"tuning cost {_fmt_flops(sweep)}" + (f" ({extra})" if extra else ""))
    if target is not None:
        parts.append(f"one target run {_fmt_flops(target)} (3 x {_fmt_flops(per_image)}/image "
                     f"x batch {cfg.train.batch_size} x {cfg.train.steps} steps)")
    line = "; ".join(parts) or "cost unknown"
    if pct is not None:
        line += f": tuning = {pct:.3g}% of one target run"
    return line
