"""Sample quality: the Frechet distance between generated samples and held-out data in a feature
space (Heusel et al. 2017), in two feature spaces.

- `FeatureNet`: a small classifier mupsweep trains once on a dataset's training split and
  caches, keyed by the dataset and its split. Its 64 penultimate features give `sample_fd`,
  which needs no download and works on any data mupsweep trains on (pixels or latents). Its
  values compare within one dataset and cache key only, as FID values compare only under one
  Inception network.
- FID's Inception-v3 (torch-fidelity's `FeatureExtractorInceptionV3`, the network of the
  standard FID), from a weights file the user names; nothing is downloaded.

The statistics are the usual ones: each side's feature mean and covariance, and
d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the matrix square root by scipy.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from mupsweep.data import ImageDataset, LazyImages
from mupsweep.errors import UserError
from mupsweep.util import atomic_write, first_line

FEATURE_DIM = 64  # FeatureNet's features: a covariance needs more items than this on each side
INCEPTION_DIM = 2048  # FID's pool3 features
# How FeatureNet is trained: part of its cache key, so a change here trains a new one.
FEATURE_NET_VERSION = 1
FEATURE_NET_STEPS = 600
FEATURE_NET_BATCH = 128
FEATURE_NET_LR = 2e-3
MAX_REFERENCE = 10_000  # held-out items in the reference statistics (the validation split's first)
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


# --------------------------------------------------------------------------------------------
# The Frechet distance
# --------------------------------------------------------------------------------------------


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (n, d) features, in float64."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2). A product whose square
    root is singular gets a small diagonal offset first, as FID's reference code does."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled below, not printed
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # an imaginary part of rounding size only
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------------
# sample_fd's features: a classifier trained on the training split
# --------------------------------------------------------------------------------------------


class FeatureNet(nn.Module):
    """Three 3x3 convolutions (the last two stride 2), global average pooling to FEATURE_DIM
    features, and a linear classifier trained on them."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, FEATURE_DIM, 3, stride=2, padding=1), nn.GroupNorm(8, FEATURE_DIM), nn.SiLU(),
            nn.Conv2d(FEATURE_DIM, FEATURE_DIM, 3, stride=2, padding=1), nn.GroupNorm(8, FEATURE_DIM),
            nn.SiLU())
        self.classify = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (N, C, H, W) -> (N, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))  # (N, num_classes) logits


def feature_net_key(data_identity: dict[str, Any], dataset: ImageDataset) -> str:
    """What a cached FeatureNet was trained on: the data keys that choose the items and their
    split (`data_identity`), the shapes, and how it was trained."""
    identity = [FEATURE_NET_VERSION, FEATURE_NET_STEPS, FEATURE_NET_BATCH, FEATURE_NET_LR,
                data_identity, list(dataset.train_images.shape), list(dataset.val_images.shape),
                dataset.class_names]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _rows(images: torch.Tensor | LazyImages, positions: np.ndarray) -> torch.Tensor:
    return images[torch.from_numpy(positions)] if isinstance(images, torch.Tensor) else images[positions]


def _in_chunks(images: torch.Tensor | LazyImages, n: int, size: int = 256):
    """(start, the images start..start + size) over the first n."""
    for start in range(0, n, size):
        yield start, _rows(images, np.arange(start, min(n, start + size)))


@torch.no_grad()
def features_of(extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                device: torch.device, size: int = 256) -> np.ndarray:
    """(n, d) float64 features of (n, C, H, W) images, `size` at a time."""
    out = [extract(images[i:i + size].to(device)).double().cpu() for i in range(0, len(images), size)]
    return torch.cat(out).numpy()


def train_feature_net(dataset: ImageDataset, device: torch.device) -> tuple[FeatureNet, float]:
    """Train a FeatureNet on the training split, seeded (the same data gives the same net on
    one device); returns it in eval mode and its accuracy on the validation split."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        torch.manual_seed(0)
        net = FeatureNet(dataset.channels, dataset.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=FEATURE_NET_LR)
    n = len(dataset.train_labels)
    for _ in range(FEATURE_NET_STEPS):
        idx = torch.randint(n, (min(FEATURE_NET_BATCH, n),), generator=g).numpy()
        x = _rows(dataset.train_images, idx).to(device)
        y = dataset.train_labels[idx].to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    n_val = min(len(dataset.val_labels), MAX_REFERENCE)
    correct = 0
    with torch.no_grad():
        for start, x in _in_chunks(dataset.val_images, n_val):
            predicted = net(x.to(device)).argmax(1).cpu()
            correct += int((predicted == dataset.val_labels[start:start + len(x)]).sum())
    return net, correct / max(1, n_val)


def reference_statistics(extract: Callable[[torch.Tensor], torch.Tensor], dataset: ImageDataset,
                         device: torch.device,
                         to_images: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, covariance, n) of the held-out side: the features of the validation split's
    first MAX_REFERENCE items (`to_images` maps them first: a VAE's decoder for latents)."""
    n = min(len(dataset.val_labels), MAX_REFERENCE)
    feats = []
    with torch.no_grad():
        for _, x in _in_chunks(dataset.val_images, n):
            x = x.to(device)
            feats.append(features_of(extract, to_images(x) if to_images else x, device))
    mu, sigma = gaussian_statistics(np.concatenate(feats))
    return mu, sigma, n


def cached_feature_net(dataset: ImageDataset, data_identity: dict[str, Any], cache_dir: Path,
                       device: torch.device) -> dict[str, Any]:
    """sample_fd's feature net and its reference statistics, trained once per dataset and split
    and cached in cache_dir. Trained on the CPU, so the same data gives the same net and the
    same values on any machine; written atomically, so processes that train it at once leave
    one whole file, the same one. Returns {"net" (on `device`), "mu", "sigma", "n_reference",
    "accuracy", "path"}."""
    path = cache_dir / f"feature-net-{feature_net_key(data_identity, dataset)}.pt"
    saved = None
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            net = FeatureNet(dataset.channels, dataset.num_classes)
            net.load_state_dict(saved["state_dict"])
        except Exception as e:  # a damaged cache file: say so, train again over it
            sys.stderr.write(f"{path}: unreadable ({first_line(e)}); training the feature net again\n")
            saved = None
    if saved is None:
        cpu = torch.device("cpu")
        net, accuracy = train_feature_net(dataset, cpu)
        mu, sigma, n_ref = reference_statistics(net.features, dataset, cpu)
        saved = {"state_dict": net.state_dict(), "mu": mu, "sigma": sigma, "n_reference": n_ref,
                 "accuracy": accuracy}
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(saved, tmp))
        except OSError as e:
            raise UserError(f"cannot write the feature net cache {path}: "
                            f"{e.strerror or first_line(e)} (eval.cache_dir=DIR puts it elsewhere)") from None
    return {"net": net.to(device).eval(), "mu": saved["mu"], "sigma": saved["sigma"],
            "n_reference": saved["n_reference"], "accuracy": saved["accuracy"], "path": path}


# --------------------------------------------------------------------------------------------
# FID's Inception-v3
# --------------------------------------------------------------------------------------------


def inception_problem(weights: str | None) -> str | None:
    """Why FID's network cannot be built here (no weights file named, none there, or
    torch-fidelity missing), or None."""
    if weights is None:
        return ("sweep.objective=fid needs FID's Inception weights on disk: "
                f"eval.inception_weights=PATH (the file is {INCEPTION_URL})")
    if not Path(weights).expanduser().is_file():
        return (f"eval.inception_weights={weights}: no such file (FID's Inception weights are "
                f"{INCEPTION_URL})")
    try:
        import torch_fidelity  # noqa: F401
    except Exception as e:  # not installed, or its torchvision does not import beside this torch
        return ("fid needs torch-fidelity (pip install 'mupsweep[fid]'), with a torchvision that "
                f"imports beside your torch: {first_line(e)}")
    return None


def inception_features(weights: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """FID's pool3 features of images in [-1, 1] (N, 1 or 3, H, W): torch-fidelity's network
    takes uint8 RGB and resizes to 299 itself, as the standard FID does."""
    problem = inception_problem(weights)
    if problem:
        raise UserError(problem)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"],
            feature_extractor_weights_path=str(Path(weights).expanduser())).to(device).eval()
    except Exception as e:
        raise UserError(f"eval.inception_weights={weights}: not FID's Inception weights "
                        f"({first_line(e)})") from None

    def extract(images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        uint8 = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        (pool3,) = net(uint8)
        return pool3

    return extract


def finite_or_inf(x: float) -> float:
    """A distance from samples that hold NaN or inf is inf (the worst), not NaN."""
    return x if math.isfinite(x) else math.inf
