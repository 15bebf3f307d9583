"""U-ViT (Bao et al. 2023) in muP and SP: class-conditional, everything is a token.

The timestep and the class label enter as two extra tokens in front of the patch tokens; a
learned positional embedding covers all of them; in-blocks, a mid-block and out-blocks are
joined by long skips (concat then `skip_linear` 2D -> D); a final norm and the `decoder_pred`
readout, then an optional 3x3 conv on the image.

muP roles (docs/design.md section 3), decided by the helper that builds each layer:
- input: patch embed conv, timestep MLP first linear (256 -> D), label table, pos embed
  (`input_parameter`, constant std 0.02 in both parametrizations);
- hidden: qkv, proj, MLP fc1/fc2, timestep MLP second linear, skip_linear (2D -> D);
- output: decoder_pred (MuReadout, zero init);
- vector: biases, LayerNorm gains/biases, and the optional 3x3 conv (C -> C): neither of its
  dims grows with width, so mup gives it no infinite dim and it trains like a vector-role
  parameter (base lr, width-independent init; `layers.finite_conv`).
SP = original U-ViT: trunc-normal(0.02)-like N(0, 0.02) linears, N(0, 1) label table (torch's
nn.Embedding default, which U-ViT keeps), zero readout here as in DiT.

Depth (mupsweep/completep.py): every block (in, mid, out) adds its attention and MLP branches
with its residual multiplier, and those branches' parameters (the pre-LNs too) are in a
residual block. The long skips get neither: `skip_linear` is not a branch added to the stream
but a hidden layer that replaces the stream by a mix of it and the skip ([x, skip] -> x), so
its gradient is not scaled by m_L^-alpha, and its fan-in init keeps the stream's size (each
out-block's mix halves the weight of what came before it, so the skip layers' updates do not
pile up with depth). The final norm and readout are outside the blocks, as Table 1's final LN
and unembedding. Measured (`coord-check --depths 3,5,9,17`): the stream's per-step update
stays flat under completep (it grows x1.7 per doubling under none), but the stream's size
falls with depth (slope -0.32 at init, the skip layer's output -0.48 by step 4), so U-ViT
does not pass the depth check at 0.3; see docs/results.md.
"""

from __future__ import annotations

import torch
from torch import nn

from mupsweep.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention_scale,
    finite_conv,
    hidden_linear,
    input_parameter,
    layer_norm,
    readout,
    residual,
    unpatchify,
)
from mupsweep.models.registry import register
from mupsweep.roles import mark_residual_block

EXTRAS = 2  # tokens in front of the patches: time, label


class UViTBlock(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip: skip_linear([x, skip])."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float, attn_scale: float,
                 skip: bool = False, residual_mult: float = 1.0):
        super().__init__()
        self.residual_mult = residual_mult  # CompleteP's m_L^-alpha on both branches
        self.skip_linear = hidden_linear(2 * width, width, sp_init="normal") if skip else None
        self.norm1 = layer_norm(width)
        self.attn = Attention(width, head_dim, attn_scale, sp_init="normal")
        self.norm2 = layer_norm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), sp_init="normal")
        mark_residual_block(self.norm1, self.attn, self.norm2, self.mlp)  # not skip_linear

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, 2D) -> (B, L, D)
        x = residual(x, self.attn(self.norm1(x)), self.residual_mult)
        return residual(x, self.mlp(self.norm2(x)), self.residual_mult)


class UViT(nn.Module):
    """U-ViT: time and label tokens, long skips between in- and out-blocks."""

    conditioning = "label"

    def __init__(self, image_size: int, in_channels: int, num_classes: int, width: int, depth: int,
                 head_dim: int, patch_size: int = 2, mlp_ratio: float = 4.0,
                 learn_sigma: bool = False, attn_scale: float | None = None,
                 residual_mult: float = 1.0, output_conv: bool = False):
        """As DiT's; depth is odd (depth // 2 in-blocks, a mid-block, depth // 2 out-blocks);
        output_conv: the optional 3x3 C->C conv after the readout."""
        super().__init__()
        if depth % 2 == 0:
            raise ValueError(f"U-ViT needs an odd depth, not {depth}")
        D, p = width, patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = p
        self.num_patches = (image_size // p) ** 2
        scale = attention_scale(head_dim) if attn_scale is None else attn_scale

        self.patch_embed = PatchEmbed(image_size, p, in_channels, D)
        self.time_embed = TimestepEmbedder(D)
        self.label_emb = LabelEmbedder(num_classes, D, sp_std=1.0)
        self.pos_embed = input_parameter(1, EXTRAS + self.num_patches, D, mup_std=0.02, sp_std=0.02)
        half, mult = depth // 2, residual_mult
        self.in_blocks = nn.ModuleList(
            UViTBlock(D, head_dim, mlp_ratio, scale, residual_mult=mult) for _ in range(half))
        self.mid_block = UViTBlock(D, head_dim, mlp_ratio, scale, residual_mult=mult)
        self.out_blocks = nn.ModuleList(
            UViTBlock(D, head_dim, mlp_ratio, scale, skip=True, residual_mult=mult)
            for _ in range(half))
        self.norm = layer_norm(D)
        self.decoder_pred = readout(D, p * p * self.out_channels)
        self.final_layer = finite_conv(self.out_channels, self.out_channels, 3) if output_conv else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), cond["y"]: (B,) labels, drop: (B,) bool (null label)."""
        x = self.patch_embed(x)  # (B, N, D)
        time_token = self.time_embed(t).unsqueeze(1)  # (B, 1, D)
        label_token = self.label_emb(cond["y"], drop).unsqueeze(1)  # (B, 1, D)
        x = torch.cat([time_token, label_token, x], dim=1) + self.pos_embed  # (B, 2+N, D)
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, EXTRAS:]  # (B, N, p*p*C_out)
        x = unpatchify(x, self.out_channels, self.patch_size)  # (B, C_out, H, W)
        return self.final_layer(x) if self.final_layer is not None else x

    def tracked_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"patch_embed": self.patch_embed, "time_embed": self.time_embed,
                                      "label_emb": self.label_emb}
        for i, block in enumerate(self.in_blocks):
            mods[f"in_blocks.{i}.attn"], mods[f"in_blocks.{i}.mlp"] = block.attn, block.mlp
        mods["mid_block.attn"], mods["mid_block.mlp"] = self.mid_block.attn, self.mid_block.mlp
        for i, block in enumerate(self.out_blocks):
            mods[f"out_blocks.{i}.skip_linear"] = block.skip_linear
            mods[f"out_blocks.{i}.attn"], mods[f"out_blocks.{i}.mlp"] = block.attn, block.mlp
        mods["decoder_pred"] = self.decoder_pred
        return mods

    def stream_head(self) -> nn.Module:
        """The module whose first input is the residual stream after the last block."""
        return self.norm


register("uvit", UViT)
