"""Experiment: what does a shallow proxy cost, and does its tuning hold on a deep target?

One target (default width 256, depth 16), its HPs tuned three ways with the tool's own
functions (`tune` -> `transfer` -> `train`, as the CLI calls them):

  (a) deep-none         proxy width 32, depth 16, today's muP (the proxy keeps the depth)
  (b) shallow-completep proxy width 32, depth 2, depth_parametrization=completep (base depth 2)
  (c) shallow-none      proxy width 32, depth 2, today's muP (the control: what completep adds)

Each sweep is the same TPE search (log2 lr, init multiplier, output multiplier) with the same
trial budget and Hyperband pruning. Its analytic FLOPs and wall time are recorded; each
transferred HP set then trains the target with several seeds, and the final validation loss
(mean, seed std) is reported. Writes summary.json, summary.md and depth_transfer.png.

    python scripts/depth_transfer.py --out runs/depth_transfer              # CPU, see results.md
    python scripts/depth_transfer.py --device cuda --target-steps 3000 --seeds 0,1,2 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import optuna

from mupsweep.config import compose
from mupsweep.plots import pyplot
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import tune
from mupsweep.train import train
from mupsweep.transfer import transfer

RECIPES = {  # name: (proxy depth from --deep-depth/--shallow-depth, depth parametrization)
    "deep-none": ("deep", "none"),
    "shallow-completep": ("shallow", "completep"),
    "shallow-none": ("shallow", "none"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/depth_transfer")
    ap.add_argument("--model", default="dit-tiny")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--proxy-width", type=int, default=32)
    ap.add_argument("--deep-depth", type=int, default=16)
    ap.add_argument("--shallow-depth", type=int, default=2)
    ap.add_argument("--target-width", type=int, default=256)
    ap.add_argument("--target-depth", type=int, default=16)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--proxy-steps", type=int, default=300)
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", default="0,1", help="target seeds")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [f"model={args.model}", f"data={args.data}", f"train.batch_size={args.batch_size}",
              "train.val_size=256", f"train.device={args.device}", "train.progress=false"]
    if args.data_root:
        common.append(f"data.root={args.data_root}")

    results = {}
    for name in args.recipes.split(","):
        which, dp = RECIPES[name]
        depth = args.deep_depth if which == "deep" else args.shallow_depth
        sweep = compose([*common, f"model.depth={depth}", f"model.depth_parametrization={dp}",
                         f"sweep.proxy_widths=[{args.proxy_width}]", f"sweep.n_trials={args.trials}",
                         f"sweep.out_dir={out}/{name}/sweep", f"sweep.study={name}",
                         f"train.steps={args.proxy_steps}",
                         f"train.eval_every={max(1, args.proxy_steps // 4)}"])
        best = study_summary(tune(sweep))
        targets = []
        for seed in seeds:
            t = transfer(best, width=args.target_width, depth=args.target_depth,
                         steps=args.target_steps, overrides=[
                             f"train.run_dir={out}/{name}/target-s{seed}", f"train.seed={seed}",
                             f"train.eval_every={max(10, args.target_steps // 20)}",
                             "train.resume=false", "train.samples=0", "train.progress=false"])
            r = train(t.config)
            targets.append({"seed": seed, "final_loss": r.validation_loss, "wall_s": r.wall_time_s,
                            "flops": r.flops, "history": r.history, "diverged": r.diverged})
        losses = [t["final_loss"] for t in targets]
        results[name] = {
            "proxy_depth": depth, "depth_parametrization": dp, "hparams": best["hparams"],
            "sweep_flops": best["cost"]["flops"], "sweep_wall_s": best["cost"]["wall_time_s"],
            "sweep_trials": {k: best["cost"][k] for k in ("n_complete", "n_pruned", "n_failed")},
            "target_loss_mean": statistics.mean(losses),
            "target_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "target_flops": targets[0]["flops"], "target_wall_s": statistics.mean(t["wall_s"] for t in targets),
            "targets": targets, "transfer_warnings": t.warnings,
        }
        (out / "summary.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    write_summary(results, args, out)


def write_summary(results: dict, args, out: Path) -> None:
    deep = results.get("deep-none")
    lines = [f"target: width {args.target_width}, depth {args.target_depth}, {args.target_steps} "
             f"steps, batch {args.batch_size}, seeds {args.seeds}; proxies width {args.proxy_width}, "
             f"{args.trials} TPE trials x {args.proxy_steps} steps", "",
             "| recipe | proxy depth | sweep FLOPs | sweep wall | vs (a) FLOPs | vs (a) wall | "
             "transferred lr | init mult | output mult | target loss (mean +- seed std) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        hp = r["hparams"]
        fl = f"{deep['sweep_flops'] / r['sweep_flops']:.1f}x less" if deep else ""
        wl = f"{deep['sweep_wall_s'] / r['sweep_wall_s']:.1f}x less" if deep else ""
        lines.append(
            f"| {name} | {r['proxy_depth']} | {r['sweep_flops']:.3g} | {r['sweep_wall_s']:.0f} s | "
            f"{fl} | {wl} | 2^{_log2(hp.get('optim.lr')):.2f} | {hp.get('model.init_mult', 1):.3g} | "
            f"{hp.get('model.output_mult', 1):.3g} | {r['target_loss_mean']:.4f} +- {r['target_loss_std']:.4f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, (name, r) in zip(("C0", "C2", "C3"), results.items(), strict=False):
        for k, t in enumerate(r["targets"]):
            h = t["history"]
            ax.plot([p["step"] for p in h], [p["validation_loss"] for p in h], color=color, lw=1,
                    alpha=0.8, label=f"{name}: {r['target_loss_mean']:.4f}" if k == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("target step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"target w{args.target_width} d{args.target_depth}, HPs tuned on proxies", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "depth_transfer.png", dpi=130)


def _log2(x) -> float:
    import math

    return math.log2(x) if x else float("nan")


if __name__ == "__main__":
    main()
