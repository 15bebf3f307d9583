"""FLOPs per image are counted from a model's forward (`mupsweep.flops`), not written by hand:
the count agrees with a DiT formula written out here, grows quadratically with width, works for
a model that declares nothing, and happens on the meta device (nothing computed or moved)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mupsweep.config import compose
from mupsweep.flops import config_flops_per_image, forward_flops_per_image
from mupsweep.models import DataSpec
from mupsweep.parametrize import build_model

SPEC = DataSpec(image_size=8, channels=1, num_classes=10)  # digits, as the tiny presets train
TEXT_SPEC = dataclasses.replace(SPEC, text_dim=64, text_len=16)  # what the conditioner fills in
PRESETS = ("dit-tiny", "uvit-tiny", "pixart-tiny", "mmdit-tiny")


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def dit_flops(width: int, depth: int, tokens: int, patch_in: int, patch_out: int,
              mlp_ratio: float = 4.0) -> int:
    """DiT's forward FLOPs per image, every matmul 2 m k n: per block qkv, proj, q k^T and
    attn @ v, MLP, adaLN (on the conditioning vector); then patch embed, timestep MLP, the
    final layer's adaLN and readout."""
    D, N, H = width, tokens, int(width * mlp_ratio)
    block = (_mm(N, D, 3 * D) + _mm(N, D, D) + 2 * _mm(N, D, N) + _mm(N, D, H) + _mm(N, H, D)
             + _mm(1, D, 6 * D))
    return (depth * block + _mm(N, patch_in, D) + _mm(1, 256, D) + _mm(1, D, D)
            + _mm(1, D, 2 * D) + _mm(N, D, patch_out))


def _model_cfg(preset: str, *overrides: str):
    return compose([f"model={preset}", *overrides]).model


def _spec(preset: str) -> DataSpec:
    return TEXT_SPEC if preset.startswith(("pixart", "mmdit")) else SPEC


def _dit_shaped(cfg, spec: DataSpec) -> int:
    """The DiT formula at a preset's width, depth and tokens."""
    p = cfg.patch_size
    out = spec.channels * (2 if cfg.learn_sigma else 1)
    return dit_flops(cfg.width, cfg.depth, (spec.image_size // p) ** 2, p * p * spec.channels,
                     p * p * out, cfg.mlp_ratio)


# Each architecture against the DiT formula at its own shape: DiT is DiT (same to 0.1%);
# U-ViT has 2 extra tokens and skip linears, no adaLN; PixArt adds cross-attention to the
# caption; MMDiT runs a second (caption) stream beside the image stream.
FACTOR = {"dit-tiny": (0.999, 1.001), "uvit-tiny": (1.0, 2.0), "pixart-tiny": (1.0, 2.0),
          "mmdit-tiny": (1.0, 2.5)}


@pytest.mark.parametrize("preset", PRESETS)
def test_counted_flops_match_the_dit_formula(preset):
    cfg = _model_cfg(preset)
    counted = config_flops_per_image(cfg, _spec(preset))
    low, high = FACTOR[preset]
    assert isinstance(counted, int)
    assert low <= counted / _dit_shaped(cfg, _spec(preset)) <= high, counted


def test_dit_xl_2_is_the_papers_118_6_gmacs():
    """DiT-XL/2 on ImageNet-256 latents (32x32x4, 1000 classes): the paper's 118.6 GMACs."""
    cfg, spec = _model_cfg("dit-xl-2"), DataSpec(image_size=32, channels=4, num_classes=1000)
    counted = config_flops_per_image(cfg, spec)
    assert counted == _dit_shaped(cfg, spec)
    assert counted / 2 / 1e9 == pytest.approx(118.6, abs=0.05)


@pytest.mark.parametrize("preset", PRESETS)
def test_flops_grow_quadratically_with_width(preset):
    """At large width the D^2 matmuls dominate (16 image tokens): doubling the width ~4x."""
    cfg, spec = _model_cfg(preset), _spec(preset)
    wide = [config_flops_per_image(dataclasses.replace(cfg, width=w), spec) for w in (2048, 4096)]
    assert 3.9 < wide[1] / wide[0] <= 4.0, wide


@pytest.mark.parametrize("preset", PRESETS)
def test_text_sizes_come_from_the_model_when_the_spec_has_none(preset):
    """transfer's estimate builds from the data's shape alone (no conditioner): the model's
    own caption sizes (model.text_*) are used."""
    cfg = _model_cfg(preset)
    assert config_flops_per_image(cfg, SPEC) == config_flops_per_image(cfg, _spec(preset))


class PatchMixer(nn.Module):
    """A user's own model: no flops_per_image, only the model contract."""

    def __init__(self, channels: int = 1, image: int = 8, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(channels * image * image, hidden)
        self.label = nn.Embedding(classes + 1, hidden)
        self.out = nn.Linear(hidden, channels * image * image)

    def forward(self, x, t, cond, drop=None):
        h = self.inp(x.flatten(1)) + self.label(cond["y"]) + t[:, None].float()
        return self.out(torch.relu(h)).reshape(x.shape)


class CaptionMixer(PatchMixer):
    """A user's text model: reads cond's caption tokens, mask and pooled vector."""

    conditioning = "text"

    def __init__(self, text_dim: int = 12, pooled_dim: int = 5):
        super().__init__()
        self.text = nn.Linear(text_dim, 32)
        self.pooled = nn.Linear(pooled_dim, 32)

    def forward(self, x, t, cond, drop=None):
        assert cond["mask"].dtype == torch.bool and cond["mask"].shape == cond["text"].shape[:2]
        caption = (self.text(cond["text"]) * cond["mask"][..., None]).sum(1)
        h = self.inp(x.flatten(1)) + caption + self.pooled(cond["pooled"])
        return self.out(torch.relu(h)).reshape(x.shape)


def test_a_model_without_flops_per_image_is_counted():
    with torch.device("meta"):
        model = PatchMixer()
    assert forward_flops_per_image(model, SPEC) == _mm(1, 64, 32) + _mm(1, 32, 64)
    text_spec = dataclasses.replace(SPEC, text_dim=12, text_len=7)
    with torch.device("meta"):
        model = CaptionMixer()
    assert forward_flops_per_image(model, text_spec, pooled_dim=5) == \
        _mm(1, 64, 32) + _mm(1, 32, 64) + _mm(7, 12, 32) + _mm(1, 5, 32)


def test_a_model_that_declares_its_flops_is_taken_at_its_word():
    class Declared(PatchMixer):
        def flops_per_image(self, spec: DataSpec) -> int:
            return 1234

    with torch.device("meta"):
        assert forward_flops_per_image(Declared(), SPEC) == 1234


class _Devices(TorchDispatchMode):
    """Every device an op's tensors lived on while it was active."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(x, torch.Tensor):
                self.seen.add(x.device.type)
        return out


@pytest.mark.parametrize("preset", PRESETS)
def test_counting_stays_on_meta(preset):
    """The count runs on the meta device: no op touches a real device, nothing is moved off
    meta, and the model's hooks see only meta tensors."""
    cfg, spec = _model_cfg(preset), _spec(preset)
    with torch.device("meta"):
        model = build_model(cfg, spec, "meta")
    hooked: list[str] = []
    model.register_forward_hook(lambda m, args, out: hooked.append(out.device.type))
    recorder = _Devices()
    with recorder:
        flops = forward_flops_per_image(model, spec)
    assert flops == config_flops_per_image(cfg, spec)
    assert recorder.seen == {"meta"}
    assert hooked == ["meta"]
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("preset", ("dit-tiny", "mmdit-tiny"))
def test_a_real_device_counts_the_same(preset):
    """On the CPU the fused attention kernel is counted too (torch's counter does not know
    it): the same FLOPs as on meta."""
    cfg, spec = _model_cfg(preset), _spec(preset)
    torch.manual_seed(0)
    assert forward_flops_per_image(build_model(cfg, spec), spec) == config_flops_per_image(cfg, spec)


def test_the_cache_ignores_what_packs_may_differ_in(monkeypatch):
    """A sweep's trials differ in per-member keys (init, output multipliers): one count per
    shape; a width change is a new count."""
    import mupsweep.flops as flops

    monkeypatch.setattr(flops, "_CACHE", {})  # counts made by other tests do not count here
    built: list[int] = []
    real = flops.forward_flops_per_image
    monkeypatch.setattr(flops, "forward_flops_per_image",
                        lambda model, spec, pooled=None: built.append(1) or real(model, spec, pooled))
    cfg = _model_cfg("dit-tiny", "model.width=96")
    first = config_flops_per_image(cfg, SPEC)
    assert config_flops_per_image(dataclasses.replace(cfg, init_mult=2.0, output_mult=0.5), SPEC) == first
    assert len(built) == 1
    assert config_flops_per_image(dataclasses.replace(cfg, width=128), SPEC) > first
    assert len(built) == 2
