"""A diffusers `AutoencoderKL` from a local directory: images -> latents (`mupsweep encode`) and
latents -> images (a latent model's sample grid, `data.vae`).

Never a download: `from_pretrained(DIR, local_files_only=True)`. A latent set written by
`encode` records the VAE's scaling factor beside it (`vae.json`), and training refuses a
`data.latent_scale` that differs from it (`recorded_latent_scale`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mupsweep.errors import UserError
from mupsweep.util import first_line

RECORD = "vae.json"  # beside an encoded latent set: {"vae", "scaling_factor", "image_size"}


def vae_config(directory: str | Path, what: str = "--vae ") -> dict:
    """The config.json of the AutoencoderKL saved in `directory`, read without its weights (a
    check before a long job), or a one-line UserError naming the directory."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserError(f"{what}{path}: not a directory (expected a diffusers AutoencoderKL "
                        "saved with save_pretrained: config.json and its weights)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what}{path}: no readable config.json (expected a diffusers "
                        f"AutoencoderKL saved with save_pretrained; {first_line(e)})") from None
    if config.get("_class_name") != "AutoencoderKL":
        raise UserError(f"{what}{path}: holds a {config.get('_class_name')}, not an AutoencoderKL")
    if not any(path.glob("diffusion_pytorch_model*")):
        raise UserError(f"{what}{path}: no weights (diffusion_pytorch_model.safetensors)")
    return config


def check_vae_for(directory: str, channels: int) -> None:
    """data.vae names a VAE whose latents have the data's channels."""
    latent_channels = vae_config(directory, "data.vae=").get("latent_channels")
    if latent_channels != channels:
        raise UserError(f"data.vae={directory}: its latents have {latent_channels} channels, the "
                        f"data {channels}; data.vae decodes the latents data.root holds")


def load_vae(directory: str | Path, device: torch.device | str = "cpu", what: str = "--vae "):
    """The AutoencoderKL saved in `directory` (its save_pretrained layout), in eval mode, or a
    one-line UserError naming the directory and what is wrong."""
    path = Path(directory).expanduser()
    vae_config(path, what)
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise UserError(f"{what.strip(' =')} needs diffusers: pip install 'mupsweep[diffusers]' "
                        f"({first_line(e)})") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{what}{path}: not a loadable AutoencoderKL "
                        f"({type(e).__name__}: {first_line(e)})") from None
    return vae.to(device).eval().requires_grad_(False)


def scaling_factor(vae) -> float:
    return float(vae.config.scaling_factor)


def recorded_latent_scale(root: Path) -> float | None:
    """The scaling factor `encode` recorded for the latent set at `root`; None if none."""
    record = (root if root.is_dir() else root.parent) / RECORD
    if not record.is_file():
        return None
    try:
        return float(json.loads(record.read_text())["scaling_factor"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{record}: not a readable record of the VAE ({first_line(e)})") from None


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) latents as the VAE gives them (unscaled):
    the mean of its posterior, so encoding a set twice gives the same files."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> (B, 3, H, W) images in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)
