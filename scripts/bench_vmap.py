"""Benchmark: how to run K models of one shape at once on this machine, layer by layer.

For each layer a DiT-family model uses (linear, scaled_dot_product_attention, LayerNorm, the
patch-embed conv, the label table, the muP readout) and for the whole model, forward +
backward of K members three ways:

- loop:     K separate calls, one per member (what K unpacked trials do, minus the processes);
- vmap:     `torch.func.vmap` over `functional_call` with stacked weights [K, ...] (what
            `mupsweep.group.GroupWeights` does for a pack);
- explicit: a hand-batched equivalent (bmm / einsum on [K, ...] weights, attention with the
            member dim folded into the batch dim).

Rounds interleave the three ways so machine noise hits them alike; the median of rounds is
printed, in ms per call (CPU time when torch runs one thread, OMP_NUM_THREADS=1: on a shared
machine that is what the work costs alone; else wall time), and each way's speed-up against
the loop.

    python scripts/bench_vmap.py                       # K=12, widths 32 and 64, batch 64, 16 tokens
    python scripts/bench_vmap.py --k 4 --widths 32,256 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from mupsweep.config import compose
from mupsweep.models import DataSpec
from mupsweep.models.layers import (
    Attention,
    PatchEmbed,
    attention,
    input_embedding,
    layer_norm,
    readout,
)
from mupsweep.parametrize import build_model


def clock() -> float:
    """CPU time with one thread (the time the work would take alone on a shared machine),
    wall time otherwise."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    t0 = clock()
    for _ in range(reps):
        fn()
    return (clock() - t0) / reps * 1e3


def fwd_bwd(out: torch.Tensor) -> None:
    out.float().sum().backward()  # the cheapest loss: the layer's own cost is what we time


def members(make: Callable[[], nn.Module], k: int) -> list[nn.Module]:
    mods = []
    for i in range(k):
        torch.manual_seed(i)
        mods.append(make())
    return mods


def member(x: torch.Tensor | dict, i: int) -> torch.Tensor | dict:
    return {k: v[i] for k, v in x.items()} if isinstance(x, dict) else x[i]


def vmapped(mods: list[nn.Module], inputs: tuple, in_dims: tuple | None = None) -> Callable[[], None]:
    params, buffers = stack_module_state(mods)
    base = mods[0]

    def one(p, b, *args):
        return functional_call(base, (p, b), args)

    def run() -> None:
        out = vmap(one, in_dims=(0, 0, *(in_dims or (0,) * len(inputs))))(params, buffers, *inputs)
        fwd_bwd(out)
    return run


def looped(mods: list[nn.Module], inputs: tuple, in_dims: tuple | None = None) -> Callable[[], None]:
    def run() -> None:
        for i, m in enumerate(mods):
            args = [member(x, i) if d == 0 else x
                    for x, d in zip(inputs, in_dims or (0,) * len(inputs), strict=True)]
            fwd_bwd(m(*args))
    return run


def layer_cases(k: int, width: int, batch: int, tokens: int) -> dict[str, dict[str, Callable[[], None]]]:
    """Per layer: loop / vmap / explicit forward+backward of K members."""
    x = torch.randn(k, batch, tokens, width)
    cases: dict[str, dict[str, Callable[[], None]]] = {}

    lin = members(lambda: nn.Linear(width, 4 * width), k)
    w = torch.stack([m.weight.detach() for m in lin]).requires_grad_()
    b = torch.stack([m.bias.detach() for m in lin]).requires_grad_()
    cases["linear D->4D"] = {
        "loop": looped(lin, (x,)), "vmap": vmapped(lin, (x,)),
        "explicit": lambda: fwd_bwd(torch.baddbmm(b[:, None], x.flatten(1, 2), w.transpose(1, 2)))}

    heads = width // 16
    q = torch.randn(k, batch, heads, tokens, 16, requires_grad=True)

    def sdpa_loop() -> None:
        for i in range(k):
            fwd_bwd(F.scaled_dot_product_attention(q[i], q[i], q[i]))

    def sdpa_vmap() -> None:
        fwd_bwd(vmap(lambda a: attention(a, a, a, 0.25))(q))  # members folded into the batch

    def sdpa_explicit() -> None:
        a = q.flatten(0, 1)
        fwd_bwd(F.scaled_dot_product_attention(a, a, a))

    cases["attention"] = {"loop": sdpa_loop, "vmap": sdpa_vmap, "explicit": sdpa_explicit}

    attn = members(lambda: Attention(width, 16, 0.25), k)
    cases["attention block (qkv, sdpa, proj)"] = {"loop": looped(attn, (x,)), "vmap": vmapped(attn, (x,))}

    norms = members(lambda: layer_norm(width), k)
    g = torch.stack([m.weight.detach() for m in norms]).requires_grad_()
    bb = torch.stack([m.bias.detach() for m in norms]).requires_grad_()
    cases["LayerNorm (affine)"] = {
        "loop": looped(norms, (x,)), "vmap": vmapped(norms, (x,)),
        "explicit": lambda: fwd_bwd(F.layer_norm(x, (width,), eps=1e-6) * g[:, None, None]
                                    + bb[:, None, None])}

    side = int(tokens**0.5) * 2
    img = torch.randn(k, batch, 1, side, side)
    patch = members(lambda: PatchEmbed(side, 2, 1, width), k)
    pw = torch.stack([m.proj.weight.detach() for m in patch]).requires_grad_()
    pb = torch.stack([m.proj.bias.detach() for m in patch]).requires_grad_()

    def patch_explicit() -> None:
        p = img.reshape(k, batch, 1, side // 2, 2, side // 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        p = p.reshape(k, batch * tokens, 4)
        fwd_bwd(torch.baddbmm(pb[:, None], p, pw.flatten(2).transpose(1, 2)))

    cases["patch-embed conv"] = {"loop": looped(patch, (img,)), "vmap": vmapped(patch, (img,)),
                                 "explicit": patch_explicit}

    labels = torch.randint(0, 11, (k, batch))
    tables = members(lambda: input_embedding(11, width), k)
    tw = torch.stack([m.weight.detach() for m in tables]).requires_grad_()
    offsets = torch.arange(k)[:, None] * 11
    cases["label table"] = {
        "loop": looped(tables, (labels,)), "vmap": vmapped(tables, (labels,)),
        "explicit": lambda: fwd_bwd(F.embedding(labels + offsets, tw.flatten(0, 1)))}

    def make_readout() -> nn.Module:
        r = readout(width, 4)
        r.multipliers.copy_(torch.tensor([1.0, width / 32]))
        nn.init.normal_(r.weight)
        return r

    ros = members(make_readout, k)
    rw = torch.stack([m.weight.detach() for m in ros]).requires_grad_()
    rb = torch.stack([m.bias.detach() for m in ros]).requires_grad_()
    scale = torch.full((k, 1, 1), 32 / width)
    cases["muP readout"] = {
        "loop": looped(ros, (x,)), "vmap": vmapped(ros, (x,)),
        "explicit": lambda: fwd_bwd(torch.baddbmm(rb[:, None], x.flatten(1, 2) * scale,
                                                  rw.transpose(1, 2)))}
    return cases


def model_cases(k: int, width: int, batch: int) -> dict[str, dict[str, Callable[[], None]]]:
    """The whole dit-tiny (depth 4, 8x8 inputs, patch 2: 16 tokens) forward + backward."""
    cfg = compose(["model=dit-tiny", f"model.width={width}"])
    spec = DataSpec(image_size=8, channels=1, num_classes=10)
    mods = members(lambda: build_model(cfg.model, spec), k)
    x = torch.randn(k, batch, 1, 8, 8)
    t = torch.randint(0, 1000, (k, batch))
    y = {"y": torch.randint(0, 10, (k, batch))}
    return {f"dit-tiny D={width} (depth 4)": {"loop": looped(mods, (x, t, y)),
                                               "vmap": vmapped(mods, (x, t, y))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=12, help="members")
    ap.add_argument("--widths", default="32,64")
    ap.add_argument("--batch", type=int, default=64, help="per member")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="calls per round")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args()
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        cases = {**layer_cases(args.k, width, args.batch, args.tokens),
                 **model_cases(args.k, width, args.batch)}
        for name, ways in cases.items():
            times: dict[str, list[float]] = {w: [] for w in ways}
            for _ in range(args.rounds):
                for way, fn in ways.items():
                    times[way].append(timed(fn, args.reps))
            med = {w: statistics.median(v) for w, v in times.items()}
            row = {"width": width, "layer": name, **{f"{w}_ms": round(v, 3) for w, v in med.items()},
                   **{f"{w}_speedup": round(med["loop"] / v, 2) for w, v in med.items() if w != "loop"}}
            rows.append(row)
            if not args.json:
                cols = "  ".join(f"{w} {v:7.2f} ms" + (f" ({med['loop'] / v:4.1f}x)" if w != "loop" else "")
                                 for w, v in med.items())
                print(f"D={width:<4} {name:<36} {cols}", flush=True)
    if args.json:
        print(json.dumps({"k": args.k, "batch": args.batch, "tokens": args.tokens,
                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
