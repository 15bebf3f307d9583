"""What an evaluation measures: metrics by name, each one function registered here.

Every evaluation measures the validation loss (the training loop's own: the divergence rule
reads it). A run measures the metrics of eval.metrics besides, at every evaluation after step
0; a sweep trial adds sweep.objective, the one its study ranks trials by, in the metric's own
direction. Adding a metric is one `register_metric(Metric(name, direction, measure))`, whose
`measure(inputs) -> float` gets the member's model and what it needs to sample and compare
(`MetricInputs`), and whose optional `check(cfg, dataset)` refuses, before any training, a
config it cannot measure.

Built in: validation_loss; sample_fd, the Frechet distance between generated samples and the
validation split in the features of a small classifier trained once on the training split
(no download, any data); fid, the same in FID's Inception-v3 features, from a local weights
file (`mupsweep.sample_quality`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mupsweep.conditioning import Conditioner, cache_dir
from mupsweep.config import Config, covers, did_you_mean, result_neutral_keys
from mupsweep.data import ImageDataset
from mupsweep.diffusion import GaussianDiffusion, RectifiedFlow
from mupsweep.errors import UserError
from mupsweep.sample_quality import (
    FEATURE_DIM,
    INCEPTION_DIM,
    cached_feature_net,
    features_of,
    finite_or_inf,
    frechet_distance,
    gaussian_statistics,
    inception_features,
    inception_problem,
    reference_statistics,
)
from mupsweep.vae import decode_latents, load_vae

VALIDATION_LOSS = "validation_loss"
SAMPLE_BATCH = 256  # samples generated at once


@dataclass
class MetricInputs:
    """What a metric's `measure` gets: one member's model (its EMA when it keeps one), in eval
    mode, and what sampling and comparing need. `cache` lives as long as the run: a metric
    keeps there what it computes once (reference statistics, a feature network)."""

    model: nn.Module
    cfg: Config
    dataset: ImageDataset
    diffusion: GaussianDiffusion | RectifiedFlow
    conditioner: Conditioner
    device: torch.device
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """A named measure of a run. `measure` is None for the validation loss, which the training
    loop measures itself."""

    name: str
    direction: str  # "minimize" | "maximize": the study's direction when it is the objective
    measure: Callable[[MetricInputs], float] | None
    check: Callable[[Config, ImageDataset], None] | None = None  # raises UserError
    # what it computes once before many runs (tune calls it before the workers start)
    prepare: Callable[[Config, ImageDataset], None] | None = None
    about: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"metric {self.name!r}: direction must be minimize or maximize")

    @property
    def worst(self) -> float:
        """The value of a run that diverged before its last evaluation."""
        return math.inf if self.direction == "minimize" else -math.inf


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    """Make `metric` measurable by name (eval.metrics, sweep.objective)."""
    METRICS[metric.name] = metric
    return metric


def metric_named(name: str, what: str = "sweep.objective") -> Metric:
    """The registered metric `name`; an unknown one is one line naming the ones there are."""
    if name not in METRICS:
        hint = did_you_mean(name, list(METRICS))
        raise UserError(f"{what}={name}: no such metric; {hint}the metrics are "
                        f"{', '.join(sorted(METRICS))}")
    return METRICS[name]


def measured_names(cfg: Config) -> list[str]:
    """The metrics a run measures besides the validation loss, in eval.metrics' order."""
    return [n for n in dict.fromkeys(cfg.eval.metrics) if n != VALIDATION_LOSS]


def check_metrics(cfg: Config, dataset: ImageDataset) -> None:
    """Refuse, before training, a metric that is unknown or cannot be measured here."""
    for name in measured_names(cfg):
        metric = metric_named(name, "eval.metrics")
        if metric.check is not None:
            metric.check(cfg, dataset)


def prepare_metrics(cfg: Config, dataset: ImageDataset) -> None:
    """Compute once, before a study's trials, what each metric keeps (sample_fd's feature
    net), so that workers starting together do not each compute it."""
    for name in measured_names(cfg):
        metric = metric_named(name, "eval.metrics")
        if metric.prepare is not None:
            metric.prepare(cfg, dataset)


# --------------------------------------------------------------------------------------------
# Samples, as a metric draws them
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_samples(inputs: MetricInputs) -> torch.Tensor:
    """eval.samples samples (labels cycling through the classes), from noise drawn by a
    generator seeded with eval.seed: the same weights give the same samples, and the run's
    own generators are not touched. (n, C, H, W) on the CPU, in the data's space."""
    ec, spec = inputs.cfg.eval, inputs.conditioner.data_spec
    g = torch.Generator(inputs.device).manual_seed(ec.seed)
    out = []
    for start in range(0, ec.samples, SAMPLE_BATCH):
        n = min(SAMPLE_BATCH, ec.samples - start)
        noise = torch.randn(n, spec.channels, spec.image_size, spec.image_size, generator=g,
                            device=inputs.device)
        labels = (torch.arange(start, start + n, device=inputs.device) % spec.num_classes)
        x = inputs.diffusion.sample(inputs.model, noise, inputs.conditioner(labels),
                                    cfg_scale=ec.cfg_scale, steps=ec.sample_steps)
        out.append(x.float().cpu())
    return torch.cat(out)


def _fd_of_samples(extract: Callable[[torch.Tensor], torch.Tensor], reference: tuple,
                   samples: torch.Tensor, device: torch.device) -> float:
    if not torch.isfinite(samples).all():
        return math.inf
    mu, sigma = gaussian_statistics(features_of(extract, samples, device))
    return finite_or_inf(frechet_distance(mu, sigma, reference[0], reference[1]))


def _check_sample_count(cfg: Config, dataset: ImageDataset, dim: int, name: str) -> None:
    if cfg.eval.samples <= dim:
        raise UserError(f"eval.samples={cfg.eval.samples} is too few for {name}: its {dim} "
                        f"features need more samples than that for a covariance estimate "
                        f"(use eval.samples >= {2 * dim})")
    if len(dataset.val_labels) <= dim:
        raise UserError(f"{name} compares samples with the validation split, whose "
                        f"{len(dataset.val_labels)} items are too few for {dim} features' "
                        "covariance: raise data.val_fraction")


# --------------------------------------------------------------------------------------------
# sample_fd: features of a classifier trained on the training split
# --------------------------------------------------------------------------------------------


def data_identity(cfg: Config) -> dict[str, Any]:
    """The data keys that choose the items and their split: what a cached feature net is
    keyed by. Result-neutral keys (where the data is read from) and the training-time flip
    are left out."""
    return {k: v for k, v in dataclasses.asdict(cfg.data).items()
            if k != "hflip" and not covers(result_neutral_keys(), f"data.{k}")}


def feature_net_dir(cfg: Config) -> Path:
    return Path(cfg.eval.cache_dir).expanduser() if cfg.eval.cache_dir else cache_dir() / "feature_nets"


_LOADED: dict[tuple[str, str], dict[str, Any]] = {}  # a process's trials load the net once


def feature_net_for(cfg: Config, dataset: ImageDataset, device: torch.device) -> dict[str, Any]:
    """sample_fd's feature net and reference statistics (`sample_quality.cached_feature_net`),
    trained on first use and read from the cache after."""
    key = (str(feature_net_dir(cfg)), repr(sorted(data_identity(cfg).items())), str(device))
    if key not in _LOADED:
        _LOADED[key] = cached_feature_net(dataset, data_identity(cfg), feature_net_dir(cfg), device)
    return _LOADED[key]


def check_sample_fd(cfg: Config, dataset: ImageDataset) -> None:
    if dataset.num_classes < 2:
        raise UserError("sample_fd's features come from a classifier trained on the labels; "
                        "data of one class gives it nothing to learn (use fid)")
    _check_sample_count(cfg, dataset, FEATURE_DIM, "sample_fd")


def prepare_sample_fd(cfg: Config, dataset: ImageDataset) -> None:
    feature_net_for(cfg, dataset, torch.device("cpu"))


def measure_sample_fd(inputs: MetricInputs) -> float:
    net = feature_net_for(inputs.cfg, inputs.dataset, inputs.device)
    return _fd_of_samples(net["net"].features, (net["mu"], net["sigma"]),
                          generate_samples(inputs), inputs.device)


# --------------------------------------------------------------------------------------------
# fid: FID's Inception-v3 features, from a local weights file
# --------------------------------------------------------------------------------------------


def check_fid(cfg: Config, dataset: ImageDataset) -> None:
    problem = inception_problem(cfg.eval.inception_weights)
    if problem:
        raise UserError(problem)
    if dataset.channels not in (1, 3) and cfg.data.vae is None:
        raise UserError(f"fid compares images, and these are {dataset.channels}-channel latents: "
                        "name their VAE with data.vae=DIR")
    _check_sample_count(cfg, dataset, INCEPTION_DIM, "fid")


def measure_fid(inputs: MetricInputs) -> float:
    cfg = inputs.cfg
    if "fid" not in inputs.cache:
        extract = inception_features(cfg.eval.inception_weights, inputs.device)
        to_images = None
        if inputs.dataset.channels not in (1, 3):
            vae = load_vae(cfg.data.vae, inputs.device, what="data.vae=")

            def to_images(latents: torch.Tensor) -> torch.Tensor:
                return decode_latents(vae, latents / cfg.data.latent_scale)
        mu, sigma, _ = reference_statistics(extract, inputs.dataset, inputs.device, to_images)
        inputs.cache["fid"] = (extract, to_images, (mu, sigma))
    extract, to_images, reference = inputs.cache["fid"]
    samples = generate_samples(inputs)
    if to_images is not None:
        samples = torch.cat([to_images(samples[i:i + SAMPLE_BATCH].to(inputs.device)).cpu()
                             for i in range(0, len(samples), SAMPLE_BATCH)])
    return _fd_of_samples(extract, reference, samples, inputs.device)


register_metric(Metric(VALIDATION_LOSS, "minimize", None,
                       about="the diffusion loss on the fixed validation set"))
register_metric(Metric("sample_fd", "minimize", measure_sample_fd, check_sample_fd, prepare_sample_fd,
                       about="Frechet distance to the validation split in a classifier's features"))
register_metric(Metric("fid", "minimize", measure_fid, check_fid,
                       about="Frechet Inception distance to the validation split"))
