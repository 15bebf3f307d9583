"""A group's training images: held on the device (`ImagesInMemory`), or read from disk batch by
batch (`StreamedImages`, for a dataset left on disk: `data.stream`).

Which images a step trains on is drawn the same way for both (`batches.draw_indices` from each
member's gen_index, in the training loop), so a streamed run trains on exactly the batches of
an in-memory one: under DDP (every rank draws the whole global batch and reads only its rows)
and after a resume (the loader starts from the restored generators). A DataLoader's workers
read the batches of the coming steps while the model trains on this one; they run ahead on
copies of the generators, every batch they deliver carries its positions, and the step checks
those against its own draw, so the two can never silently part.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mupsweep.batches import draw_indices, to_device
from mupsweep.data import LazyImages
from mupsweep.errors import UserError


class ImagesInMemory:
    """Every training image on the device; a step's rows are gathered there."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.images = images.to(device)  # (N, C, H, W)
        self.device = device

    def __len__(self) -> int:
        return self.images.shape[0]

    def rows(self, idx: torch.Tensor, members: list[int]) -> torch.Tensor:
        """(K, b, C, H, W) on the device: images idx (K, b), one row of idx per member."""
        return self.images[to_device(idx, self.device)]

    def close(self) -> None:
        pass


class _StepPositions(Sampler):
    """For each coming step, every member's positions on this rank: (K, b), drawn from copies
    of the members' gen_index as the step will draw them."""

    def __init__(self, generators: list[torch.Generator], num_images: int, batch_size: int,
                 local: slice):
        self.states = [g.get_state() for g in generators]
        self.num_images, self.batch_size, self.local = num_images, batch_size, local

    def __iter__(self):
        generators = [torch.Generator().set_state(state) for state in self.states]
        while True:
            yield np.stack([draw_indices(self.num_images, self.batch_size, g)[self.local].numpy()
                            for g in generators])


class _ReadRows(Dataset):
    """positions (K, b) -> (positions, images (K, b, C, H, W)), or (positions, the one-line
    message of a bad input): a worker's exception reaches the training process wrapped in its
    traceback, so the message travels as a value and is raised there."""

    def __init__(self, images: LazyImages):
        self.images = images

    def __getitem__(self, positions: np.ndarray) -> tuple[np.ndarray, torch.Tensor | str]:
        try:
            x = self.images[positions.reshape(-1)]
        except UserError as e:
            return positions, str(e)
        return positions, x.reshape(*positions.shape, *x.shape[1:])


class StreamedImages:
    """Training images read from disk ahead of the steps that need them (`data.num_workers`
    processes; pinned memory on CUDA)."""

    def __init__(self, images: LazyImages, generators: list[torch.Generator], batch_size: int,
                 local: slice, num_workers: int, device: torch.device):
        self.device = device
        self.num_images = len(images)
        loader = DataLoader(
            _ReadRows(images), batch_size=None,
            sampler=_StepPositions(generators, len(images), batch_size, local),
            num_workers=num_workers, pin_memory=device.type == "cuda",
            prefetch_factor=2 if num_workers else None,
        )
        self._batches = iter(loader)

    def __len__(self) -> int:
        return self.num_images

    def rows(self, idx: torch.Tensor, members: list[int]) -> torch.Tensor:
        """(K, b, C, H, W) on the device: images idx (K, b) of the members at positions
        `members` of the loader's (those that left the group are read and dropped)."""
        positions, x = next(self._batches)
        if isinstance(x, str):
            raise UserError(x)
        if not torch.equal(torch.as_tensor(positions)[members], idx):
            raise RuntimeError("the streamed batch is not the step's: the loader's generators "
                               "parted from the members' (a bug in mupsweep)")
        if len(members) < x.shape[0]:  # members stay in order: fewer means some left
            x = x[members]  # (a copy, no longer pinned: only after a member left a pack)
        return x.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the workers."""
        del self._batches
