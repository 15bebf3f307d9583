"""What a run draws: its training batches, from its own generators and nothing else, and the
fixed validation triples every run of a study is measured on.

Every rank of a DDP run and every member of a group draws through `draw_batch`, so a run's
batches are the same whether it trains alone, on several ranks or in a pack, and whether its
images are in memory or read from disk (`mupsweep.train_images`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mupsweep.conditioning import Conditioner, LabelConditioner
from mupsweep.config import Config
from mupsweep.data import ImageDataset
from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow
from mupsweep.parametrize import data_spec_of


@dataclass
class Batch:
    """This rank's part of one global batch as a run draws it (`draw_batch`)."""

    x0: torch.Tensor  # (B, C, H, W) images
    t: torch.Tensor  # (B,) timesteps
    noise: torch.Tensor  # (B, C, H, W)
    drop: torch.Tensor  # (B,) bool: conditioning nulled (classifier-free guidance)
    cond: dict[str, torch.Tensor]  # the model's conditioning, from the labels


def draw_indices(num_images: int, batch_size: int, gen_index: torch.Generator) -> torch.Tensor:
    """Which training images the next global batch holds: (B,) on the CPU, from gen_index."""
    return torch.randint(0, num_images, (batch_size,), generator=gen_index)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`. CUDA: through pinned memory without a wait, so the host
    runs on instead of blocking on a pageable copy every step."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def draw_batch(cfg: Config, x0: torch.Tensor, y: torch.Tensor, local: slice,
               diffusion: GaussianDiffusion | RectifiedFlow, conditioner: Conditioner,
               gen_noise: torch.Generator) -> Batch:
    """This rank's part of one global batch: its images x0 (b, C, H, W) (rows `local` of the
    batch), the labels y (B,) of the whole batch, and what gen_noise draws for the whole batch
    in this order: timesteps, noise, dropout, caption templates, flips (data.hflip). Every rank
    draws all B, so the slices of the ranks make one run's batch."""
    device, B = x0.device, y.shape[0]
    t = diffusion.sample_timesteps(B, gen_noise, device)  # (B,)
    noise = torch.randn((B, *x0.shape[1:]), generator=gen_noise, device=device)
    drop = torch.rand(B, generator=gen_noise, device=device) < cfg.model.class_dropout
    cond = conditioner(y, gen_noise)  # text models draw a caption template per sample
    if cfg.data.hflip:  # drawn last: a run without flips draws what it drew before they existed
        flip = (torch.rand(B, generator=gen_noise, device=device) < 0.5)[local]
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    return Batch(x0, t[local], noise[local], drop[local], {k: v[local] for k, v in cond.items()})


class FixedValidationSet:
    """Fixed (x0, t, noise) triples drawn once from a seeded generator, so the validation loss
    of given weights is one deterministic number, comparable across trials and widths."""

    def __init__(self, dataset: ImageDataset, diffusion: GaussianDiffusion | RectifiedFlow, size: int,
                 seed: int, device: torch.device, conditioner: Conditioner | None = None):
        g = torch.Generator().manual_seed(seed)
        n_val = dataset.val_images.shape[0]
        idx = torch.arange(size) % n_val  # cycle when asking for more triples than images
        self.x0 = dataset.val_images[idx].to(device)
        self.y = dataset.val_labels[idx].to(device)
        self.t = diffusion.sample_timesteps(size, g, torch.device("cpu")).to(device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device)
        conditioner = conditioner or LabelConditioner(data_spec_of(dataset))
        self.cond = conditioner.to(device)(self.y)  # no generator: fixed (caption template 0)
