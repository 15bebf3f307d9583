"""DiT (Peebles & Xie 2023) in muP and SP: class-conditional, adaLN blocks.

One class serves both parametrizations; the differences live in the role tags (which helper
builds each layer) and `parametrize.init_weights`. muP follows the official DiT-muP code
(Zheng et al. 2025): kaiming fan-in init everywhere incl. adaLN (not zero), label table N(0, 1),
zero-init MuReadout, LayerNorms without affine, fixed sin-cos pos embed.

Depth (mupsweep/completep.py): each block is built with its residual multiplier and adds its
attention and MLP branches with it; all of a block's parameters (attention, MLP, adaLN
modulation) are in a residual block. The final layer's adaLN and readout are not.
"""

from __future__ import annotations

import torch
from torch import nn

from mupsweep.models.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention_scale,
    get_2d_sincos_pos_embed,
    hidden_linear,
    modulate,
    residual,
    unpatchify,
)
from mupsweep.models.registry import register
from mupsweep.roles import mark_residual_block


class DiTBlock(nn.Module):
    """adaLN block: shift/scale/gate for attention and MLP from the conditioning vector c."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float, attn_scale: float,
                 residual_mult: float = 1.0):
        super().__init__()
        self.residual_mult = residual_mult  # CompleteP's m_L^-alpha on both branches
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, head_dim, attn_scale)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), hidden_linear(width, 6 * width, adaln=True))
        mark_residual_block(self)  # the gates scale both branches: adaLN is in them too

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1)  # each (B, D)
        )
        attn = gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = residual(x, attn, self.residual_mult)
        mlp = gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return residual(x, mlp, self.residual_mult)


class DiT(nn.Module):
    """Diffusion transformer with adaLN conditioning on timestep + class label."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int, width: int, depth: int,
                 head_dim: int, patch_size: int = 2, mlp_ratio: float = 4.0,
                 learn_sigma: bool = False, attn_scale: float | None = None,
                 residual_mult: float = 1.0):
        """Sizes, and the two factors mupsweep sets by parametrization and depth
        (parametrize.builtin_args): attn_scale, the softmax scale (default 1/sqrt(head_dim));
        residual_mult, CompleteP's multiplier on every residual branch."""
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        D = width
        scale = attention_scale(head_dim) if attn_scale is None else attn_scale

        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D)
        grid = image_size // patch_size
        pos = torch.from_numpy(get_2d_sincos_pos_embed(D, grid)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # (1, N, D), fixed
        self.blocks = nn.ModuleList(
            DiTBlock(D, head_dim, mlp_ratio, scale, residual_mult) for _ in range(depth)
        )
        self.final_layer = FinalLayer(D, patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy input, t: (B,) timesteps, cond["y"]: (B,) labels,
        drop: (B,) bool, True where the label is replaced by the null class (CFG)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(cond["y"], drop)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return unpatchify(x, self.out_channels, self.patch_size)  # (B, C_out, H, W)

    def tracked_modules(self) -> dict[str, nn.Module]:
        """Modules whose output sizes the coordinate check records."""
        mods: dict[str, nn.Module] = {"x_embedder": self.x_embedder, "t_embedder": self.t_embedder}
        for i, block in enumerate(self.blocks):
            mods[f"blocks.{i}.attn"] = block.attn
            mods[f"blocks.{i}.mlp"] = block.mlp
            mods[f"blocks.{i}.adaLN"] = block.adaLN_modulation
        mods["final_layer"] = self.final_layer.linear
        return mods

    def stream_head(self) -> nn.Module:
        """The module whose first input is the residual stream after the last block."""
        return self.final_layer


register("dit", DiT)
