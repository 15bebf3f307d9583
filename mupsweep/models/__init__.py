"""Diffusion transformer models. Importing this package registers every architecture."""

from mupsweep.models import dit  # noqa: F401  (registers "dit")
from mupsweep.models.registry import DataSpec, get_model_class, register

__all__ = ["DataSpec", "get_model_class", "register"]
