"""A caption model's conditioning settings (`model.text_*`): encoder, caption length and sizes.

Apart from the encoders in `mupsweep.conditioning` so that `parametrize` and `flops` can read
the caption sizes without importing the encoders and caption loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

from mupsweep.config import ModelConfig


@dataclass(frozen=True)
class TextSettings:
    """A caption model's conditioning settings, read from the model keys (whose defaults and
    valid values the schema declares, and check_config checks)."""

    encoder: str  # hash | minilm | file
    file: str | None  # text_encoder=file: the embeddings
    dim: int  # caption token embedding size (T5-XXL: 4096, MiniLM: 384)
    length: int  # caption tokens (PixArt-alpha: 120)
    pooled_dim: int  # pooled caption vector (MMDiT; default = dim)


def text_settings(cfg: ModelConfig) -> TextSettings:
    """`cfg`'s caption settings, model.pooled_dim's null read as the text_dim."""
    pooled = cfg.pooled_dim if cfg.pooled_dim is not None else cfg.text_dim
    return TextSettings(encoder=cfg.text_encoder, file=cfg.text_file, dim=cfg.text_dim,
                        length=cfg.text_len, pooled_dim=pooled)


def text_dims(cfg: ModelConfig, data) -> tuple[int, int]:
    """A caption model's (text_dim, text_len) from its keys; the conditioner's values in the
    DataSpec `data` (0 when the model is built without one, e.g. by `inspect`) must agree."""
    s = text_settings(cfg)
    for key, ours, theirs in (("text_dim", s.dim, data.text_dim), ("text_len", s.length, data.text_len)):
        if theirs and theirs != ours:
            raise ValueError(f"model.{key}={ours} but the caption embeddings have {theirs}")
    return s.dim, s.length
