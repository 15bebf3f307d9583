"""A model's forward FLOPs per image, counted rather than written by hand.

Every cost figure in mupsweep (a trial's FLOPs, a transfer's target-run estimate) starts from
the forward FLOPs of one image. Hand-written formulas drift from the code they describe and a
user's own model has none, so the count is taken from the model itself: its forward runs once
on a batch of one under `torch.utils.flop_counter.FlopCounterMode`, which adds up the matmuls,
convolutions and attention products it dispatches (2 x m x k x n per product; elementwise ops,
norms and softmax are not counted). Callers count on a model built on the meta device
(`config_flops_per_image`), so nothing is computed or allocated, any width costs the same, and
the real model's forward hooks never see the counting forward. A model may still declare its
own `flops_per_image(spec)`; then that is used.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mupsweep.config import ModelConfig, is_per_member
from mupsweep.errors import UserError
from mupsweep.models import DataSpec


def _cpu_sdpa_flop(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                   *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """The fused CPU attention kernel, which torch's counter does not know (on the meta
    device and on GPUs attention is counted anyway): the same count as its other kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and its floating dtype (CPU float32 for a model with neither)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


def counting_inputs(model: nn.Module, spec: DataSpec,
                    pooled_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x, t, cond) for one image, on the model's device: x (1, C, H, W), t (1,) long, cond as
    `mupsweep.conditioning` makes it: {"y"} for a label model; a text model
    (`conditioning = "text"`) also gets "text" (1, L, text_dim), "mask" (1, L) and "pooled"
    (1, pooled_dim). Caption sizes come from `spec`, else the model's own `text_dim` /
    `text_len` / `pooled_dim`; pooled_dim defaults to text_dim (as model.pooled_dim does)."""
    device, dtype = _device_and_dtype(model)
    x = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=device, dtype=dtype)
    t = torch.zeros(1, dtype=torch.long, device=device)
    cond: dict[str, torch.Tensor] = {"y": torch.zeros(1, dtype=torch.long, device=device)}
    if getattr(model, "conditioning", "label") == "text":
        dim = spec.text_dim or getattr(model, "text_dim", 0)
        length = spec.text_len or getattr(model, "text_len", 0)
        if not (dim and length):
            raise ValueError(f"{type(model).__name__}: a text model's FLOPs need its caption "
                             "sizes (DataSpec.text_dim and text_len)")
        pooled = pooled_dim or getattr(model, "pooled_dim", None) or dim
        cond |= {"text": torch.zeros(1, length, dim, device=device, dtype=dtype),
                 "mask": torch.ones(1, length, dtype=torch.bool, device=device),
                 "pooled": torch.zeros(1, pooled, device=device, dtype=dtype)}
    return x, t, cond


def forward_flops_per_image(model: nn.Module, spec: DataSpec, pooled_dim: int | None = None) -> int:
    """Forward FLOPs of one image through `model` (training is ~3x: `util.training_flops`).

    The model's own `flops_per_image(spec)` if it has one; else counted by running its forward
    (`model(x, t, cond, None)`) once on a batch of one under FlopCounterMode, without grad.
    Pass a model built on the meta device (`config_flops_per_image` does): then nothing is
    computed or allocated. On a real device the forward really runs, hooks included."""
    own = getattr(model, "flops_per_image", None)
    if callable(own):
        return int(own(spec))
    x, t, cond = counting_inputs(model, spec, pooled_dim)
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with torch.no_grad(), counter:
        model(x, t, cond, None)
    return int(counter.get_total_flops())


_CACHE: dict[tuple[str, str, DataSpec], int] = {}


def _shape_key(cfg: ModelConfig) -> str:
    """`cfg` without its per-member keys (init and output multipliers, label dropout): the
    members of one pack differ only in those and share one model shape (mupsweep/group.py),
    so a sweep's trials at one width share one count."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if not is_per_member(f"model.{f.name}")}
    return json.dumps(fields, sort_keys=True, default=repr)


def config_flops_per_image(cfg: ModelConfig, spec: DataSpec) -> int:
    """Forward FLOPs of one image for the model `cfg` builds on `spec`: built on the meta
    device (`parametrize.build_model`, as training builds it, but no memory and no init cost)
    and counted. Cached per model class, shape-relevant config and spec: a sweep counts once
    per proxy width. A config the model cannot be built from raises what build_model raises."""
    from mupsweep.parametrize import build_model
    from mupsweep.text_settings import text_settings

    key = (cfg.arch, _shape_key(cfg), spec)
    if key not in _CACHE:
        with torch.device("meta"):
            model = build_model(cfg, spec, "meta")
        pooled = None
        if getattr(model, "conditioning", "label") == "text":
            try:
                pooled = text_settings(cfg).pooled_dim
            except UserError:  # a user's text model without the text keys: the model's own
                pooled = None
        _CACHE[key] = forward_flops_per_image(model, spec, pooled)
    return _CACHE[key]
