"""Benchmark: a sweep packed (sweep.pack = K trials trained at once as one model) against one
trial at a time.

Sweep mode (the default; CPU): the demo's sweep (`demo.demo_sweep_config`: lr on proxies of
width 32 and 64, 300 steps, TPE + Hyperband), 12 trials whose HP sets are enqueued, the same
in every mode, with sweep.pack = 1, 4, 12. Per mode: wall time, trials/hour, the proxies'
achieved GFLOP/s (the sweep's analytic training FLOPs over its wall time), complete/pruned
counts and the best trial; and the width-256 target's GFLOP/s (the demo's transfer, a short
run), so the tuning wall-time share can be set against its FLOPs share.

    python scripts/bench_sweep.py                    # the full table (minutes on 2 cores)
    python scripts/bench_sweep.py --quick --json     # 4 trials, 60 steps, pack 1 vs 4

The JSON document holds every mode's figures, `speedup` (wall time of pack=1 over the largest
pack's) and `same_best` (every mode picked the same HP set).

Throughput mode (`--device cuda`, or `--device cpu` to try it on small sizes): K members of
one width trained as one pack against K separate processes each training one member, all at
once, at widths 256 and 1024 (depth 4, 28x28 inputs with patch 4 = 49 tokens, batch 128,
bf16 on CUDA; random images, so no data files). Every process and the pack first take a few
warm-up steps, then start together; the timed steps give member-steps/s and trials/hour
(1000-step trials), and the pack's peak GPU memory.

    python scripts/bench_sweep.py --device cuda --json       # about 4 minutes on one H100
    python scripts/bench_sweep.py --device cpu --quick --json

Needs only torch, numpy, mup, omegaconf, hydra-core and (sweep mode) optuna.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from pathlib import Path

import torch

from mupsweep.config import Config, compose
from mupsweep.data import ImageDataset
from mupsweep.util import training_flops

TRIAL_STEPS = 1000  # trials/hour in throughput mode are for trials of this many steps


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Sweep mode
# --------------------------------------------------------------------------------------------


def enqueued_lrs(n: int) -> list[float]:
    """n log2 learning rates spread evenly over the demo's range [-11, -4], in a fixed shuffled
    order (as a sampler's first draws would come; in rising order the pruner never prunes)."""
    lrs = [-11.0 + 7.0 * (i + 0.5) / n for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return [lrs[i] for i in order]


def run_sweep(out: Path, pack: int, trials: int, steps: int) -> dict:
    import optuna

    from mupsweep.demo import demo_sweep_config
    from mupsweep.sweep.study import open_study
    from mupsweep.sweep.summary import study_summary
    from mupsweep.sweep.tune import tune

    cfg = demo_sweep_config(out, trials, steps, pack=pack)
    study = open_study(cfg)
    for lr in enqueued_lrs(trials):
        study.enqueue_trial({"optim.lr:log2": lr})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0, cpu0 = time.perf_counter(), time.process_time()
    doc = study_summary(tune(cfg))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    cost = doc["cost"]
    # cpu_s: this process's CPU time. With one thread (OMP_NUM_THREADS=1) it is about the wall
    # time the sweep would take alone on the machine: on a shared machine, compare those.
    return {"pack": pack, "wall_s": wall, "cpu_s": cpu, "trials_per_hour": trials / wall * 3600,
            "flops": cost["flops"], "gflops_per_s": cost["flops"] / wall / 1e9,
            "complete": cost["n_complete"], "pruned": cost["n_pruned"], "failed": cost["n_failed"],
            "best_trial": doc["trial"], "best_value": doc["value"],
            "best_log2_lr": math.log2(doc["hparams"]["optim.lr"]), "doc": doc}


def target_rate(doc: dict, out: Path, steps: int) -> dict:
    """The width-256 target as the demo transfers it, trained `steps` steps: GFLOP/s."""
    from mupsweep.demo import TARGET_WIDTH
    from mupsweep.train import train
    from mupsweep.transfer import transfer

    result = transfer(doc, width=TARGET_WIDTH, steps=steps, overrides=[
        f"train.run_dir={out}", f"train.eval_every={steps}", "train.samples=0",
        "train.save=false", "train.resume=false", "train.progress=false"])
    cpu0 = time.process_time()
    run = train(result.config)
    cpu = time.process_time() - cpu0
    return {"width": TARGET_WIDTH, "steps": steps, "wall_s": run.wall_time_s, "cpu_s": cpu,
            "gflops_per_s": run.flops / run.wall_time_s / 1e9,
            "gflops_per_cpu_s": run.flops / cpu / 1e9, "flops_per_step": run.flops / steps}


def sweep_mode(args: argparse.Namespace) -> dict:
    trials, steps = (4, 60) if args.quick else (12, 300)
    packs = [1, trials] if args.quick else [1, 4, 12]
    modes = []
    with tempfile.TemporaryDirectory() as tmp:
        for pack in packs:
            log(f"sweep: {trials} trials, {steps} steps, pack={pack} ...")
            m = run_sweep(Path(tmp) / f"pack{pack}", pack, trials, steps)
            log(f"  {m['wall_s']:.1f} s, {m['gflops_per_s']:.1f} GFLOP/s, best trial {m['best_trial']} "
                f"(log2 lr {m['best_log2_lr']:.2f}, {m['best_value']:.4f}), "
                f"{m['complete']} complete / {m['pruned']} pruned")
            modes.append(m)
        log("target: width 256 ...")
        target = target_rate(modes[0]["doc"], Path(tmp) / "target", 20 if args.quick else 100)
    demo_target_flops = target["flops_per_step"] * 1200  # the demo trains the target 1200 steps
    for m in modes:
        m.pop("doc")
        m["gflops_per_cpu_s"] = m["flops"] / m["cpu_s"] / 1e9
        m["gflops_pct_of_target"] = 100 * m["gflops_per_s"] / target["gflops_per_s"]
        m["flops_share_pct"] = 100 * m["flops"] / demo_target_flops
        m["wall_share_pct"] = 100 * m["wall_s"] / (demo_target_flops / (target["gflops_per_s"] * 1e9))
        m["wall_share_over_flops_share"] = m["wall_share_pct"] / m["flops_share_pct"]
    unpacked, packed = modes[0], modes[-1]
    return {"mode": "sweep", "quick": args.quick, "threads": torch.get_num_threads(),
            "trials": trials, "steps": steps, "proxy_widths": [32, 64], "modes": modes,
            "target": target, "speedup": unpacked["wall_s"] / packed["wall_s"],
            "speedup_cpu_time": unpacked["cpu_s"] / packed["cpu_s"],
            "same_best": len({m["best_log2_lr"] for m in modes}) == 1}


def print_sweep_table(doc: dict) -> None:
    log(f"\n{doc['trials']} trials x widths 32+64 x {doc['steps']} steps, {doc['threads']} threads; "
        f"target width 256: {doc['target']['gflops_per_s']:.1f} GFLOP/s")
    log("| pack | wall | CPU time | trials/hour | complete / pruned | proxy GFLOP/s | % of target's | "
        "wall share / FLOPs share | best (log2 lr, loss) |")
    log("|---|---|---|---|---|---|---|---|---|")
    for m in doc["modes"]:
        log(f"| {m['pack']} | {m['wall_s']:.1f} s | {m['cpu_s']:.1f} s | {m['trials_per_hour']:.0f} | {m['complete']} / "
            f"{m['pruned']} | {m['gflops_per_s']:.1f} | {m['gflops_pct_of_target']:.0f} % | "
            f"{m['wall_share_over_flops_share']:.1f}x | #{m['best_trial']} ({m['best_log2_lr']:.2f}, "
            f"{m['best_value']:.4f}) |")
    log(f"speedup (pack {doc['modes'][-1]['pack']} vs 1): {doc['speedup']:.2f}x wall, "
        f"{doc['speedup_cpu_time']:.2f}x CPU time; "
        f"same best HP set in every mode: {doc['same_best']}")


# --------------------------------------------------------------------------------------------
# Throughput mode: one pack vs K processes
# --------------------------------------------------------------------------------------------


def member_config(args: argparse.Namespace, width: int, k: int, run_dir: str) -> Config:
    cfg = compose(["model=dit-tiny", f"model.depth={args.depth}", f"model.width={width}",
                   f"model.head_dim={args.head_dim}", f"model.patch_size={args.patch}",
                   f"train.batch_size={args.batch}", f"train.device={args.device}",
                   f"train.precision={'bf16' if args.bf16 else 'fp32'}", "train.save=false",
                   "train.resume=false", "train.progress=false", "train.samples=0",
                   f"train.run_dir={run_dir}", f"train.seed={k}", f"optim.lr={2.0 ** (-10 + k / 4)}"])
    return cfg


def random_dataset(args: argparse.Namespace) -> ImageDataset:
    """Images of the benchmark's shape from a seeded generator: no data files needed."""
    g = torch.Generator().manual_seed(0)
    n, size = 2048, args.image_size

    def images(count: int) -> torch.Tensor:
        return torch.rand(count, 1, size, size, generator=g) * 2 - 1

    return ImageDataset(images(n), torch.randint(0, 10, (n,), generator=g), images(256),
                        torch.randint(0, 10, (256,), generator=g), [str(i) for i in range(10)])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _one_process(args: argparse.Namespace, width: int, k: int, run_dir: str, barrier, results) -> None:
    """One member alone in its own process: setup + train_step of a group of one, as train() runs."""
    from mupsweep.group_setup import setup
    from mupsweep.train import train_step

    torch.set_num_threads(max(1, args.threads_per_process))
    run = setup([member_config(args, width, k, run_dir)], dataset=random_dataset(args))
    for _ in range(args.warmup):
        train_step(run)
    sync(args.device)
    barrier.wait(timeout=args.timeout)  # a process that failed breaks it: the others stop too
    start = time.time()
    for _ in range(args.steps):
        train_step(run)
    sync(args.device)
    results.put((k, start, time.time()))


def separate_processes(args: argparse.Namespace, width: int, tmp: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(args.k), ctx.Queue()
    procs = [ctx.Process(target=_one_process, args=(args, width, k, f"{tmp}/p{k}", barrier, results))
             for k in range(args.k)]
    for p in procs:
        p.start()
    spans, deadline = [], time.time() + args.timeout
    while len(spans) < len(procs) and time.time() < deadline:
        try:
            spans.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one failed (out of memory, ...): the barrier lets the others go
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.time()))
        if p.is_alive():
            p.terminate()
    if len(spans) < len(procs):
        codes = sorted({p.exitcode for p in procs})
        return {"error": f"{len(procs) - len(spans)} of {len(procs)} processes did not finish "
                         f"(exit codes {codes})"}
    wall = max(s[2] for s in spans) - min(s[1] for s in spans)
    return {"wall_s": wall, "member_steps_per_s": args.k * args.steps / wall}


def one_pack(args: argparse.Namespace, width: int, tmp: str) -> dict:
    from mupsweep.group_setup import setup
    from mupsweep.train import train_step

    # the pack gets the CPU threads the processes had together (or the machine's, if fewer)
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, args.k * args.threads_per_process)))
    cfgs = [member_config(args, width, k, f"{tmp}/m{k}") for k in range(args.k)]
    pack = setup(cfgs, random_dataset(args))
    for _ in range(args.warmup):
        train_step(pack)
    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for _ in range(args.steps):
        train_step(pack)
    sync(args.device)
    wall = time.time() - start
    pack.close()
    out = {"wall_s": wall, "member_steps_per_s": args.k * args.steps / wall}
    if args.device.startswith("cuda"):
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def model_flops_per_image(args: argparse.Namespace, width: int) -> int:
    from mupsweep.flops import config_flops_per_image
    from mupsweep.parametrize import data_spec_of

    spec = data_spec_of(random_dataset(args))
    return config_flops_per_image(member_config(args, width, 0, "unused").model, spec)


def member_memory(args: argparse.Namespace, width: int, k: int = 2) -> dict:
    """What one member of a pack holds, counted on the meta device (no memory, no time): the
    activations autograd saves for backward in a pack of k (fp32; bf16 autocast saves less),
    divided by k, and its weights, gradients and two AdamW moments (fp32)."""
    from mupsweep.batches import Batch
    from mupsweep.diffusion import make_diffusion
    from mupsweep.group import GroupWeights
    from mupsweep.parametrize import build_model, data_spec_of

    cfgs = [member_config(args, width, i, "unused") for i in range(k)]
    spec = data_spec_of(random_dataset(args))
    with torch.device("meta"):
        models = [build_model(c.model, spec, "meta") for c in cfgs]
        weights = GroupWeights(models)
        B, size = args.batch, args.image_size
        batches = [Batch(torch.empty(B, 1, size, size), torch.zeros(B, dtype=torch.long),
                         torch.empty(B, 1, size, size), torch.zeros(B, dtype=torch.bool),
                         {"y": torch.zeros(B, dtype=torch.long)}) for _ in range(k)]
    saved = [0]

    def count(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        weights.losses(weights.module, make_diffusion(cfgs[0].diffusion), batches)
    params = sum(leaf[0].numel() for leaf in weights.leaves.values())
    return {"activations_gib": saved[0] / k / 2**30, "params_m": params / 1e6,
            "weights_grads_moments_gib": 16 * params / 2**30}


def throughput_mode(args: argparse.Namespace) -> dict:
    if args.quick:  # a smoke run of the same code on small sizes
        args.widths, args.k, args.batch, args.depth, args.steps, args.warmup = "32,64", 4, 16, 2, 5, 2
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            log(f"width {width}: {args.k} separate processes ...")
            sep = separate_processes(args, width, tmp)
            log(f"width {width}: one pack of {args.k} ...")
            try:
                pk = one_pack(args, width, tmp)
            except torch.OutOfMemoryError as e:  # say where a pack stops fitting, go on
                pk = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
        memory = member_memory(args, width)
        per_member = memory["activations_gib"] + memory["weights_grads_moments_gib"]
        if args.device.startswith("cuda"):
            memory["device_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
            memory["members_that_fit_fp32_bound"] = int(memory["device_gib"] // per_member)
        row = {"width": width, "separate": sep, "packed": pk, "memory_per_member": memory}
        flops = training_flops(model_flops_per_image(args, width), args.batch)
        for how in ("separate", "packed"):
            r = row[how]
            if "error" not in r:
                r["trials_per_hour"] = r["member_steps_per_s"] * 3600 / TRIAL_STEPS
                r["tflops_per_s"] = r["member_steps_per_s"] * flops / 1e12
        if "error" not in sep and "error" not in pk:
            row["speedup"] = pk["member_steps_per_s"] / sep["member_steps_per_s"]
        log(f"  separate: {sep.get('member_steps_per_s', sep.get('error'))} member-steps/s; "
            f"packed: {pk.get('member_steps_per_s', pk.get('error'))}; speedup {row.get('speedup')}")
        rows.append(row)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    return {"mode": "throughput", "device": device, "k": args.k, "depth": args.depth,
            "image_size": args.image_size, "patch": args.patch, "batch": args.batch,
            "bf16": args.bf16, "steps": args.steps, "trial_steps": TRIAL_STEPS, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small run of the same benchmark")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ap.add_argument("--device", default=None, help="throughput mode on this device (cuda, cpu)")
    ap.add_argument("--k", type=int, default=16, help="throughput: members / processes")
    ap.add_argument("--widths", default="256,1024", help="throughput: widths")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16, help="dit-tiny's")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="throughput: timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="throughput: untimed steps first")
    ap.add_argument("--threads-per-process", type=int, default=1, help="throughput: CPU threads")
    ap.add_argument("--timeout", type=float, default=200, help="throughput: seconds per width")
    args = ap.parse_args()
    if args.device is None:
        doc = sweep_mode(args)
        print_sweep_table(doc)
    else:
        args.bf16 = args.device.startswith("cuda")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
        doc = throughput_mode(args)
    if args.json:
        print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
