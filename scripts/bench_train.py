"""Benchmark: DiT training step time, muP vs SP at equal width, and achieved FLOP/s.

CPU (default): a few widths of the tiny preset on 28x28 inputs, fp32, against a 2048^2 fp32
matmul peak measured in the same run. GPU: `--device cuda --preset dit-xl-2 --image-size 32
--channels 4 --batch-size 32 --bf16 --compile` (ImageNet-256 latents) with MFU against the
card's dense bf16 peak. muP and SP steps are interleaved round by round so machine noise hits
both alike; the overhead is the ratio of medians.

    python scripts/bench_train.py                       # CPU table
    python scripts/bench_train.py --compile             # + torch.compile column
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mupsweep.config import compose
from mupsweep.diffusion import make_diffusion
from mupsweep.flops import config_flops_per_image
from mupsweep.models import DataSpec
from mupsweep.parametrize import build_model, make_optimizer
from mupsweep.util import training_flops

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def make_step(overrides: list[str], spec: DataSpec, batch: int, device: torch.device,
              bf16: bool, compile_model: bool):
    """One training step of the real model/optimizer/loss (same code path as train.py)."""
    cfg = compose(overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, spec, device)
    opt = make_optimizer(model, cfg.model, cfg.optim)
    fwd = torch.compile(model) if compile_model else model
    diffusion = make_diffusion(cfg.diffusion)
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, spec.channels, spec.image_size, spec.image_size, device=device)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)

    def step() -> None:
        t = diffusion.sample_timesteps(batch, g, device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.loss(fwd, x0, t, noise, {"y": y}).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = training_flops(config_flops_per_image(cfg.model, spec), batch)
    params = sum(p.numel() for p in model.parameters())
    return step, flops, params


def time_pair(steps: dict, device: torch.device, warmup: int, rounds: int, per_round: int) -> dict:
    """Interleave the variants round by round; median seconds per step for each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="dit-tiny")
    ap.add_argument("--widths", default="64,128,256", help="comma list; ignored for paper presets")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (muP)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    spec = DataSpec(args.image_size, args.channels, num_classes=1000 if device.type == "cuda" else 10)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak(device, dtype, n=8192 if device.type == "cuda" else 2048)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec_peak = next((v for k, v in GPU_PEAKS.items() if k in card), None)
    print(f"# device {card}, threads {torch.get_num_threads()}, {'bf16' if args.bf16 else 'fp32'}; "
          f"measured matmul peak {peak / 1e9:,.0f} GFLOP/s"
          + (f"; datasheet bf16 peak {spec_peak / 1e12:.0f} TFLOP/s" if spec_peak else ""))

    paper = args.preset != "dit-tiny"
    widths = [None] if paper else [int(w) for w in args.widths.split(",")]
    rows = []
    for width in widths:
        base = [f"model={args.preset}", f"model.patch_size={args.patch_size}"]
        if width:
            base.append(f"model.width={width}")
        steps, flops, params = {}, 0, 0
        for par in ("mup", "sp"):
            steps[par], flops, params = make_step(base + [f"model.parametrization={par}"], spec,
                                                  args.batch_size, device, args.bf16, False)
        if args.compile:
            steps["mup+compile"], _, _ = make_step(base + ["model.parametrization=mup"], spec,
                                                   args.batch_size, device, args.bf16, True)
        t = time_pair(steps, device, args.warmup, args.rounds, args.per_round)
        row = {"model": args.preset + (f" D={width}" if width else ""), "params_M": params / 1e6,
               "batch": args.batch_size, "mup_ms": t["mup"] * 1e3, "sp_ms": t["sp"] * 1e3,
               "mup_overhead_pct": 100 * (t["mup"] / t["sp"] - 1),
               "mup_gflops": flops / t["mup"] / 1e9, "pct_of_matmul_peak": 100 * flops / t["mup"] / peak}
        if spec_peak:
            row["mfu_pct"] = 100 * flops / t["mup"] / spec_peak
        if args.compile:
            row["compile_ms"] = t["mup+compile"] * 1e3
            row["compile_speedup"] = t["mup"] / t["mup+compile"]
            if spec_peak:
                row["mfu_compile_pct"] = 100 * flops / t["mup+compile"] / spec_peak
        rows.append(row)

    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
