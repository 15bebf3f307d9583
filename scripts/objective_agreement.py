"""Experiment: does the validation loss rank trials as a sample-quality metric would?

A grid of learning rates (one trial each, no pruning) tuned with sweep.objective=sample_fd;
every trial measures the validation loss too. Prints, for the trials that finished:
the Spearman rank correlation between the two across trials, the lr each one picks and how
far apart they are (octaves), and the sample metric's cost as a share of the trial. Writes a
figure (both metrics against log2 lr) and the sample grid of each metric's best trial
(re-trained alone with the trial's config: the same seeds give the same weights).

    python scripts/objective_agreement.py --out runs/objective-agreement \\
        --figures docs/figures data=fashion_mnist model.patch_size=4 train.steps=400

Extra arguments are config overrides, applied over the defaults below.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from mupsweep.config import compose, from_dict, to_dict
from mupsweep.plots import pyplot
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import tune
from mupsweep.train import train

DEFAULTS = ["model=dit-tiny", "train.batch_size=64", "train.eval_every=400", "train.val_size=512",
            "train.progress=false", "train.samples=0", "sweep.objective=sample_fd",
            "sweep.sampler=grid", "sweep.pruner=none", "sweep.proxy_widths=[64]",
            "sweep.study=objective-agreement", "eval.samples=1000", "eval.sample_steps=25"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/objective-agreement")
    ap.add_argument("--figures", default=None, help="also copy the figures here")
    ap.add_argument("--log2-lr", default="-13:-5.5:0.5", help="LOW:HIGH:STEP of the lr grid")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    low, high, step = (float(x) for x in args.log2_lr.split(":"))
    n = int(round((high - low) / step)) + 1
    base = to_dict(compose([*DEFAULTS, f"sweep.out_dir={args.out}", f"sweep.n_trials={n}",
                            *args.overrides]))
    base["sweep"]["params"] = [{"name": "optim.lr", "type": "float", "log2": True, "low": low,
                                "high": high, "step": step}]
    cfg = from_dict(base)
    study = tune(cfg)
    doc = study_summary(study)
    width = str(cfg.sweep.proxy_widths[0])
    rows = []
    for t in doc["trials"]:
        m = (t.get("metrics") or {}).get(width)
        if t["state"] == "COMPLETE" and m:
            rows.append({"trial": t["number"], "log2_lr": math.log2(t["hparams"]["optim.lr"]),
                         "validation_loss": m["validation_loss"], "sample_fd": m["sample_fd"],
                         "eval_time_s": t["eval_time_s"], "wall_time_s": t["wall_time_s"]})
    rows.sort(key=lambda r: r["log2_lr"])
    loss = np.array([r["validation_loss"] for r in rows])
    fd = np.array([r["sample_fd"] for r in rows])
    rho = spearmanr(loss, fd).statistic
    by_loss, by_fd = rows[int(np.argmin(loss))], rows[int(np.argmin(fd))]
    share = sum(r["eval_time_s"] for r in rows) / sum(r["wall_time_s"] for r in rows)
    print(f"{len(rows)} complete trials of {len(doc['trials'])}")
    print("| log2 lr | validation loss | sample_fd |\n|---|---|---|")
    for r in rows:
        print(f"| {r['log2_lr']:g} | {r['validation_loss']:.4f} | {r['sample_fd']:.3f} |")
    print(f"Spearman rho (validation loss, sample_fd) across trials: {rho:.3f}")
    print(f"best lr by validation loss: 2^{by_loss['log2_lr']:g} (trial {by_loss['trial']}); "
          f"by sample_fd: 2^{by_fd['log2_lr']:g} (trial {by_fd['trial']}); "
          f"{abs(by_loss['log2_lr'] - by_fd['log2_lr']):g} octaves apart")
    print(f"sample_fd's cost: {share:.1%} of the trials' wall time "
          f"({sum(r['eval_time_s'] for r in rows):.0f} s of {sum(r['wall_time_s'] for r in rows):.0f} s)")
    out = Path(args.out)
    figures = [plot(rows, out / "objective_agreement.png", rho)]
    for name, best in (("validation_loss", by_loss), ("sample_fd", by_fd)):
        run_cfg = compose([*DEFAULTS, *args.overrides, f"optim.lr={2.0 ** best['log2_lr']}",
                           f"model.width={width}", "train.samples=30",
                           f"train.run_dir={out / ('best-by-' + name)}"])
        result = train(run_cfg)
        grid = out / f"samples_best_by_{name}.png"
        shutil.copy(result.samples_path, grid)
        figures.append(grid)
        print(f"samples of the best by {name}: {grid} (validation loss {result.validation_loss:.4f})")
    if args.figures:
        for f in figures:
            shutil.copy(f, Path(args.figures) / f.name)


def plot(rows: list[dict], path: Path, rho: float) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [r["log2_lr"] for r in rows]
    ax.plot(x, [r["validation_loss"] for r in rows], "o-", color="C0", label="validation loss")
    ax.set_xlabel("log2 learning rate")
    ax.set_ylabel("validation loss", color="C0")
    ax2 = ax.twinx()
    ax2.plot(x, [r["sample_fd"] for r in rows], "s-", color="C3", label="sample_fd")
    ax2.set_ylabel("sample_fd", color="C3")
    for axis, key, color in ((ax, "validation_loss", "C0"), (ax2, "sample_fd", "C3")):
        best = min(rows, key=lambda r: r[key])
        axis.plot([best["log2_lr"]], [best[key]], "*", ms=16, color=color, markeredgecolor="black")
    ax.set_title(f"one lr grid scored both ways (Spearman rho {rho:.2f}; * = best)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
