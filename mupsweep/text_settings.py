"""A text model's conditioning settings (`model.extra`): encoder, caption length and sizes.

Apart from the encoders in `mupsweep.conditioning` so that the model files (PixArt-alpha, MMDiT) can
read their caption sizes without importing the encoders and caption loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

from mupsweep.config import ModelConfig, model_extra
from mupsweep.errors import UserError


@dataclass(frozen=True)
class TextSettings:
    """A text model's conditioning settings, read from `model.extra` (whose keys, defaults and
    valid values are `mupsweep.config.EXTRA_KEYS`)."""

    encoder: str  # hash | minilm | file
    file: str | None  # text_encoder=file: the embeddings
    dim: int  # caption token embedding size (T5-XXL: 4096, MiniLM: 384)
    length: int  # caption tokens (PixArt-alpha: 120)
    pooled_dim: int  # pooled caption vector (MMDiT; default = dim)


def text_settings(cfg: ModelConfig) -> TextSettings:
    """`cfg.extra`'s text keys, checked by `model_extra` as check_config checks them: a bad value
    is a one-line UserError naming its key, never a default put in its place."""
    x = model_extra(cfg)
    if "text_dim" not in x:  # an architecture that reads no captions
        raise UserError(f"model.arch={cfg.arch} takes no text settings")
    pooled = x["pooled_dim"] if x["pooled_dim"] is not None else x["text_dim"]
    return TextSettings(encoder=x["text_encoder"], file=x["text_file"], dim=x["text_dim"],
                        length=x["text_len"], pooled_dim=pooled)


def text_dims(cfg: ModelConfig, data) -> tuple[int, int]:
    """A text model's (text_dim, text_len) from model.extra; the conditioner's values in the
    DataSpec `data` (0 when the model is built without one, e.g. by `inspect`) must agree."""
    s = text_settings(cfg)
    for key, ours, theirs in (("text_dim", s.dim, data.text_dim), ("text_len", s.length, data.text_len)):
        if theirs and theirs != ours:
            raise ValueError(f"model.extra.{key}={ours} but the caption embeddings have {theirs}")
    return s.dim, s.length
