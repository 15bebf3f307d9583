"""Sample grids: images from a model, drawn with classifier-free guidance, saved as one PNG.

The training loop writes one at the end of a run (`train.samples`); kept apart from
`mupsweep.report`, which is a command module above the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mupsweep.config import DiffusionConfig
from mupsweep.util import atomic_write

if TYPE_CHECKING:  # for the hints only: importing the models would load every architecture
    from PIL import Image

    from mupsweep.conditioning import Conditioner
    from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow
    from mupsweep.models import DataSpec


def image_grid(images: torch.Tensor, nrow: int, upscale: int = 1) -> Image.Image:
    """(B, C, H, W) in [-1, 1] -> one PIL image, `nrow` images per row, 2-pixel gaps."""
    from PIL import Image  # here, not above: the training loop imports this module, and a
    # run that draws no samples (a GPU benchmark, a sweep trial) need not have Pillow
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
def save_sample_grid(model: torch.nn.Module, diffusion: GaussianDiffusion | RectifiedFlow,
                     spec: DataSpec, n: int, cfg: DiffusionConfig, path: Path, seed: int,
                     device: torch.device, class_names: list[str] | None = None,
                     conditioner: Conditioner | None = None,
                     decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Sample n images (labels cycle through the classes) with CFG and save a PNG grid.
    `conditioner` (mupsweep.conditioning) turns the labels into the model's cond dict (text models:
    each class's first caption); None: {"y": labels}. `decode` turns latents into images (a
    VAE); without it, latents are shown as their first channel, and the grid's title says so."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(n, spec.channels, spec.image_size, spec.image_size, generator=g, device=device)
    labels = torch.arange(n, device=device) % spec.num_classes
    cond = conditioner(labels) if conditioner is not None else {"y": labels}
    images = diffusion.sample(model, noise, cond, cfg_scale=cfg.cfg_scale)
    model.train(was_training)
    if decode is not None:
        images = decode(images)
    nrow = min(spec.num_classes, n)
    upscale = max(1, 64 // images.shape[-1])
    grid = image_grid(images, nrow=nrow, upscale=upscale)
    if class_names:  # column c holds class c: name it above the column
        grid = label_columns(grid, [class_names[c] for c in range(nrow)])
    if images.shape[1] not in (1, 3):
        grid = title(grid, raw_latents_note(images.shape[1]))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def raw_latents_note(channels: int) -> str:
    return f"raw latents: channel 0 of {channels} (data.vae=DIR decodes them)"


def title(grid: Image.Image, text: str) -> Image.Image:
    """The grid with a white strip on top holding `text` (cut to fit)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    out = Image.new(grid.mode, (grid.width, grid.height + 14), 255 if grid.mode == "L" else (255, 255, 255))
    out.paste(grid, (0, 14))
    draw = ImageDraw.Draw(out)
    while text and draw.textlength(text, font=font) > grid.width - 4:
        text = text[:-1]
    draw.text((2, 1), text, fill=0 if grid.mode == "L" else (0, 0, 0), font=font)
    return out


def label_columns(grid: Image.Image, names: list[str]) -> Image.Image:
    """The grid with a white strip on top naming each of its len(names) columns (a name cut
    to fit its column)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    strip = 14
    out = Image.new(grid.mode, (grid.width, grid.height + strip), 255 if grid.mode == "L" else (255, 255, 255))
    out.paste(grid, (0, strip))
    draw = ImageDraw.Draw(out)
    col = grid.width / len(names)
    for i, name in enumerate(names):
        text = str(name)
        while text and draw.textlength(text, font=font) > col - 2:
            text = text[:-1]
        x = i * col + (col - draw.textlength(text, font=font)) / 2
        draw.text((x, 1), text, fill=0 if grid.mode == "L" else (0, 0, 0), font=font)
    return out
