"""Experiment: tune on proxies, transfer, and race the transferred muP run against SP.

With the tool's own functions (the same ones the CLI calls):
  1. tune on narrow proxies (default widths 32 and 64) -> best HPs, with the sweep's FLOPs
     and wall time;
  2. transfer to the target width and train it (muP);
  3. train the SP baseline at the same width with DiT's recipe (AdamW, lr 1e-4), same steps,
     same data, same batch;
  4. report the steps muP needs to reach SP's final validation loss (speed-up), the sweep cost
     as % of one target run (FLOPs and wall time), and a loss-vs-steps figure.

    python scripts/convergence.py --out runs/convergence            # ~12 min on 2 CPU cores

`--pack K` trains K trials at once as one packed model (sweep.pack). `--sweep-only` stops after
the sweep and times the target on a short run (`--target-time-steps`), enough for the tuning
cost: the sweep's FLOPs and wall time as a share of one target run's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import optuna

from mupsweep.config import compose
from mupsweep.plots import pyplot
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import tune
from mupsweep.train import train
from mupsweep.transfer import transfer


def steps_to_reach(history: list[dict], target: float) -> int | None:
    """First evaluated step whose validation loss is <= target (linear interpolation between
    evaluations, so the answer is not quantized to eval_every)."""
    prev = None
    for h in history:
        if h["validation_loss"] <= target:
            if prev is None:
                return h["step"]
            (s0, l0), (s1, l1) = prev, (h["step"], h["validation_loss"])
            return int(round(s0 + (s1 - s0) * (l0 - target) / max(l0 - l1, 1e-12)))
        prev = (h["step"], h["validation_loss"])
    return None


def tuning_cost(args: argparse.Namespace, out: Path, best: dict, sweep_wall: float,
                sweep_cpu: float) -> dict:
    """The sweep's cost against one target run of --target-steps, the target timed on a short
    run of --target-time-steps (its step rate; the FLOPs are exact)."""
    steps = args.target_time_steps
    t = transfer(best, width=args.target_width, steps=steps, overrides=[
        f"train.run_dir={out}/target-timing", f"train.eval_every={steps}", "train.resume=false",
        "train.save=false", "train.samples=0", "train.progress=false"])
    cpu0 = time.process_time()
    run = train(t.config)
    target_cpu = (time.process_time() - cpu0) * args.target_steps / steps
    target_flops = run.flops * args.target_steps / steps
    target_wall = run.wall_time_s * args.target_steps / steps
    summary = {
        "pack": args.pack, "proxy_widths": best["proxy_widths"], "trials": best["cost"],
        "sweep_flops": best["cost"]["flops"], "sweep_wall_s": sweep_wall, "sweep_cpu_s": sweep_cpu,
        "target_steps": args.target_steps, "target_flops": target_flops,
        "target_wall_s": target_wall, "target_cpu_s": target_cpu,
        "sweep_pct_of_target_flops": 100 * best["cost"]["flops"] / target_flops,
        "sweep_pct_of_target_wall": 100 * sweep_wall / target_wall,
        "sweep_pct_of_target_cpu": 100 * sweep_cpu / target_cpu,
        "proxy_gflops_per_s": best["cost"]["flops"] / sweep_wall / 1e9,
        "target_gflops_per_s": target_flops / target_wall / 1e9,
        "transferred_hparams": best["hparams"],
    }
    (out / "tuning_cost.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/convergence")
    ap.add_argument("--proxy-widths", default="32,64")
    ap.add_argument("--target-width", type=int, default=256)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--proxy-steps", type=int, default=200)
    ap.add_argument("--target-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--model", default="dit-tiny")
    ap.add_argument("--pack", type=int, default=1, help="sweep.pack: trials trained at once")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the sweep and a timing run of the target (the tuning cost)")
    ap.add_argument("--target-time-steps", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    common = [f"model={args.model}", f"data={args.data}", f"train.batch_size={args.batch_size}",
              "train.val_size=256"]

    # 1. tune on the proxies
    sweep = compose([*common, f"sweep.proxy_widths=[{args.proxy_widths}]",
                     f"sweep.n_trials={args.trials}", f"sweep.out_dir={out}/sweep", "sweep.study=convergence",
                     f"train.steps={args.proxy_steps}", f"train.eval_every={args.proxy_steps // 4}",
                     f"sweep.pack={args.pack}"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    best = study_summary(tune(sweep))
    sweep_wall, sweep_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if args.sweep_only:
        print(json.dumps(tuning_cost(args, out, best, sweep_wall, sweep_cpu), indent=2))
        return

    # 2. transfer + train muP at the target width
    eval_every = max(10, args.target_steps // 40)
    t = transfer(best, width=args.target_width, steps=args.target_steps, overrides=[
        f"train.run_dir={out}/mup", f"train.eval_every={eval_every}", "train.resume=false",
        "train.samples=20"])
    mup = train(t.config)

    # 3. the SP baseline: DiT's recipe at the same width, steps, data and batch
    sp_cfg = compose([*common, "model.parametrization=sp", "optim=dit-sp",
                      f"model.width={args.target_width}", f"train.steps={args.target_steps}",
                      f"train.eval_every={eval_every}", f"train.run_dir={out}/sp",
                      "train.resume=false", "train.samples=20"])
    sp = train(sp_cfg)

    # 4. speed-up and cost
    reach = steps_to_reach(mup.history, sp.validation_loss)
    summary = {
        "target_width": args.target_width, "target_steps": args.target_steps,
        "batch_size": args.batch_size, "proxy_widths": best["proxy_widths"],
        "transferred_hparams": best["hparams"], "proxy_best_log2_lr": math.log2(best["hparams"]["optim.lr"]),
        "sp_recipe": {"optim.lr": sp_cfg.optim.lr}, "sp_final_loss": sp.validation_loss,
        "mup_final_loss": mup.validation_loss, "mup_steps_to_sp_final": reach,
        "speedup": args.target_steps / reach if reach else None,
        "sweep_flops": best["cost"]["flops"], "target_flops": mup.flops,
        "sweep_pct_of_target_flops": 100 * best["cost"]["flops"] / mup.flops,
        "sweep_wall_s": best["cost"]["wall_time_s"], "target_wall_s": mup.wall_time_s,
        "sweep_pct_of_target_wall": 100 * best["cost"]["wall_time_s"] / mup.wall_time_s,
        "sweep_trials": best["cost"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in (("muP, transferred HPs", mup), (f"SP, DiT recipe (lr {sp_cfg.optim.lr:g})", sp)):
        ax.plot([h["step"] for h in r.history], [h["validation_loss"] for h in r.history], label=name)
    ax.axhline(sp.validation_loss, color="gray", ls=":", lw=1)
    if reach:
        ax.axvline(reach, color="gray", ls=":", lw=1)
        ax.set_title(f"width {args.target_width}: muP reaches SP's final loss at step {reach} "
                     f"({args.target_steps / reach:.1f}x)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=130)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
