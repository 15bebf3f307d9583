"""Rows of an array stored in a file, read by position without loading the file: a `.npy` file
or one tensor of a `.safetensors` file, for datasets larger than memory.

Rows are read with `os.pread` at their byte offsets, not through a memory map: the pages a
map touches count in the process's resident memory until it is unmapped, so a long run over a
20 GB mapped file grows towards 20 GB; a read leaves them in the kernel's page cache, which the
kernel reclaims and no process is charged for. The header is parsed once, and a file shorter
than its header says is refused by name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from mupsweep.errors import UserError
from mupsweep.util import first_line

# safetensors' dtype names -> torch dtypes (numpy has no bfloat16, a common latent dtype)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}  # fmt: skip


class FileRows:
    """The rows of one array in `path`: `shape` (rows first), and `read(rows)` -> a float32 or
    integer tensor of those rows, in the order asked for. Picklable (a DataLoader worker gets
    its own copy and opens the file itself)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = path, shape, dtype, offset
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}  # a descriptor does not travel

    def _open(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise UserError(f"{self.path}: unreadable ({first_line(e)})") from None
            self._pid = os.getpid()
        return self._fd

    def read_all(self) -> torch.Tensor:
        """Every row, in one read (a shard's labels)."""
        size = len(self) * self.row_bytes
        chunk = os.pread(self._open(), size, self.offset) if size else b""
        if len(chunk) != size:
            raise UserError(f"{self.path}: truncated (expected {size} bytes of data)")
        out = torch.frombuffer(bytearray(chunk), dtype=self.dtype) if size else torch.empty(0, dtype=self.dtype)
        return out.reshape(self.shape)

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows `rows` (positions in 0..len-1) as one tensor (len(rows), *shape[1:])."""
        fd, size = self._open(), self.row_bytes
        buffer = bytearray(len(rows) * size)
        for i, row in enumerate(np.asarray(rows, dtype=np.int64)):
            chunk = os.pread(fd, size, self.offset + int(row) * size)
            if len(chunk) != size:  # the file shrank after its header was checked
                raise UserError(f"{self.path}: truncated at row {int(row)} "
                                f"(expected {len(self)} rows of {size} bytes)")
            buffer[i * size:(i + 1) * size] = chunk
        out = torch.frombuffer(buffer, dtype=self.dtype) if buffer else torch.empty(0, dtype=self.dtype)
        return out.reshape(len(rows), *self.shape[1:])


def _check_length(path: Path, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = path.stat().st_size
    if found != expected:
        raise UserError(f"{path}: {found} bytes, expected {expected} for an array of shape "
                        f"{shape} ({'truncated' if found < expected else 'trailing bytes'})")


def npy_rows(path: Path) -> FileRows:
    """The rows of a `.npy` file (C order; float or integer), its length checked."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({first_line(e)})") from None
    if fortran_order:
        raise UserError(f"{path}: stored in Fortran order; save it with np.save of a C-order array")
    try:
        torch_dtype = torch.from_numpy(np.zeros(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:
        raise UserError(f"{path}: dtype {dtype} is not a number type") from None
    if dtype.byteorder == (">" if np.little_endian else "<"):
        raise UserError(f"{path}: big-endian dtype {dtype}; save it in native byte order")
    _check_length(path, offset, tuple(shape), torch_dtype)
    return FileRows(path, tuple(shape), torch_dtype, offset)


def safetensors_rows(path: Path, name: str) -> FileRows | None:
    """The rows of tensor `name` in a `.safetensors` file; None when the file has no such tensor.
    The header is the format's own: 8 bytes of little-endian length, then JSON."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size:
                raise ValueError(f"header length {header_len} past the end of the file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable .safetensors file ({first_line(e)})") from None
    entry = header.get(name)
    if entry is None:
        return None
    if entry.get("dtype") not in _SAFETENSORS_DTYPES:
        raise UserError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')}, "
                        f"expected one of {', '.join(_SAFETENSORS_DTYPES)}")
    dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != expected or 8 + header_len + end > path.stat().st_size:
        raise UserError(f"{path}: tensor {name!r} of shape {shape} does not fit the file "
                        "(truncated or damaged)")
    return FileRows(path, shape, dtype, 8 + header_len + begin)
