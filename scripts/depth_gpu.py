"""GPU experiment: does the best lr stay put from depth 4 to 28? `validate --depths` on one GPU.

The same grid as `mupsweep validate --depths 4,8,16,28` (lr x seed at each depth, width
fixed, depth_parametrization none vs completep, base depth = the smallest depth), with every
study's trials run at once: small models leave a GPU idle between kernel launches, so many
worker processes share it (all of them write one journal storage). Then `validate`
reads the finished studies back and draws the figure and the table. Re-running resumes.

    python scripts/depth_gpu.py --out runs/depth_gpu                      # one H100: ~4 min (*)
    python scripts/depth_gpu.py --device cpu --data digits --width 32 --depths 2,4 --steps 4 \\
        --log2-lr=-10:-8 --seeds 0 --workers-per-study 1 --out /tmp/depth_gpu   # CPU smoke test

Fashion-MNIST is read from --data-root (default: Debian's dataset-fashion-mnist folder).
`--report-only` draws the figure and table from whatever the storage holds (no training): for a
run that was cut off, with the grid points it finished.

(*) Sized from one H100 run (500 steps, lr 2^-10..2^-4, 2 seeds, 2 workers per study: 112
trials in 8.7 min, about 100 trial-steps per second over all workers); the defaults (6 lrs,
1 seed, 1 worker per study: 48 trials) are about 40 % of that work, not yet timed themselves.

One worker per study by default: with two, Optuna's GridSampler can hand both workers the same
grid point (seen on the H100: duplicated points, holes elsewhere).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import optuna
import pandas as pd

from mupsweep.config import compose, from_dict, to_dict
from mupsweep.sweep.storage import open_for_reading, storage_spec
from mupsweep.sweep.study import open_study
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.workers import run_worker
from mupsweep.validate import (
    DEPTH,
    depth_grid_config,
    judge,
    loss_table,
    plot_validation,
    validate,
    validation_markdown,
)


def _worker(cfg_dict: dict, worker: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_worker(from_dict(cfg_dict), worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/depth_gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="dit-tiny")
    ap.add_argument("--data", default="fashion_mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--patch-size", type=int, default=None, help="default: 4 on fashion_mnist, else the preset's")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depths", default="4,8,16,28")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--log2-lr", default="-9:-4", help="LOW:HIGH, step 1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workers-per-study", type=int, default=1)
    ap.add_argument("--report-only", action="store_true", help="no training: report what the storage holds")
    ap.add_argument("--storage", default=None, help="default: OUT/depth.journal")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()

    patch = args.patch_size or (4 if args.data == "fashion_mnist" else None)
    overrides = [f"model={args.model}", f"model.width={args.width}", f"data={args.data}",
                 f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                 f"train.eval_every={max(1, args.steps // 4)}", "train.val_size=512",
                 f"train.device={args.device}", "train.progress=false",
                 f"sweep.out_dir={out}",
                 f"sweep.storage={args.storage or f'{out.resolve()}/depth.journal'}",
                 "sweep.study=depth-gpu"]
    if patch:
        overrides.append(f"model.patch_size={patch}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = compose(overrides)
    depths = [int(d) for d in args.depths.split(",")]
    lo, hi = (float(x) for x in args.log2_lr.split(":"))
    grid = [lo + k for k in range(int(hi - lo) + 1)]
    seeds = [int(s) for s in args.seeds.split(",")]
    shapes = [(args.width, d) for d in depths]

    # 1. every study's trials at once, deepest first (they take longest)
    configs = [depth_grid_config(cfg, par, w, d, min(depths), grid, seeds, out)
               for w, d in reversed(shapes) for par in ("none", "completep")]
    if args.report_only:
        report_partial(configs, out)
        return
    for c in configs:
        open_study(c)  # created once, before the workers race for it
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(to_dict(c), k))
             for c in configs for k in range(args.workers_per_study)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    train_s = time.perf_counter() - t0

    # 2. read the finished studies back: figure, table, verdicts
    result = validate(cfg, [w for w, _ in shapes], grid, seeds, workers=1, out_dir=str(out),
                      depths=depths)
    summary = {"args": vars(args), "train_wall_s": train_s,
               "total_wall_s": time.perf_counter() - t0, "failed_workers": failed,
               **result.summary()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(Path(result.table_md).read_text())
    print(f"{len(procs)} workers, {train_s:.0f} s of training, {summary['total_wall_s']:.0f} s in all; "
          f"figure {result.figure}")


def report_partial(configs: list, out: Path) -> None:
    """Figure and table from the trials each study finished, without training the rest."""
    verdicts = {}
    for par in ("none", "completep"):
        tables = []
        for c in sorted((c for c in configs if c.model.depth_parametrization == par),
                        key=lambda c: c.model.depth):
            study = optuna.load_study(study_name=c.sweep.study,
                                      storage=open_for_reading(storage_spec(c)))
            doc = study_summary(study)  # trials that finished; not the ones a kill cut off
            doc["trials"] = [t for t in doc["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
            table = loss_table(doc).assign(depth=c.model.depth)
            table = table.drop_duplicates(["log2_lr", "seed"])  # a grid point run twice
            tables.append(table)
        verdicts[par] = judge(pd.concat(tables, ignore_index=True), par, DEPTH)
        verdicts[par].table.to_csv(out / f"validate_depth_{par}.csv", index=False)
    plot_validation(verdicts, out / "validate_depth.png")
    md = validation_markdown(verdicts, min(c.model.depth for c in configs))
    (out / "validate_depth.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
