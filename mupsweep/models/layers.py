"""Shared building blocks of every model. Every layer with weights is made here, and each helper
tags the muP role of its parameters (`roles.set_spec`), so a model file decides a layer's role
by choosing the helper: `input_linear`, `hidden_linear`, `readout`, ...
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mupsweep.roles import ParamSpec, Role, set_spec
from mupsweep.vendor.mup import MuReadout

VECTOR_BIAS = ParamSpec(Role.VECTOR, mup_init="zero", sp_init="zero")
VECTOR_GAIN = ParamSpec(Role.VECTOR, mup_init="one", sp_init="one")


# --------------------------------------------------------------------------------------------
#                                 Role-tagged layer helpers
# --------------------------------------------------------------------------------------------


def _tag_linear(layer: nn.Module, weight_spec: ParamSpec) -> nn.Module:
    set_spec(layer.weight, weight_spec)
    if getattr(layer, "bias", None) is not None:
        set_spec(layer.bias, VECTOR_BIAS)
    return layer


def input_linear(fan_in: int, width: int, bias: bool = True, sp_init: str = "xavier") -> nn.Linear:
    """finite -> width (e.g. timestep frequencies 256 -> D). muP: input role."""
    return _tag_linear(nn.Linear(fan_in, width, bias=bias), ParamSpec(Role.INPUT, sp_init=sp_init))


def hidden_linear(fan_in: int, fan_out: int, bias: bool = True, sp_init: str = "xavier",
                  adaln: bool = False) -> nn.Linear:
    """width -> width (qkv, proj, MLP, adaLN modulation). muP: hidden role, lr / m."""
    spec = ParamSpec(Role.HIDDEN, sp_init=sp_init, adaln=adaln)
    return _tag_linear(nn.Linear(fan_in, fan_out, bias=bias), spec)


class Readout(MuReadout):
    """mup's MuReadout (input x output_mult / width_mult, zero init) with both multipliers in
    a buffer, `multipliers` = (output_mult, width_mult), instead of a Python float and
    `weight.infshape` read in forward. A packed sweep (`mupsweep.packed`) calls the model
    through `torch.func.functional_call` with stacked weights, which carry no infshape, and
    gives each member its own output_mult: a buffer is swapped in and stacked per member like
    any weight. Same operations in the same order as MuReadout, so the same numbers."""

    def __init__(self, width: int, fan_out: int, bias: bool = True):
        super().__init__(width, fan_out, bias=bias, readout_zero_init=True)
        # NaN until `set_multipliers` runs: a readout used before base shapes are set says so
        self.register_buffer("multipliers", torch.full((2,), math.nan), persistent=False)

    def set_multipliers(self, output_mult: float) -> None:
        """Record output_mult and, from the base shapes (set them first), the width
        multiplier."""
        self.output_mult = output_mult
        self.multipliers.copy_(torch.tensor([output_mult, self.width_mult()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.multipliers[0] / self.multipliers[1], self.weight, self.bias)


def readout(width: int, fan_out: int, bias: bool = True) -> Readout:
    """width -> finite output. muP: MuReadout (output x output_mult / m), zero init."""
    layer = Readout(width, fan_out, bias=bias)
    return _tag_linear(layer, ParamSpec(Role.OUTPUT, mup_init="zero", sp_init="zero"))


def input_conv(in_channels: int, width: int, kernel: int, stride: int) -> nn.Conv2d:
    """Patchify conv: C x p x p -> width. muP: input role."""
    conv = nn.Conv2d(in_channels, width, kernel_size=kernel, stride=stride, bias=True)
    return _tag_linear(conv, ParamSpec(Role.INPUT, sp_init="xavier"))


def input_embedding(num: int, width: int, mup_std: float = 1.0, sp_std: float = 0.02) -> nn.Embedding:
    """A lookup table (class labels). muP: input role, constant std (DiT-muP: N(0, 1))."""
    table = nn.Embedding(num, width)
    set_spec(table.weight, ParamSpec(Role.INPUT, mup_init="const", std=mup_std, sp_init="normal",
                                     sp_std=sp_std))
    return table


def input_parameter(*shape: int, mup_std: float, sp_std: float) -> nn.Parameter:
    """A free tensor whose last dim is the width (learned pos embed, scale_shift_table)."""
    p = nn.Parameter(torch.zeros(*shape))
    return set_spec(p, ParamSpec(Role.INPUT, mup_init="const", std=mup_std, sp_init="normal",
                                 sp_std=sp_std))


def gain(width: int) -> nn.Parameter:
    """A norm gain (RMSNorm weight). Vector role, init 1."""
    return set_spec(nn.Parameter(torch.ones(width)), VECTOR_GAIN)


# --------------------------------------------------------------------------------------------
#                                       Small modules
# --------------------------------------------------------------------------------------------


def residual(x: torch.Tensor, branch: torch.Tensor, mult: float) -> torch.Tensor:
    """x + mult * branch: a residual add with the block's depth multiplier (CompleteP's
    m_L^-alpha, 1.0 under depth_parametrization=none). torch.add's alpha keeps it one kernel,
    and at mult == 1.0 it is exactly x + branch, forward and backward."""
    return torch.add(x, branch, alpha=mult)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def attention_scale(head_dim: int, attn_mult: float = 1.0, parametrization: str = "sp") -> float:
    """The softmax scale, attn_mult / sqrt(head_dim), in both parametrizations."""
    # muP: 1/d anchored at the base head_dim, which is head_dim itself (width grows by heads),
    # so it equals 1/sqrt(head_dim); written sqrt(d)/d to keep the float runs have always had.
    if parametrization == "mup":
        return attn_mult * math.sqrt(head_dim) / head_dim
    return attn_mult / math.sqrt(head_dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention: q (B, heads, Lq, head_dim), k and v (B, heads, Lk,
    head_dim), mask None or (B, 1, 1, Lk) bool (True = attend) -> (B, heads, Lq, head_dim).

    Under torch.func.vmap (a pack of K models, mupsweep/group.py) the K members fold into the
    batch dimension, one fused call for all: torch has no vmap rule for its fused CPU kernel
    and would run it once per member (or the unfused math path, about 2.5x slower than one
    folded call at width 32). `torch._C._functorch.is_batchedtensor` (private, no public
    equivalent) says whether a tensor carries a vmap dimension."""
    if any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in (q, k, v, mask)):
        return _MembersFoldedAttention.apply(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class _MembersFoldedAttention(torch.autograd.Function):
    """Attention's vmap rule (`attention`). Only ever called under vmap: the rule folds the
    members into the batch and calls the fused op on plain tensors, which autograd
    differentiates with the op's own backward; forward and backward here are never reached."""

    @staticmethod
    def forward(q, k, v, mask, scale):  # noqa: ANN001, ANN205 - autograd.Function's signature
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        pass

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise RuntimeError("_MembersFoldedAttention is differentiated through its vmap rule")

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, scale):  # noqa: ANN001, ANN205
        members = info.batch_size

        def fold(t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.unsqueeze(0).expand(members, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.reshape(-1, *t.shape[2:])  # (K, B, ...) -> (K * B, ...)

        q, k, v, mask = (fold(t, d) for t, d in zip((q, k, v, mask), in_dims[:4], strict=True))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.reshape(members, -1, *out.shape[1:]), 0


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (fused kernels)."""

    def __init__(self, width: int, head_dim: int, scale: float, sp_init: str = "xavier"):
        super().__init__()
        self.num_heads = width // head_dim
        self.head_dim = head_dim
        self.scale = scale
        self.qkv = hidden_linear(width, 3 * width, sp_init=sp_init)
        self.proj = hidden_linear(width, width, sp_init=sp_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = attention(q, k, v, self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, both hidden."""

    def __init__(self, width: int, hidden: int, sp_init: str = "xavier"):
        super().__init__()
        self.fc1 = hidden_linear(width, hidden, sp_init=sp_init)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = hidden_linear(hidden, width, sp_init=sp_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with N = (H/p)^2."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, width: int):
        super().__init__()
        if image_size % patch_size:  # every model patchifies here, so the check lives here
            raise ValueError(f"image size {image_size} not divisible by patch {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = input_conv(in_channels, width, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> D: sinusoidal frequencies (256, finite) -> input linear -> hidden."""

    def __init__(self, width: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            input_linear(frequency_size, width, sp_init="normal"),
            nn.SiLU(),
            hidden_linear(width, width, sp_init="normal"),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                               device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_size))


class LabelEmbedder(nn.Module):
    """Class labels -> D. Row `num_classes` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, width: int, sp_std: float = 0.02):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = input_embedding(num_classes + 1, width, sp_std=sp_std)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    """DiT's last layer (MMDiT's too): adaLN norm, then the readout, D -> p*p*C_out per token."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = readout(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), hidden_linear(width, 2 * width, adaln=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
#                            Sine/cosine positional embedding (fixed)
# --------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(width: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, width) fixed 2D sin-cos embedding, as in DiT/MAE."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(width // 2, grid[0])
    emb_w = _1d_sincos(width // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def unpatchify(x: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W)."""
    p = patch_size
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


# --------------------------------------------------------------------------------------------
#          More role-tagged helpers (U-ViT, PixArt-alpha, MMDiT): norms, finite layers
# --------------------------------------------------------------------------------------------


def layer_norm(width: int, affine: bool = True, eps: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm over the width; with affine, its gain (init 1) and bias (init 0) are vector role."""
    norm = nn.LayerNorm(width, elementwise_affine=affine, eps=eps)
    if affine:
        set_spec(norm.weight, VECTOR_GAIN)
        set_spec(norm.bias, VECTOR_BIAS)
    return norm


# A tensor with no width-sized dim (e.g. U-ViT's 3x3 C->C output conv, PixArt's null caption
# (text_len, text_dim)). mup's base shapes give it ninf = 0, which `check_roles` reads as the
# vector role: like a bias, nothing about it changes with width, so under muP it keeps the base
# lr (MuAdamW only rescales ninf = 2 weights) and a width-independent init.
def _finite_spec(mup_init: str, std: float = 1.0, sp_init: str = "fan_in",
                 sp_std: float = 0.02) -> ParamSpec:
    return ParamSpec(Role.VECTOR, mup_init=mup_init, std=std, sp_init=sp_init, sp_std=sp_std)


def finite_conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A same-padding conv between finite channel counts (U-ViT's final 3x3 conv, C -> C).
    Both dims are finite, so muP treats it like a vector-role parameter (no width multiplier);
    init N(0, 1/sqrt(fan_in)) in both parametrizations (fan_in = C * k * k)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=kernel // 2)
    set_spec(conv.weight, _finite_spec("fan_in", sp_init="fan_in"))
    set_spec(conv.bias, VECTOR_BIAS)
    return conv


def finite_parameter(*shape: int, std: float) -> nn.Parameter:
    """A learned tensor with no width-sized dim (PixArt's null caption embedding): vector role,
    N(0, std) in both parametrizations."""
    p = nn.Parameter(torch.zeros(*shape))
    return set_spec(p, _finite_spec("const", std=std, sp_init="normal", sp_std=std))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dim, times a gain (MMDiT's QK-norm, per head)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * weight


def key_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True = a real token -> (B, 1, 1, L) boolean mask for scaled_dot_product_attention."""
    return mask[:, None, None, :]
