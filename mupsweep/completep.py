"""Depth scaling: CompleteP's factors for a model config, decided in one place.

CompleteP (Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient deep
transformers", arXiv 2505.01618, Table 1) makes the best base HPs stay put as the depth L
grows, with m_L = L / L_base:

| Table 1 row (alpha column)          | factor              | where it is applied here            |
|-------------------------------------|---------------------|-------------------------------------|
| MHA / MLP residual                  | X + m_L^-a Block(X) | `residual_mult`: each block's adds  |
| Pre-LN gain LR, hidden LR, bias LR  | x m_L^(a-1)         | `lr_mult`: params in a residual block |
| AdamW eps (residual blocks)         | x m_L^-a            | `eps_mult`: params in a residual block |
| hidden init var, hidden WD          | no depth factor     | (muP's width factors only)          |
| embed, final LN, unembed            | no depth factor     |                                     |

alpha = 1 is CompleteP, alpha = 0.5 depth-muP (Yang et al. 2023, "Tensor Programs VI"). With
alpha = 1 the lr factor is exactly 1: only the residual branches and eps change.

These depth factors sit on top of today's muP, which is mup's MuAdamW: hidden weights get
lr / m_N and wd x m_N, and eps is NOT scaled with width. Table 1's muP column would also scale
eps by m_N^-1; mup does not, and neither do we, so that at depth == base_depth a completep
model and its optimizer are exactly today's muP model (every factor is 1.0).

A block learns its `residual_mult` where it is built (the model files), and its parameters
are tagged as in a residual block there (`roles.mark_residual_block`); the optimizer reads
`lr_mult` and `eps_mult` from this module and the tags, never from parameter names.
"""

from __future__ import annotations

from dataclasses import dataclass

from mupsweep.config import ModelConfig


@dataclass(frozen=True)
class DepthScale:
    """The depth factors of one model config (all 1.0 under depth_parametrization=none)."""

    enabled: bool  # depth_parametrization == completep
    depth: int  # L
    base_depth: int  # L_base (the depth the tuned HPs belong to)
    alpha: float

    @property
    def depth_mult(self) -> float:
        """m_L = L / L_base."""
        return self.depth / self.base_depth

    @property
    def residual_mult(self) -> float:
        """What every residual branch is multiplied by: m_L^-alpha."""
        return self.depth_mult ** -self.alpha if self.enabled else 1.0

    @property
    def lr_mult(self) -> float:
        """Adam lr factor of every parameter in a residual block: m_L^(alpha - 1)."""
        return self.depth_mult ** (self.alpha - 1.0) if self.enabled else 1.0

    @property
    def eps_mult(self) -> float:
        """AdamW eps factor of every parameter in a residual block: m_L^-alpha. (Its
        gradient shrinks by the same factor, so eps keeps its size relative to it.)"""
        return self.depth_mult ** -self.alpha if self.enabled else 1.0


def base_depth_of(cfg: ModelConfig) -> int:
    """model.base_depth, or the depth itself when it is not set."""
    return cfg.base_depth if cfg.base_depth is not None else cfg.depth


def depth_scale(cfg: ModelConfig) -> DepthScale:
    """The depth factors for `cfg`: Table 1's alpha column under completep, 1.0 otherwise."""
    return DepthScale(enabled=cfg.depth_parametrization == "completep", depth=cfg.depth,
                      base_depth=base_depth_of(cfg), alpha=cfg.depth_alpha)


# Architectures whose depth coordinate check fails under CompleteP, measured with the command
# in each entry: their tuned HPs do not carry across depth, so `tune` and `transfer --depth`
# refuse them before compute is spent (coord-check and validate --depths still run, to show it).
DEPTH_CHECK_FAILS = {
    "uvit": "U-ViT's long skips (skip_linear joins an input-side block's output into the output "
            "side, outside CompleteP's residual branches) fail the depth coordinate check: "
            "`mupsweep coord-check model=uvit-tiny model.depth_parametrization=completep "
            "--depths 3,5,9,17` gives max |slope| 0.48 at out_blocks.0.skip_linear (tolerance 0.3)",
}


def why_depth_transfer_fails(cfg: ModelConfig) -> str | None:
    """Why HPs of `cfg` would not carry across depth (a measured failure of its architecture
    under completep), or None."""
    if cfg.depth_parametrization != "completep":
        return None
    return DEPTH_CHECK_FAILS.get(cfg.arch)
