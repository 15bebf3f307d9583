"""MMDiT (Esser et al. 2024, Stable Diffusion 3) in muP and SP: two streams, joint attention.

Image tokens and caption tokens keep separate weights (adaLN modulation, qkv, proj, MLP) and
meet in one attention over their concatenation, with RMS QK-norm per head. The conditioning
vector c = timestep embedding + pooled-caption embedding drives every adaLN. Trained with
rectified flow (the presets set diffusion.kind=rectified_flow). The last block's caption stream
is "pre-only" (as SD3): it gives keys/values but its own output is never used, so it has no
proj/MLP. Caption dropout (CFG) zeroes the caption tokens and the pooled vector, as SD3 does.

muP roles (docs/design.md section 3), decided by the helper that builds each layer:
- input: patch embed, timestep MLP first linear (256 -> D), context embedder
  (text_dim -> D), pooled-text embedder first linear (pooled_dim -> D);
- hidden: every qkv/proj/MLP/adaLN modulation of both streams, the timestep and pooled MLPs'
  second linears (D -> D), the final adaLN;
- output: final linear (MuReadout, zero init);
- vector: biases and the QK-norm gains (head_dim, per head, shared across heads).
Attention scale: `layers.attention_scale` (muP 1/d anchored at the base head_dim). SP =
SD3/DiT-style init: xavier linears, N(0, 0.02) embedder MLPs, adaLN-zero, zero readout.

Depth (mupsweep/completep.py): both streams of every joint block add their attention and MLP
branches with the block's residual multiplier; all of a joint block's parameters are in a
residual block (the last block's pre-only caption stream too: its keys and values feed the
image stream's attention branch). Embedders and the final layer are not.
"""

from __future__ import annotations

import torch
from torch import nn

from mupsweep.models.layers import (
    FinalLayer,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    attention,
    attention_scale,
    gain,
    get_2d_sincos_pos_embed,
    hidden_linear,
    input_linear,
    key_mask,
    modulate,
    residual,
    rms_norm,
    unpatchify,
)
from mupsweep.models.registry import register
from mupsweep.roles import mark_residual_block


class StreamBlock(nn.Module):
    """One stream's half of a joint block: adaLN, qkv with QK-norm, then (unless pre_only)
    proj and MLP applied to that stream's slice of the joint attention output."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float, pre_only: bool = False,
                 residual_mult: float = 1.0):
        super().__init__()
        self.num_heads, self.head_dim, self.pre_only = width // head_dim, head_dim, pre_only
        self.residual_mult = residual_mult  # CompleteP's m_L^-alpha on both branches
        n_mod = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), hidden_linear(width, n_mod * width, adaln=True))
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = hidden_linear(width, 3 * width)
        self.ln_q, self.ln_k = gain(head_dim), gain(head_dim)  # RMS QK-norm gains
        if not pre_only:
            self.proj = hidden_linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(width, int(width * mlp_ratio))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> q, k, v (B, heads, L, head_dim) and the modulation left for post_attention."""
        mod = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)  # each (B, D)
        B, L, _ = x.shape
        qkv = self.qkv(modulate(self.norm1(x), mod[0], mod[1]))
        q, k, v = qkv.reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return rms_norm(q, self.ln_q), rms_norm(k, self.ln_k), v, mod[2:]

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor,
                       mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = residual(x, gate_msa.unsqueeze(1) * self.proj(attn), self.residual_mult)
        mlp = gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return residual(x, mlp, self.residual_mult)


class JointBlock(nn.Module):
    """Caption stream + image stream, one attention over [caption; image] tokens."""

    def __init__(self, width: int, head_dim: int, mlp_ratio: float, attn_scale: float,
                 last: bool = False, residual_mult: float = 1.0):
        super().__init__()
        self.scale = attn_scale
        self.context_block = StreamBlock(width, head_dim, mlp_ratio, pre_only=last,
                                         residual_mult=residual_mult)
        self.x_block = StreamBlock(width, head_dim, mlp_ratio, residual_mult=residual_mult)
        mark_residual_block(self)

    def forward(self, ctx: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ctx: (B, Lc, D), x: (B, N, D), mask: (B, Lc + N) bool, c: (B, D)."""
        qc, kc, vc, mod_c = self.context_block.pre_attention(ctx, c)
        qx, kx, vx, mod_x = self.x_block.pre_attention(x, c)
        q, k, v = torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2)
        out = attention(q, k, v, self.scale, key_mask(mask))
        B, Lc, D = ctx.shape
        out = out.transpose(1, 2).reshape(B, -1, D)  # (B, Lc + N, D)
        x = self.x_block.post_attention(x, out[:, Lc:], mod_x)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(ctx, out[:, :Lc], mod_c), x


class MMDiT(nn.Module):
    """SD3-style multimodal diffusion transformer (rectified flow)."""

    conditioning = "text"

    def __init__(self, image_size: int, in_channels: int, text_dim: int, text_len: int,
                 pooled_dim: int, width: int, depth: int, head_dim: int, patch_size: int = 2,
                 mlp_ratio: float = 4.0, learn_sigma: bool = False,
                 attn_scale: float | None = None, residual_mult: float = 1.0):
        """As DiT's, with captions of text_len tokens of text_dim and a pooled caption vector
        of pooled_dim instead of labels."""
        super().__init__()
        self.text_dim, self.text_len, self.pooled_dim = text_dim, text_len, pooled_dim
        D, p = width, patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = p
        scale = attention_scale(head_dim) if attn_scale is None else attn_scale

        self.x_embedder = PatchEmbed(image_size, p, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Sequential(  # pooled caption -> D (SD3's VectorEmbedder)
            input_linear(self.pooled_dim, D, sp_init="normal"), nn.SiLU(),
            hidden_linear(D, D, sp_init="normal"))
        self.context_embedder = input_linear(self.text_dim, D)
        grid = image_size // p
        pos = torch.from_numpy(get_2d_sincos_pos_embed(D, grid)).float().unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)  # (1, N, D), fixed
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, head_dim, mlp_ratio, scale, last=i == depth - 1,
                       residual_mult=residual_mult)
            for i in range(depth))
        self.final_layer = FinalLayer(D, p, self.out_channels)  # as DiT's: adaLN norm + readout

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) (rectified flow: t in [0, num_timesteps)),
        cond["text"]: (B, L, text_dim), cond["mask"]: (B, L) bool, cond["pooled"]: (B, Dp),
        drop: (B,) bool, True where the caption is zeroed (CFG)."""
        text, mask, pooled = cond["text"], cond["mask"], cond["pooled"]
        if drop is not None:  # SD3: a dropped caption's encodings are zero, all tokens attended
            keep = (~drop).to(text.dtype)
            text, pooled = text * keep[:, None, None], pooled * keep[:, None]
            mask = mask | drop[:, None]
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(pooled)  # (B, D)
        ctx = self.context_embedder(text)  # (B, L, D)
        joint_mask = torch.cat([mask, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)], 1)
        for block in self.joint_blocks:
            ctx, x = block(ctx, x, joint_mask, c)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return unpatchify(x, self.out_channels, self.patch_size)

    def tracked_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"x_embedder": self.x_embedder, "t_embedder": self.t_embedder,
                                      "y_embedder": self.y_embedder,
                                      "context_embedder": self.context_embedder}
        for i, block in enumerate(self.joint_blocks):
            for stream, sb in (("x", block.x_block), ("context", block.context_block)):
                mods[f"joint_blocks.{i}.{stream}.qkv"] = sb.qkv
                mods[f"joint_blocks.{i}.{stream}.adaLN"] = sb.adaLN_modulation
                if not sb.pre_only:
                    mods[f"joint_blocks.{i}.{stream}.proj"] = sb.proj
                    mods[f"joint_blocks.{i}.{stream}.mlp"] = sb.mlp
        mods["final_layer"] = self.final_layer.linear
        return mods

    def stream_head(self) -> nn.Module:
        """The module whose first input is the (image) residual stream after the last block."""
        return self.final_layer


register("mmdit", MMDiT)
