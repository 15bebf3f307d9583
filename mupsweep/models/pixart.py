"""PixArt-alpha (Chen et al. 2024) in muP and SP: text-to-image DiT with adaLN-single.

One shared `t_block` (SiLU + Linear D -> 6D) turns the timestep embedding into shift/scale/
gate for every block; each block adds its own learned `scale_shift_table` (6, D). Blocks are
self-attention, cross-attention to the projected caption tokens, MLP. Captions come in as
(B, L, text_dim) frozen-encoder tokens (mupsweep.conditioning) and are projected by an MLP
(text_dim -> D -> D). Caption dropout for classifier-free guidance swaps in a learned null
caption `y_embedding` (L, text_dim).

muP roles (docs/design.md section 3), decided by the helper that builds each layer:
- input: patch embed, timestep MLP first linear, caption projection fc1 (text_dim -> D),
  per-block and final `scale_shift_table` (`input_parameter`; constant std 1/sqrt(base_width),
  which equals PixArt's randn/sqrt(D) at the base width);
- hidden: t_block (D -> 6D, an adaLN weight), timestep MLP second linear, caption projection
  fc2, self-attn qkv/proj, cross-attn q/kv/proj, MLP fc1/fc2;
- output: final linear (MuReadout, zero init);
- vector: biases; and the null caption `y_embedding` (L, text_dim): no dim grows with width, so
  mup gives it ninf = 0 and it trains like a vector-role parameter (`layers.finite_parameter`,
  N(0, 1/sqrt(text_dim)) as PixArt's, base lr).
SP = original PixArt-alpha: xavier linears, N(0, 0.02) timestep / t_block / caption MLP,
zero cross-attn proj, scale_shift_table randn/sqrt(D), zero readout. (The SP default
adaLN-zero, model.adaln_zero=null -> true, also zeroes t_block; PixArt's own is N(0, 0.02):
set model.adaln_zero=false for exactly that.)

Depth (mupsweep/completep.py): each block adds its self-attention, cross-attention and MLP
branches with its residual multiplier; all of a block's parameters (its scale_shift_table
too: it makes the gates) are in a residual block. The shared t_block, the caption projection
and the final layer are not.
"""

from __future__ import annotations

import torch
from torch import nn

from mupsweep.models.layers import (
    Attention,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    attention_scale,
    finite_parameter,
    get_2d_sincos_pos_embed,
    hidden_linear,
    input_linear,
    input_parameter,
    key_mask,
    readout,
    residual,
    unpatchify,
)
from mupsweep.models.registry import register
from mupsweep.roles import mark_residual_block


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """shift, scale: (B, 1, D) broadcast over tokens."""
    return x * (1 + scale) + shift


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values from the caption tokens (masked)."""

    def __init__(self, width: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = width // head_dim, head_dim, scale
        self.q_linear = hidden_linear(width, width)
        self.kv_linear = hidden_linear(width, 2 * width)
        self.proj = hidden_linear(width, width, sp_init="zero")  # PixArt zero-inits it (SP)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        L = y.shape[1]
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(y).reshape(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, L, head_dim)
        out = attention(q, k, v, self.scale, key_mask(mask))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CaptionEmbedder(nn.Module):
    """Caption tokens (B, L, text_dim) -> (B, L, D); dropped captions become y_embedding."""

    def __init__(self, text_dim: int, text_len: int, width: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            input_linear(text_dim, width, sp_init="normal"),
            nn.GELU(approximate="tanh"),
            hidden_linear(width, width, sp_init="normal"),
        )
        self.y_embedding = finite_parameter(text_len, text_dim, std=text_dim**-0.5)

    def forward(self, text: torch.Tensor, mask: torch.Tensor,
                drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if drop is not None:  # CFG: the null caption, every token valid
            text = torch.where(drop[:, None, None], self.y_embedding.to(text.dtype), text)
            mask = mask | drop[:, None]
        return self.y_proj(text), mask


class PixArtBlock(nn.Module):
    """adaLN-single block: self-attn, cross-attn, MLP; modulation = table + shared t_block(t)."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float, attn_scale: float,
                 table_std: dict, residual_mult: float = 1.0):
        super().__init__()
        self.residual_mult = residual_mult  # CompleteP's m_L^-alpha on all three branches
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, head_dim, attn_scale)
        self.cross_attn = CrossAttention(width, head_dim, attn_scale)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.scale_shift_table = input_parameter(6, width, **table_std)
        mark_residual_block(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                t0: torch.Tensor) -> torch.Tensor:
        B, D = x.shape[0], x.shape[2]
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, D)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        m = self.residual_mult
        x = residual(x, gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa)), m)
        x = residual(x, self.cross_attn(x, y, mask), m)
        return residual(x, gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)), m)


class PixArtFinalLayer(nn.Module):
    """norm, modulation by its own (2, D) table + the timestep embedding, readout."""

    def __init__(self, width: int, patch_size: int, out_channels: int, table_std: dict):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = readout(width, patch_size * patch_size * out_channels)
        self.scale_shift_table = input_parameter(2, width, **table_std)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class PixArt(nn.Module):
    """PixArt-alpha: DiT blocks with adaLN-single and cross-attention to captions."""

    conditioning = "text"

    def __init__(self, image_size: int, in_channels: int, text_dim: int, text_len: int,
                 width: int, depth: int, head_dim: int, base_width: int, patch_size: int = 2,
                 mlp_ratio: float = 4.0, learn_sigma: bool = False,
                 attn_scale: float | None = None, residual_mult: float = 1.0):
        """As DiT's, with captions of text_len tokens of text_dim instead of labels; base_width:
        muP's base width (the modulation tables' std is taken there)."""
        super().__init__()
        D, p = width, patch_size
        self.text_dim, self.text_len = text_dim, text_len
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = p
        scale = attention_scale(head_dim) if attn_scale is None else attn_scale
        # muP: width-independent std (PixArt's 1/sqrt(D) taken at the base width); SP: 1/sqrt(D)
        table_std = {"mup_std": base_width**-0.5, "sp_std": D**-0.5}

        self.x_embedder = PatchEmbed(image_size, p, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), hidden_linear(D, 6 * D, sp_init="normal", adaln=True))
        self.y_embedder = CaptionEmbedder(self.text_dim, self.text_len, D)
        grid = image_size // p
        pos = torch.from_numpy(get_2d_sincos_pos_embed(D, grid)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # (1, N, D), fixed
        self.blocks = nn.ModuleList(
            PixArtBlock(D, head_dim, mlp_ratio, scale, table_std, residual_mult)
            for _ in range(depth))
        self.final_layer = PixArtFinalLayer(D, p, self.out_channels, table_std)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), cond["text"]: (B, L, text_dim), cond["mask"]: (B, L) bool,
        drop: (B,) bool, True where the caption is replaced by the null caption (CFG)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        t = self.t_embedder(t)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D), shared by every block
        y, mask = self.y_embedder(cond["text"], cond["mask"], drop)  # (B, L, D), (B, L)
        for block in self.blocks:
            x = block(x, y, mask, t0)
        x = self.final_layer(x, t)  # (B, N, p*p*C_out)
        return unpatchify(x, self.out_channels, self.patch_size)

    def tracked_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"x_embedder": self.x_embedder, "t_embedder": self.t_embedder,
                                      "t_block": self.t_block, "y_embedder": self.y_embedder.y_proj}
        for i, block in enumerate(self.blocks):
            mods[f"blocks.{i}.attn"] = block.attn
            mods[f"blocks.{i}.cross_attn"] = block.cross_attn
            mods[f"blocks.{i}.mlp"] = block.mlp
        mods["final_layer"] = self.final_layer.linear
        return mods

    def stream_head(self) -> nn.Module:
        """The module whose first input is the residual stream after the last block."""
        return self.final_layer


register("pixart", PixArt)
