"""`mupsweep encode`: an image folder (one sub-folder per class) -> a latent dataset of .npy
shards, through a VAE from a local directory: what `data=latents` reads, from disk, at any size.

The output directory holds `latents-00000.npy` + `labels-00000.npy`, ... (`shard_size` images
each, in the folder's sorted order), `class_names.txt` (and the folder's captions file, for
text models), the VAE's record `vae.json` (its
scaling factor: `data.latent_scale` must match it) and `encode.json` (the job). Each shard is
written atomically when finished, so an interrupted encode run again with the same arguments
keeps the finished shards and encodes the rest; another job into the same directory is
refused. Latents are the VAE posterior's mean, stored unscaled.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mupsweep.conditioning import CAPTION_FILES
from mupsweep.data import list_image_folder, read_image
from mupsweep.errors import UserError
from mupsweep.util import atomic_write, atomic_write_bytes, atomic_write_text
from mupsweep.vae import RECORD, encode_images, load_vae, scaling_factor

JOB = "encode.json"


@dataclass
class EncodeResult:
    out_dir: str
    items: int
    classes: int
    shards: int
    shards_kept: int  # finished by an earlier, interrupted run and not encoded again
    latent_shape: list[int]  # (C, H, W) of one item
    scaling_factor: float  # the VAE's: train with data.latent_scale set to it
    wall_time_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def train_args(self) -> str:
        """The overrides that train on this set."""
        return (f"data=latents data.root={self.out_dir} "
                f"data.latent_scale={self.scaling_factor:g}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)  # np.save(path) would add .npy to the temporary file's name
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _check_same_job(out_dir: Path, job: dict) -> None:
    """An output directory holding another job's shards would mix two datasets: refuse it."""
    path = out_dir / JOB
    if not path.exists():
        if any(out_dir.glob("latents*.npy")):
            raise UserError(f"{out_dir}: holds latent shards not written by mupsweep encode; "
                            "use an empty or new output directory")
        return
    try:
        earlier = json.loads(path.read_text())["job"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable ({e}); use a new output directory") from None
    differ = [k for k in job if earlier.get(k) != job[k]]
    if differ:
        raise UserError(f"{out_dir}: holds an encoding with other {', '.join(differ)} "
                        f"({', '.join(f'{k}={earlier.get(k)}' for k in differ)}); use another "
                        "output directory, or the same arguments to finish it")


def encode(image_root: str | Path, out_dir: str | Path, vae_dir: str | Path,
           image_size: int = 256, batch_size: int = 32, shard_size: int = 10_000,
           device: str = "cpu", progress: bool = True) -> EncodeResult:
    """Encode every image under image_root/<class>/ into shards in out_dir (see the module)."""
    for name, value in (("--image-size", image_size), ("--batch-size", batch_size),
                        ("--shard-size", shard_size)):
        if value < 1:
            raise UserError(f"{name}={value}: must be a positive integer")
    start = time.perf_counter()
    root, out = Path(image_root).expanduser(), Path(out_dir).expanduser()
    paths, labels, classes = list_image_folder(root, what="")
    vae = load_vae(vae_dir, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise UserError(f"--image-size={image_size}: the VAE downsamples by {factor}; "
                        f"use a multiple of {factor}")
    job = {"images": str(root.resolve()), "items": len(paths), "image_size": image_size,
           "vae": str(Path(vae_dir).expanduser().resolve()), "shard_size": shard_size}
    out.mkdir(parents=True, exist_ok=True)
    _check_same_job(out, job)
    atomic_write_text(out / JOB, json.dumps({"job": job}, indent=2) + "\n")
    atomic_write_text(out / "class_names.txt", "\n".join(classes) + "\n")
    for name in CAPTION_FILES:  # a text model reads the folder's captions beside the latents
        if (root / name).is_file():
            atomic_write_bytes(out / name, (root / name).read_bytes())
    atomic_write_text(out / RECORD, json.dumps(
        {"vae": job["vae"], "scaling_factor": scaling_factor(vae), "image_size": image_size},
        indent=2) + "\n")

    labels_arr = np.asarray(labels, dtype=np.int64)
    starts = list(range(0, len(paths), shard_size))
    kept, latent_shape = 0, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("encoding", total=len(paths))
        for k, first in enumerate(starts):
            rows = np.arange(first, min(first + shard_size, len(paths)))
            latents_path, labels_path = out / f"latents-{k:05d}.npy", out / f"labels-{k:05d}.npy"
            if latents_path.exists() and labels_path.exists():  # each written whole, at once
                kept += 1
                bar.advance(task, len(rows))
                continue
            parts = []
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                images = torch.from_numpy(np.stack([read_image(paths[j], image_size, grayscale=False)
                                                    for j in batch]))
                parts.append(encode_images(vae, images).cpu().numpy())
                bar.advance(task, len(batch))
            latents = np.concatenate(parts).astype(np.float32)
            _save_npy(latents_path, latents)
            _save_npy(labels_path, labels_arr[rows])  # last: a shard with labels is finished
    if kept == len(starts):  # every shard was there: read one for the shape
        latent_shape = list(np.load(out / "latents-00000.npy", mmap_mode="r").shape[1:])
    else:
        latent_shape = list(latents.shape[1:])
    return EncodeResult(str(out), len(paths), len(classes), len(starts), kept, latent_shape,
                        scaling_factor(vae), time.perf_counter() - start)
