"""Count the operations of one training step (forward, backward, AdamW) with torch's profiler.

Speed on a shared machine is noisy; the list of operations a step runs is not. Two checkouts
that run the same operations the same number of times do the same work:

    PYTHONPATH=OLD_CHECKOUT python scripts/op_count.py --json /tmp/old.json
    PYTHONPATH=NEW_CHECKOUT python scripts/op_count.py --json /tmp/new.json --compare /tmp/old.json
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

from mupsweep.config import compose
from mupsweep.diffusion import make_diffusion
from mupsweep.models import DataSpec
from mupsweep.parametrize import build_model, make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides (default model=dit-tiny)")
    ap.add_argument("--json", help="write {op name: count} here")
    ap.add_argument("--compare", help="a --json file from another checkout to compare with")
    args = ap.parse_args()
    cfg = compose(["model=dit-tiny", *args.overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, DataSpec(image_size=8, channels=1, num_classes=10))
    opt, diffusion = make_optimizer(model, cfg.model, cfg.optim), make_diffusion(cfg.diffusion)
    x0, noise = torch.randn(64, 1, 8, 8), torch.randn(64, 1, 8, 8)
    t, y = torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))

    def step() -> None:
        diffusion.loss(model, x0, t, noise, {"y": y}).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step allocates Adam's state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = dict(collections.Counter(e.name for e in prof.events()))
    print(f"{sum(counts.values())} operations, {len(counts)} kinds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        diff = {k: (other.get(k), counts.get(k)) for k in set(other) | set(counts)
                if other.get(k) != counts.get(k)}
        print("identical" if not diff else f"different: {diff}")


if __name__ == "__main__":
    main()
