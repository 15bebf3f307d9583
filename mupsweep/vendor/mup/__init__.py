"""Microsoft's mup 1.0.0 (Maximal Update Parametrization; github.com/microsoft/mup, MIT
license: LICENSE beside this file), vendored: shape, infshape, init, layer and optim, unchanged
but for relative imports and a docstring per module. Not its coord_check (mupsweep has its own).

Why vendored: the mup distribution on PyPI declares `torchvision` (which it never imports),
and torchvision pins the torch it was built for, so `pip install mup` replaced a user's torch
(measured: torch 2.13.0+cpu -> 2.14.1 with 15 nvidia-* packages, 3 GB) and left a torchvision
that does not import beside a CPU torch (which breaks `import diffusers` and `import timm`).
mup is unmaintained since 2023, so this copy is what every mupsweep install runs.
"""

from .infshape import *  # noqa: F403
from .init import *  # noqa: F403
from .layer import *  # noqa: F403
from .optim import *  # noqa: F403
from .shape import *  # noqa: F403
