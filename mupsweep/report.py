"""Pictures and tables: sample grids, coordinate-check plots, sweep plots.

matplotlib is imported inside the functions (with the Agg backend) so importing mupsweep stays
fast and never needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mupsweep.config import DiffusionConfig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, nrow: int, upscale: int = 1) -> Image.Image:
    """(B, C, H, W) in [-1, 1] -> one PIL image, `nrow` images per row, 2-pixel gaps."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    B, C, H, W = images.shape
    if C not in (1, 3):  # latents or other channel counts: show the first channel
        images, C = images[:, :1], 1
    rows = math.ceil(B / nrow)
    pad = 2
    canvas = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        canvas[y:y + H, x:x + W] = images[i].permute(1, 2, 0).numpy()
    img = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


@torch.no_grad()
def save_sample_grid(model: torch.nn.Module, diffusion, spec, n: int, cfg: DiffusionConfig,
                     path: Path, seed: int, device: torch.device,
                     class_names: list[str] | None = None) -> Path:
    """Sample n images (labels cycle through the classes) with CFG and save a PNG grid."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(n, spec.channels, spec.image_size, spec.image_size, generator=g, device=device)
    labels = torch.arange(n, device=device) % spec.num_classes
    images = diffusion.sample(model, noise, {"y": labels}, cfg_scale=cfg.cfg_scale)
    model.train(was_training)
    nrow = min(spec.num_classes, n)
    upscale = max(1, 64 // spec.image_size)
    image_grid(images, nrow=nrow, upscale=upscale).save(path)
    return path


def plot_coord_check(table, widths: list[int], path: Path, title: str) -> Path:
    """One panel per recorded step: mean |activation| vs width (log-log), a line per module."""
    plt = _pyplot()
    steps = sorted(table["step"].unique())
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, step in zip(axes, steps, strict=True):
        sub = table[table["step"] == step]
        for module, g in sub.groupby("module", sort=False):
            g = g.groupby("width")["l1"].mean()
            ax.plot(g.index, g.values, marker="o", ms=3, lw=1, label=module)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {step}")
        ax.set_xlabel("width")
    axes[0].set_ylabel("mean |activation|")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=6, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
