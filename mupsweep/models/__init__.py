"""Diffusion transformer models. Importing this package registers every architecture."""

from mupsweep.models import dit, mmdit, pixart, uvit  # noqa: F401  (each registers itself)
from mupsweep.models.registry import DataSpec, get_model_class, register

__all__ = ["DataSpec", "get_model_class", "register"]
