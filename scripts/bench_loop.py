"""Benchmark: steps/s of the real training loop, `train()`, evaluation left out.

Times the loop between the step-0 evaluation and the last one (`on_eval` marks both; the last
evaluation uses 8 triples, so it costs next to nothing), for a few repeats, and prints the
median. It measures what `bench_train.py` cannot: the loop's own per-step overhead (host syncs,
logging, the EMA), not only the model's forward/backward.

    python scripts/bench_loop.py                               # dit-tiny, CPU
    python scripts/bench_loop.py model.width=32 train.batch_size=8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from mupsweep.config import compose
from mupsweep.train import train


def steps_per_second(overrides: list[str], steps: int) -> float:
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["model=dit-tiny", "train.progress=false", "train.samples=0",
                       "train.save=false", "train.resume=false", "train.val_size=8",
                       f"train.steps={steps}", f"train.eval_every={steps}", f"train.run_dir={tmp}",
                       *overrides])
        train(cfg, on_eval=lambda step, values: marks.append(time.perf_counter()))
    return steps / (marks[-1] - marks[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rates = [steps_per_second(args.overrides, args.steps) for _ in range(args.repeats)]
    print(f"{statistics.median(rates):.1f} steps/s (median of {args.repeats}: "
          f"{', '.join(f'{r:.1f}' for r in rates)}) {' '.join(args.overrides)}")


if __name__ == "__main__":
    main()
