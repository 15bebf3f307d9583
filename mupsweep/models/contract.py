"""The model contract: what mupsweep calls on a model, and what it derives when a model does not say.

Two kinds of model meet it. mupsweep's own four (dit, uvit, pixart, mmdit) implement
`DiffusionModel` directly and declare their muP roles where each layer is built
(models/layers.py); like a user's class they are built by keyword arguments (sizes, the
softmax scale, CompleteP's residual multiplier: `parametrize.builtin_args`, the one place a
config becomes a model's arguments) and know nothing of mupsweep's config. A user's class
(`model.arch=my_pkg.models:MyDiT` or `path/file.py:MyDiT`, models/user.py) needs none of
that: mupsweep wraps it (`UserModel`) and derives the rest.

A user's class must:

1. be an `nn.Module` built by keyword arguments (`model.args`, whose values may interpolate
   `${model.width}`, `${model.heads}`, `${model.depth}`, `${data.image_size}`,
   `${data.channels}`, `${data.num_classes}`, re-resolved at every width and depth);
2. have a forward mupsweep knows how to call, read off its parameter names
   (`user.FORWARDS`): `forward(x, t, y)` (DiT's: class labels, the null class is
   `num_classes`, so with label dropout its table has num_classes + 1 rows),
   `forward(x, t)` (unconditional), or diffusers' `forward(hidden_states, timestep,
   class_labels, ...)`; it returns (B, C, H, W), or (B, 2C, H, W) when it learns the variance
   (DiT's learn_sigma: mupsweep then adds the VLB term), as a tensor, a tuple whose first item
   is that, or an object with `.sample`;
3. grow with width where muP's rules can see it: every weight whose shape depends on the width
   is built from it (so the models at two widths differ exactly there), the readout is an
   `nn.Linear` (the one layer whose fan-in grows and fan-out does not), no weight is shared by
   two layers;
4. compute attention with `torch.nn.functional.scaled_dot_product_attention`: mupsweep gives
   each call muP's scale. Attention written inline keeps its own fixed 1/sqrt(d) and fails the
   coordinate check, which tune and validate run first on such a model (and refuse);
5. run its forward on the meta device (no `.item()`, no numpy on activations): mupsweep runs it
   there, with nothing computed, to find its attention head dims and count its FLOPs.

What mupsweep derives when the model does not say:

| what                 | derived how                                                        |
|----------------------|--------------------------------------------------------------------|
| muP role, init, lr   | mup's base shapes from the model built at base_width and delta_width |
| readout multiplier   | output_mult / width_mult on the readout's input, zero init          |
| attention scale      | attn_mult * sqrt(base head dim) / head dim on every SDPA call        |
| FLOPs per image      | counted (torch.utils.flop_counter) on a meta copy: mupsweep/flops.py |
| coordinate-check set | every block (the longest nn.ModuleList's children) and the readout  |
| residual stream      | not derived: the depth check (`--depths`) and CompleteP need it      |
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class DiffusionModel(Protocol):
    """What the training loop, the sampler and the checks call on every model."""

    # "label" (cond = {"y": (B,) long}) or "text" (caption tokens, mask and pooled vector:
    # mupsweep.conditioning.TextConditioner)
    conditioning: str

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy input, t (B,) timesteps, drop (B,) bool: samples whose
        conditioning is replaced by the null condition (classifier-free guidance). Returns
        (B, C, H, W), or (B, 2C, H, W) with a learned variance."""
        ...

    def tracked_modules(self) -> dict[str, nn.Module]:
        """Name -> module whose output size the coordinate check records."""
        ...

    def stream_head(self) -> nn.Module | None:
        """The module whose first input is the residual stream after the last block (the depth
        check measures it); None when not known."""
        ...
