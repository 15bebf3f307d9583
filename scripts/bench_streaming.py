"""Benchmark: data left on disk (`data.stream=always`).

1. Memory: the peak resident memory of a training process (and of its loader workers) on a
   latent set of each size, against the same run with the set held in memory (the smallest
   size only: a larger one may not fit). The latents are random: only their size matters.
2. Speed: samples/s the loader delivers (`train_images.StreamedImages` alone, as training
   draws them) against samples/s a model trains, for one model on latents (DiT-B/2 by default:
   on a CPU it is the model that is slow; on a GPU both numbers mean more).

    python scripts/bench_streaming.py --sizes-gb 0.5,4,20 --dir /tmp/bench-latents
    python scripts/bench_streaming.py --skip-memory --model dit-b-2 --batch-size 8

Files are written once into --dir and reused by a later run (delete them yourself).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ITEM_SHAPE = (4, 32, 32)  # ImageNet-256 through SD's VAE
ITEM_BYTES = 4 * int(np.prod(ITEM_SHAPE))

PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    from mupsweep.config import compose
    from mupsweep.train import train
    train(compose(sys.argv[1:]))
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a process
    # started by a big parent would report the parent's peak
    status = open("/proc/self/status").read()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    print(json.dumps({
        "trainer_mb": peak_kb / 1024,
        "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
""")


def latent_set(root: Path, size_gb: float) -> Path:
    """A directory with one latents.npy of about size_gb (written in chunks, once) + labels."""
    n = int(size_gb * 2**30 / ITEM_BYTES)
    folder = root / f"{size_gb:g}gb"
    if (folder / "labels.npy").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    latents = np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=np.float32,
                                        shape=(n, *ITEM_SHAPE))
    rng, chunk = np.random.default_rng(0), 8192
    for i in range(0, n, chunk):
        rows = min(chunk, n - i)
        latents[i:i + rows] = rng.standard_normal((rows, *ITEM_SHAPE), dtype=np.float32)
    latents.flush()
    del latents
    np.save(folder / "labels.npy", np.arange(n) % 1000)
    return folder


def peak_rss(folder: Path, stream: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["model=dit-tiny", "model.patch_size=4", "train.progress=false",
                     "train.samples=0", "train.save=false", f"train.steps={steps}",
                     f"train.eval_every={steps}", "train.batch_size=32", "train.val_size=64",
                     "data.name=latents", f"data.root={folder}", f"data.stream={stream}",
                     f"train.run_dir={run_dir}/run"]
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *overrides], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_samples_per_s(folder: Path, batch_size: int, workers: int, steps: int) -> float:
    import torch

    from mupsweep.config import compose
    from mupsweep.data import load_dataset
    from mupsweep.train_images import StreamedImages

    cfg = compose(["data.name=latents", f"data.root={folder}", "data.stream=always"])
    images = load_dataset(cfg.data).train_images
    gen = torch.Generator().manual_seed(0)
    loader = StreamedImages(images, [gen], batch_size, slice(0, batch_size), workers,
                            torch.device("cpu"))
    from mupsweep.batches import draw_indices

    loader.rows(draw_indices(len(images), batch_size, gen)[None], [0])  # workers started
    start = time.perf_counter()
    for _ in range(steps):
        loader.rows(draw_indices(len(images), batch_size, gen)[None], [0])
    elapsed = time.perf_counter() - start
    loader.close()
    return steps * batch_size / elapsed


def train_samples_per_s(folder: Path, model: str, batch_size: int, steps: int) -> float:
    from mupsweep.config import compose
    from mupsweep.train import train

    marks: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose([f"model={model}", "train.progress=false", "train.samples=0",
                       "train.save=false", f"train.steps={steps}", f"train.eval_every={steps}",
                       f"train.batch_size={batch_size}", "train.val_size=8",
                       "data.name=latents", f"data.root={folder}", "data.stream=always",
                       f"train.run_dir={run_dir}/run"])
        train(cfg, on_eval=lambda step, values: marks.append(time.perf_counter()))
    return steps * batch_size / (marks[-1] - marks[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/bench-latents", help="where the latent files go")
    ap.add_argument("--sizes-gb", default="0.5,4,20")
    ap.add_argument("--steps", type=int, default=200, help="training steps of each memory run")
    ap.add_argument("--model", default="dit-b-2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps of --model")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    sizes = [float(s) for s in args.sizes_gb.split(",")]

    if not args.skip_memory:
        print("| latent set | items | streamed: trainer peak RSS | streamed: worker peak RSS "
              "| in memory: trainer peak RSS |")
        print("|---|---|---|---|---|")
        for size in sizes:
            folder = latent_set(root, size)
            n = (folder / "latents.npy").stat().st_size // ITEM_BYTES
            streamed = peak_rss(folder, "always", args.steps)
            held = peak_rss(folder, "never", args.steps) if size == min(sizes) else None
            held_text = f"{held['trainer_mb']:.0f} MB" if held else "not run"
            print(f"| {size:g} GB | {n} | {streamed['trainer_mb']:.0f} MB | "
                  f"{streamed['workers_mb']:.0f} MB | {held_text} |", flush=True)

    folder = latent_set(root, min(sizes))
    loader = loader_samples_per_s(folder, args.batch_size, args.workers, steps=200)
    trained = train_samples_per_s(folder, args.model, args.batch_size, steps=args.train_steps)
    print(f"\n| {args.model}, batch {args.batch_size} | samples/s |")
    print("|---|---|")
    print(f"| loader ({args.workers} workers) | {loader:.0f} |")
    print(f"| training | {trained:.1f} |")
    print(f"| loader / training | {loader / trained:.0f}x |")


if __name__ == "__main__":
    main()
