"""The main job on the built-in digits: the whole workflow in one call, under ~10 minutes on
2 CPU cores.

    coord-check (muP passes, SP fails) -> tune on two narrow proxies -> transfer to a 4-8x wider
    model -> train it -> report (lr-vs-loss per width, optimization history, samples, cost)

Everything lands in one directory; re-running resumes the study and the training run (the
target run checkpoints six times). Ctrl-C or SIGTERM stops it as `tune` stops (running trials
re-queued) and raises `Interrupted`, whose str() says the stage, what was kept and how to go on.
`QUICK` is the same job shrunk for a first look in about a minute (`mupsweep demo --quick`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mupsweep.config import Config, SweepParam, compose
from mupsweep.coordcheck import coord_check
from mupsweep.errors import UserError
from mupsweep.report import write_report
from mupsweep.stopping import Interrupted, stop_signals
from mupsweep.sweep.packing import packs_by_default
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import RESUME, tune
from mupsweep.train import train
from mupsweep.transfer import transfer, write_config

PROXY_WIDTHS = [32, 64]
TARGET_WIDTH = 256
PACK = 12  # trials trained at once on a GPU (sweep.pack); scripts/bench_sweep.py measures it
# `demo --quick`: fewer and shorter trials, a 4x (not 8x) wider target, trained just long
# enough that its samples are digits (measured: 200 steps gave noise, 600 recognisable digits,
# validation loss 0.114; about a minute in all on 2 cores)
QUICK = {"n_trials": 6, "proxy_steps": 60, "target_steps": 600, "target_width": 128}
# The demo's targets are short; the tuning cost's share of a target falls in proportion to its
# steps, so the last line also says it for a run of realistic length (a short one: DiT-XL/2
# trains 400K to 7M steps).
REALISTIC_TARGET_STEPS = 100_000


def demo_sweep_config(out_dir: Path, n_trials: int = 12, proxy_steps: int = 300,
                      pack: int | None = None) -> Config:
    """The demo's sweep: lr on proxies of width 32 and 64, TPE + Hyperband. `pack` trials train
    at once; default: on a GPU, PACK (or every trial when fewer), on a CPU one at a time
    (`sweep.packing.packs_by_default`)."""
    cfg = compose([
        f"sweep.proxy_widths=[{','.join(map(str, PROXY_WIDTHS))}]", f"sweep.n_trials={n_trials}",
        f"sweep.out_dir={out_dir}", "sweep.study=demo", f"train.steps={proxy_steps}",
        f"train.eval_every={max(1, proxy_steps // 3)}", "train.val_size=256",
    ])
    if pack is None:
        pack = min(PACK, n_trials) if packs_by_default(cfg) else 1
    cfg.sweep.pack = pack
    # The demo sweeps lr alone, so the lr-vs-loss picture per width is a clean curve; a real
    # sweep adds the init and output multipliers (the default search space).
    cfg.sweep.params = [SweepParam(name="optim.lr", type="float", low=-11.0, high=-4.0, log2=True)]
    return cfg


def run_demo(out_dir: Path, n_trials: int = 12, proxy_steps: int = 300, target_steps: int = 1200,
             console: Console | None = None, target_width: int = TARGET_WIDTH) -> dict:
    """Run every stage; return a summary (each stage's key numbers and file paths).

    Ctrl-C or SIGTERM: raises Interrupted (a KeyboardInterrupt) whose str() is one line
    naming the stage, what out_dir keeps and how to go on."""
    for name, value in (("--trials", n_trials), ("proxy_steps", proxy_steps),
                        ("target_steps", target_steps)):
        if value < 1:  # refused now, not after the coordinate check has run
            raise UserError(f"{name}={value}: give at least 1")
    console = console or Console(stderr=True)
    stage: list[int] = [0]  # the stage running now, for the line an interrupt prints
    with stop_signals():
        try:
            return _run_stages(out_dir, n_trials, proxy_steps, target_steps, console, target_width,
                               stage)
        except KeyboardInterrupt as e:
            raise Interrupted.of(e, interrupted_line(e, stage[0], out_dir)) from None


def interrupted_line(e: BaseException, stage: int, out_dir: Path) -> str:
    """What the demo keeps when interrupted in `stage` (1-4; 0 before the first), in one line."""
    kept = {
        0: "nothing ran yet",
        1: "the coordinate check runs again (it is short)",
        2: f"the study in {out_dir / 'sweep'} keeps its finished trials (best.json, trials.csv); "
           "the running ones are queued again",
        3: f"the sweep is done; the target run in {out_dir / 'target'} continues from its last "
           "checkpoint",
        4: "every stage but the report is done",
    }[stage]
    where = f" in stage {stage}/4 ({STAGES[stage - 1]})" if stage else ""
    return f"interrupted{Interrupted.of(e, '').by}{where}: {kept}; {RESUME}"


STAGES = ("coordinate check", "tune", "transfer and train", "report")


def _run_stages(out_dir: Path, n_trials: int, proxy_steps: int, target_steps: int,
                console: Console, target_width: int, stage: list[int]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out_dir": str(out_dir)}

    stage[0] = 1
    console.rule("1/4 coordinate check")
    for par in ("mup", "sp"):
        cfg = compose([f"model.parametrization={par}", f"coord.out_dir={out_dir}/coord_check"])
        r = coord_check(cfg, out_dir=cfg.coord.out_dir)
        verdict = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
        console.print(f"{par}: {verdict} (max |slope| {r.max_abs_slope:.2f} at {r.worst}) "
                      f"-> {r.plot_path}", highlight=False, soft_wrap=True)
        summary[f"coord_check_{par}"] = {"passed": r.passed, "max_abs_slope": r.max_abs_slope,
                                         "plot": r.plot_path}

    stage[0] = 2
    console.rule(f"2/4 tune: {n_trials} trials at proxy widths {PROXY_WIDTHS}")
    sweep_cfg = demo_sweep_config(out_dir / "sweep", n_trials, proxy_steps)
    best = study_summary(tune(sweep_cfg))
    summary["tune"] = {k: best[k] for k in ("value", "trial", "hparams", "cost")}

    stage[0] = 3
    console.rule(f"3/4 transfer to width {target_width} and train")
    result = transfer(best, width=target_width, steps=target_steps, overrides=[
        # resume: re-running the demo continues (or just reports) its target run
        f"train.run_dir={out_dir}/target", "train.resume=true", f"train.eval_every={max(1, target_steps // 6)}",
        f"train.ckpt_every={max(1, target_steps // 6)}",  # an interrupted demo continues from there
        "train.ema_decay=0.99", "train.samples=30", "train.progress=true"])
    for w in result.warnings:
        console.print(f"warning: {w}", highlight=False, soft_wrap=True)
    console.print(result.cost_line, highlight=False, soft_wrap=True)
    target_yaml = write_config(result.config, out_dir / "target.yaml")
    run = train(result.config)
    console.print(f"target: validation loss {run.initial_validation_loss:.4f} -> "
                  f"{run.validation_loss:.4f} in {run.steps} steps ({run.wall_time_s:.0f} s); "
                  f"samples {run.samples_path}", highlight=False, soft_wrap=True)
    summary["target"] = {"config": target_yaml, "width": result.config.model.width,
                         "validation_loss": run.validation_loss,
                         "steps": run.steps, "wall_time_s": run.wall_time_s, "flops": run.flops,
                         "samples": run.samples_path}
    summary["tuning_cost_pct_of_target_flops"] = 100 * best["cost"]["flops"] / max(run.flops, 1.0)
    summary["tuning_cost_pct_at_realistic_length"] = (
        summary["tuning_cost_pct_of_target_flops"] * run.steps / REALISTIC_TARGET_STEPS)

    stage[0] = 4
    console.rule("4/4 report")
    report = write_report(best, out_dir / "report")
    summary["report"] = str(report)
    console.print(f"report {report}; tuning cost {summary['tuning_cost_pct_of_target_flops']:.1f} % "
                  f"of this {run.steps}-step target run's FLOPs, "
                  f"{summary['tuning_cost_pct_at_realistic_length']:.2g} % of a "
                  f"{REALISTIC_TARGET_STEPS:,}-step run of the same model (the share falls in "
                  "proportion to the target's steps; DiT-XL/2 trains 400K to 7M)",
                  highlight=False, soft_wrap=True)
    return summary
