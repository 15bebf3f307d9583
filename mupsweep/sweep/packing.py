"""A pack of trials: up to `sweep.pack` trials of one study trained together as one packed
model (`mupsweep.packed.train_packed`), each keeping its own HPs, pruner reports, losses, cost
and outcome (`objective.TrialProgress`).

A worker with sweep.pack=K > 1 asks the study for up to K trials at once (`workers.py`); here
they train width by width, in the order of sweep.proxy_widths: at each width the trials still
going form one pack, and a trial pruned or diverged at a width leaves there, exactly where its
unpacked objective would have stopped. The members of a pack may differ only in
`packed.PER_MEMBER_KEYS`, so every axis of sweep.params must be one of those
(`check_pack_settings` says so before any trial starts).
"""

from __future__ import annotations

import time

import optuna

from mupsweep.config import Config, SweepParam
from mupsweep.data import ImageDataset
from mupsweep.errors import UserError
from mupsweep.packed import PER_MEMBER_KEYS, is_per_member, train_packed
from mupsweep.sweep.objective import TrialProgress
from mupsweep.train import resolve_device


def check_pack_settings(cfg: Config, params: list[SweepParam]) -> None:
    """Raise UserError unless sweep.pack is >= 1 and, when it is > 1, every swept key may
    differ within a pack and the trials' settings are ones a pack supports."""
    pack = cfg.sweep.pack
    if pack < 1:
        raise UserError(f"sweep.pack={pack} must be >= 1 (1 trains one trial at a time)")
    if pack == 1:
        return
    for p in params:
        if not is_per_member(p.name):
            raise UserError(f"sweep.pack={pack}: trials that differ in {p.name} cannot share a "
                            f"pack (its members differ only in {', '.join(PER_MEMBER_KEYS)}); "
                            "set sweep.pack=1")
    if cfg.train.compile:
        raise UserError(f"sweep.pack={pack} trains trials eagerly; set train.compile=false, or "
                        "sweep.pack=1 to compile each trial")


def pruning_note(cfg: Config, budget: int) -> str | None:
    """A warning when packs leave the pruner nothing to go on: Optuna's pruners judge a trial
    against trials that finished (Hyperband and successive halving size their rungs from the
    first; median waits for five), and the trials of the first pack all finish together. None
    when pruning is unaffected."""
    if cfg.sweep.pack > 1 and cfg.sweep.pruner != "none" and cfg.sweep.pack >= budget:
        return (f"sweep.pack={cfg.sweep.pack} packs all {budget} trials at once, so the "
                f"{cfg.sweep.pruner} pruner, which needs finished trials, prunes none; pack "
                "fewer (a third of the trials keeps most of the pruning)")
    return None


def packs_by_default(cfg: Config) -> bool:
    """Whether a command that picks sweep.pack itself (demo, validate) should pack: on a GPU,
    which one narrow proxy leaves mostly idle; not on a CPU, where a pack is at most ~1.3x
    faster per FLOP at widths 32-64 and slower than one trial at a time at width 256
    (docs/benchmarks.md)."""
    return resolve_device(cfg.train.device).type == "cuda"


def train_trials_packed(progresses: list[TrialProgress], cfg: Config,
                        dataset: ImageDataset) -> list[float | Exception]:
    """Train the trials of `progresses` together at every proxy width; return, in order, each
    one's objective value or the exception that ended it (optuna.TrialPruned for a pruned or
    diverged trial, any other Exception for a failed one). Records each trial's reason and cost
    (its share of the packs' wall time) as `objective` does."""
    outcomes: list[float | Exception | None] = [None] * len(progresses)
    wall = [0.0] * len(progresses)
    going = list(range(len(progresses)))
    for i, width in enumerate(cfg.sweep.proxy_widths):
        cfgs, on_evals, members = [], [], []
        for k in going:
            try:
                run_cfg = progresses[k].width_config(i, width)
            except Exception as e:  # the trial's own config is bad: it fails alone
                outcomes[k] = e
                continue
            cfgs.append(run_cfg)
            on_evals.append(progresses[k].on_eval(i, width, run_cfg))
            members.append(k)
        t0 = time.perf_counter()
        try:
            results = train_packed(cfgs, on_evals, dataset) if members else []
        except Exception as e:  # the pack as a whole failed (out of memory, ...): so did each
            for k in members:
                outcomes[k] = e
                wall[k] += (time.perf_counter() - t0) / len(members)
            results = []
        for k, r in zip(members, results, strict=True):
            wall[k] += r.result.wall_time_s
            if r.error is not None:  # its on_eval raised: pruned, or the study failed it
                progresses[k].flops += r.result.flops
                outcomes[k] = r.error
                continue
            try:
                progresses[k].finish_width(width, r.result)
            except optuna.TrialPruned as e:  # diverged
                outcomes[k] = e
        going = [k for k in members if outcomes[k] is None]
    for k in going:  # every width trained to its end
        outcomes[k] = progresses[k].value()
    for progress, outcome, seconds in zip(progresses, outcomes, wall, strict=True):
        if isinstance(outcome, BaseException):
            progress.failed(outcome)
        progress.close(wall_time_s=seconds)
    return outcomes  # type: ignore[return-value]
