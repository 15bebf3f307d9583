"""The rules of `sweep.pack`: which sweeps may pack their trials, when a command packs by
default, and when packing leaves the pruner nothing to judge.

A worker asks the study for up to sweep.pack = K trials at once (`workers.py`) and trains them
as one group (`objective.train_trials`, `train.train_group`); the members of a group of more
than one may differ only in the per-member keys (`config.per_member_keys`), so every axis of sweep.params must be one
of those (`check_pack_settings` says so before any trial starts).
"""

from __future__ import annotations

from mupsweep.config import Config, SweepConfig, SweepParam, is_per_member, per_member_keys
from mupsweep.errors import UserError
from mupsweep.group_setup import resolve_device


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
                            f"pack (its members differ only in {', '.join(per_member_keys())}); "
                            "set sweep.pack=1")
    if cfg.train.compile:
        raise UserError(f"sweep.pack={pack} trains trials eagerly; set train.compile=false, or "
                        "sweep.pack=1 to compile each trial")


def pruning_note(sweep: SweepConfig, budget: int) -> str | None:
    """A warning when packs leave the pruner nothing to go on: Optuna's pruners judge a trial
    against trials that finished (Hyperband and successive halving size their rungs from the
    first; median waits for five), and the trials of the first pack all finish together. None
    when pruning is unaffected."""
    if sweep.pack > 1 and sweep.pruner != "none" and sweep.pack >= budget:
        return (f"sweep.pack={sweep.pack} packs all {budget} trials at once, so the "
                f"{sweep.pruner} pruner, which needs finished trials, prunes none; pack "
                "fewer (a third of the trials keeps most of the pruning)")
    return None


def packs_by_default(cfg: Config) -> bool:
    """Whether a command that picks sweep.pack itself (demo, validate) should pack: on a GPU,
    which one narrow proxy leaves mostly idle; not on a CPU, where a pack is at most ~1.3x
    faster per FLOP at widths 32-64 and slower than one trial at a time at width 256
    (docs/benchmarks.md)."""
    return resolve_device(cfg.train.device).type == "cuda"
