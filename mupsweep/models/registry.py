"""Model registry: arch name -> class. Registering a name twice is an error."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mupsweep.errors import UserError


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data: shapes, not the data itself."""

    image_size: int
    channels: int
    num_classes: int
    text_dim: int = 0  # caption token embedding size (text-conditioned models)
    text_len: int = 0  # caption tokens per caption


_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str, cls: type[nn.Module]) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__name__}")
    _MODELS[name] = cls


def is_registered(name: str) -> bool:
    """True for a built-in (or registered) architecture name."""
    return name in _MODELS


def get_model_class(name: str) -> type[nn.Module]:
    if name not in _MODELS:
        raise UserError(f"model.arch={name!r} is unknown; built in: {', '.join(sorted(_MODELS))}; "
                        "or your own class as module.path:Class or path/to/file.py:Class")
    return _MODELS[name]
