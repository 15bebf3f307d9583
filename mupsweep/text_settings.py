"""A text model's conditioning settings (`model.extra`): encoder, caption length and sizes.

Apart from the encoders in `mupsweep.text` so that the model files (PixArt-alpha, MMDiT) can
read their caption sizes without importing the encoders and caption loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

from mupsweep.config import ModelConfig
from mupsweep.errors import UserError

ENCODERS = ("hash", "minilm", "file")


@dataclass(frozen=True)
class TextSettings:
    """A text model's conditioning settings, read from `model.extra` with their defaults."""

    encoder: str = "hash"
    file: str | None = None
    dim: int = 64  # caption token embedding size (T5-XXL: 4096, MiniLM: 384)
    length: int = 16  # caption tokens (PixArt-alpha: 120)
    pooled_dim: int = 64  # pooled caption vector (MMDiT; default = dim)


def text_settings(cfg: ModelConfig) -> TextSettings:
    """`cfg.extra`'s text keys, checked: a bad value is a one-line UserError naming its key."""
    x = cfg.extra
    dim = int(x.get("text_dim") or TextSettings.dim)
    s = TextSettings(encoder=str(x.get("text_encoder") or "hash"), file=x.get("text_file"),
                     dim=dim, length=int(x.get("text_len") or TextSettings.length),
                     pooled_dim=int(x.get("pooled_dim") or dim))
    if s.encoder not in ENCODERS:
        raise UserError(f"model.extra.text_encoder={s.encoder!r}: use one of {', '.join(ENCODERS)}")
    for key, value in (("text_dim", s.dim), ("text_len", s.length), ("pooled_dim", s.pooled_dim)):
        if value <= 0:
            raise UserError(f"model.extra.{key}={value} must be a positive integer")
    return s


def text_dims(cfg: ModelConfig, data) -> tuple[int, int]:
    """A text model's (text_dim, text_len) from model.extra; the conditioner's values in the
    DataSpec `data` (0 when the model is built without one, e.g. by `inspect`) must agree."""
    s = text_settings(cfg)
    for key, ours, theirs in (("text_dim", s.dim, data.text_dim), ("text_len", s.length, data.text_len)):
        if theirs and theirs != ours:
            raise ValueError(f"model.extra.{key}={ours} but the caption embeddings have {theirs}")
    return s.dim, s.length
