"""Datasets: open a dataset, split it into train / validation, and hold each split in memory
or leave it on disk to be read batch by batch.

Every dataset goes through the same three steps:

1. a loader from the `DATASETS` registry opens the source and returns a `_Pool`: every item's
   label, the class names, one image's shape, and a `read(positions)` that decodes just those
   images;
2. `split_indices` shuffles 0..N-1 with `cfg.split_seed`, keeps `cfg.max_items`, and cuts off
   the validation tail, so the same config always gives the same split;
3. `load_dataset` returns an `ImageDataset`: the labels in memory, and each split's images as a
   float32 tensor (`data.stream=never`, and `auto` for a set under `IN_MEMORY_LIMIT_BYTES`) or
   as `LazyImages` read when indexed (`always`, and `auto` for a large set on disk). Training
   reads lazy images through a DataLoader (`mupsweep.streamed`); the same positions give the
   same images either way, so a run's result does not depend on the choice.

Images are scaled to [-1, 1] (the range the diffusion code assumes); latents are returned as
stored times `cfg.latent_scale`. Nothing here touches the network. Every bad input raises a
one-line `UserError` naming the path or key and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mupsweep.array_files import FileRows, npy_rows, safetensors_rows
from mupsweep.config import DataConfig
from mupsweep.errors import UserError
from mupsweep.util import first_line
from mupsweep.vae import RECORD, recorded_latent_scale

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


UNCONDITIONAL = "unconditional"  # the one class of data.unconditional=true

# A split of more than this (as float32) is left on disk under data.stream=auto.
IN_MEMORY_LIMIT_BYTES = 2 * 2**30


class LazyImages:
    """One split's images left where they are stored, decoded when indexed: `images[idx]` gives
    the float32 tensor an in-memory split's `images[idx]` gives. For a dataset too large to hold
    in memory; picklable, so DataLoader workers read it in parallel."""

    def __init__(self, read: Callable[[np.ndarray], torch.Tensor], positions: np.ndarray,
                 item_shape: tuple[int, int, int]):
        self.read = read  # pool positions -> (n, C, H, W) float32
        self.positions = positions  # (N,) this split's items, as positions in the pool
        self.shape = torch.Size((len(positions), *item_shape))
        self.ndim, self.dtype = 4, torch.float32

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.read(self.positions[np.asarray(idx)])


@dataclass
class ImageDataset:
    """A dataset split into train and validation: labels in memory, images in memory (a
    tensor) or on disk (`LazyImages`, read when indexed)."""

    train_images: torch.Tensor | LazyImages  # (N, C, H, W) float32 in [-1, 1] (latents: stored * latent_scale)
    train_labels: torch.Tensor  # (N,) int64 class ids in [0, num_classes)
    val_images: torch.Tensor | LazyImages
    val_labels: torch.Tensor
    class_names: list[str]  # human names, e.g. "zero".."nine" for digits

    def __post_init__(self) -> None:
        # Internal invariants (loaders turn bad *input* into UserError before we get here).
        for images, labels in ((self.train_images, self.train_labels),
                               (self.val_images, self.val_labels)):
            if images.ndim != 4 or images.shape[2] != images.shape[3]:
                raise ValueError(f"images must be (N, C, H, H), got {tuple(images.shape)}")
            if labels.shape != (images.shape[0],):
                raise ValueError(f"labels {tuple(labels.shape)} do not match {tuple(images.shape)}")
        if self.train_images.shape[1:] != self.val_images.shape[1:]:
            raise ValueError("train and validation images differ in shape")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])


# --------------------------------------------------------------------------------------------
# Pools and the split
# --------------------------------------------------------------------------------------------


@dataclass
class _Pool:
    """Every item of a dataset before the split: all labels (8 bytes an item), and `read`,
    which decodes only the images asked for."""

    labels: np.ndarray  # (N,) int64 class ids
    class_names: list[str]
    item_shape: tuple[int, int, int]  # (C, H, W) of one image
    read: Callable[[np.ndarray], torch.Tensor]  # positions -> (n, C, H, W) float32
    on_disk: bool  # read from files (may be left there), not from arrays already in memory

    @property
    def size(self) -> int:
        return len(self.labels)


class _ArrayRead:
    """`read` of images already in memory (a class, not a closure: workers unpickle it)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __call__(self, positions: np.ndarray) -> torch.Tensor:
        return self.images[torch.as_tensor(positions, dtype=torch.int64)].contiguous()


def _array_pool(images: np.ndarray | torch.Tensor, labels: np.ndarray,
                class_names: list[str]) -> _Pool:
    """A pool over arrays already in memory (images float32, already scaled)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    return _Pool(np.asarray(labels, dtype=np.int64), class_names, tuple(images.shape[1:]),
                 _ArrayRead(images), on_disk=False)


def split_indices(n: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of 0..n-1 -> (train, val) indices; depends on n and the config only."""
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.max_items is not None and cfg.max_items <= 0:
        raise UserError(f"data.max_items={cfg.max_items} must be a positive integer (or null)")
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    if cfg.max_items is not None:
        order = order[: cfg.max_items]
    n_val = max(1, round(cfg.val_fraction * len(order)))
    if len(order) - n_val < 1:
        raise UserError(
            f"data.name={cfg.name}: {len(order)} item(s) cannot be split into train and validation "
            f"with data.val_fraction={cfg.val_fraction}; need at least 2 items"
        )
    return order[:-n_val], order[-n_val:]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _uint8_to_unit(x: np.ndarray) -> np.ndarray:
    """0..255 -> [-1, 1] float32."""
    return x.astype(np.float32) / 127.5 - 1.0


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize square (N, C, H, H) images to size x size; antialias so downscaling does not alias."""
    if size is None or size == images.shape[-1]:
        return images
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.clamp(-1.0, 1.0)  # bilinear cannot overshoot, but keep the range contract exact


def _check_image_size(cfg: DataConfig) -> None:
    if cfg.image_size is not None and cfg.image_size <= 0:
        raise UserError(f"data.image_size={cfg.image_size} must be a positive integer (or null)")


class _ResizedRead:
    def __init__(self, read: Callable[[np.ndarray], torch.Tensor], size: int):
        self.inner, self.size = read, size

    def __call__(self, positions: np.ndarray) -> torch.Tensor:
        return _resize(self.inner(positions), self.size)


def _resized_pool(pool: _Pool, size: int | None) -> _Pool:
    """Wrap a pool of pixel images so `read` returns them resized to `size`."""
    if size is None:
        return pool
    return dataclasses.replace(pool, item_shape=(pool.item_shape[0], size, size),
                               read=_ResizedRead(pool.read, size))


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 digits (no files, no network)
# --------------------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig) -> _Pool:
    """1797 8x8 grayscale digits shipped inside scikit-learn; values 0..16."""
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    pool = _array_pool(images, digits.target, list(DIGIT_NAMES))
    return _resized_pool(pool, cfg.image_size)


# --------------------------------------------------------------------------------------------
# fashion_mnist: the standard idx files, parsed here (train + t10k pooled, our own split)
# --------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims (N, rows, cols)
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim (N,)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_file(root: Path, stem: str) -> Path:
    """`stem.gz` or the un-gzipped `stem` inside root."""
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"data.root={root}: missing {stem}.gz (or {stem}); "
                    "fashion_mnist expects the four idx files train-*/t10k-* there")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one idx file (gzipped or not) of unsigned bytes; check magic number and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # truncated / not gzip / unreadable
        raise UserError(f"{path}: not a readable idx file ({first_line(e)})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated idx header (expected at least {header} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise UserError(f"{path}: idx magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError(f"{path}: {len(raw)} bytes, expected {expected} for idx dims {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(cfg: DataConfig) -> _Pool:
    """Fashion-MNIST: 70k 28x28 grayscale clothes; train and t10k pooled before our split."""
    root = _require_root(cfg)
    images, labels = [], []
    for image_stem, label_stem in _FASHION_FILES.values():
        image_path = _find_idx_file(root, image_stem)
        label_path = _find_idx_file(root, label_stem)
        x = read_idx(image_path, _IDX_IMAGES_MAGIC)
        y = read_idx(label_path, _IDX_LABELS_MAGIC)
        if len(x) != len(y):
            raise UserError(f"{label_path}: {len(y)} labels, expected {len(x)} "
                            f"(one per image in {image_path.name})")
        if x.shape[1] != x.shape[2]:
            raise UserError(f"{image_path}: images are {x.shape[1]}x{x.shape[2]}, expected square")
        if len(y) and y.max() >= len(FASHION_NAMES):
            raise UserError(f"{label_path}: label {int(y.max())}, expected 0..9")
        images.append(x)
        labels.append(y)
    if images[0].shape[1:] != images[1].shape[1:]:
        raise UserError(f"data.root={root}: train and t10k images differ in size")
    pixels = _uint8_to_unit(np.concatenate(images))[:, None]
    pool = _array_pool(pixels, np.concatenate(labels), list(FASHION_NAMES))
    return _resized_pool(pool, cfg.image_size)


# --------------------------------------------------------------------------------------------
# image_folder: root/<class>/<image>, class ids from sorted folder names
# --------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_image_folder(root: Path, what: str = "data.root=") -> tuple[list[Path], list[int], list[str]]:
    """All image files under root/<class>/ with their class ids; hidden entries ignored. A
    folder of images without class sub-folders is one class, named after it (unconditional
    data). `what` names root in an error ("data.root=", or "" for a command's argument)."""
    if not root.is_dir():
        raise UserError(f"{what}{root}: not a directory "
                        "(expected a folder of class sub-folders of images)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        files = _images_in(root)
        if not files:
            raise UserError(f"{what}{root}: no class sub-folders and no images (expected "
                            f"root/<class name>/<image files>, or {'/'.join(IMAGE_EXTENSIONS)} "
                            "files in root for one class)")
        return files, [0] * len(files), [root.name]
    paths, labels = [], []
    for class_id, name in enumerate(classes):
        files = _images_in(root / name)
        if not files:  # an empty class would still count in num_classes; refuse it
            raise UserError(f"{root / name}: no images (expected {'/'.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [class_id] * len(files)
    return paths, labels, classes


def read_image(path: Path, size: int, grayscale: bool) -> np.ndarray:
    """Decode, center-crop to a square, resize -> (C, size, size) float32 in [-1, 1]."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
            img = img.convert("L" if grayscale else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = f"{type(e).__name__}: {first_line(e)}"
        raise UserError(f"{path}: unreadable image ({reason})") from None
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    # PIL's bicubic widens its filter when shrinking, so this downscale is antialiased.
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.uint8)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # HWC -> CHW
    return _uint8_to_unit(x)


class _FolderRead:
    """`read` of an image folder: decode, crop and resize the images asked for."""

    def __init__(self, paths: list[Path], size: int, grayscale: bool):
        self.paths, self.size, self.grayscale = paths, size, grayscale

    def __call__(self, positions: np.ndarray) -> torch.Tensor:
        if len(positions) == 0:
            return torch.empty(0, 1 if self.grayscale else 3, self.size, self.size)
        return torch.from_numpy(np.stack([read_image(self.paths[i], self.size, self.grayscale)
                                          for i in positions]))


def _load_image_folder(cfg: DataConfig) -> _Pool:
    """A folder of class sub-folders; only the images asked for are decoded."""
    root = _require_root(cfg)
    paths, labels, classes = list_image_folder(root)
    size = cfg.image_size or 32
    channels = 1 if cfg.grayscale else 3
    return _Pool(np.asarray(labels, dtype=np.int64), classes, (channels, size, size),
                 _FolderRead(paths, size, cfg.grayscale), on_disk=True)


# --------------------------------------------------------------------------------------------
# latents: pre-extracted VAE latents (.npz, .safetensors, or a dir of latents.npy + labels.npy)
# --------------------------------------------------------------------------------------------


def read_named_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays named `keys` that a .npz or .safetensors file holds (absent keys are left
    out; the caller says which it needs). Floats come back as float32-or-wider numpy arrays."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in keys if k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise UserError(f"{path}: not a readable .npz file ({first_line(e)})") from None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{path}: not a readable .safetensors file ({first_line(e)})") from None
        # via torch: numpy has no bfloat16, which is a common dtype for stored latents
        return {k: (t.float() if t.is_floating_point() else t).numpy()
                for k, t in tensors.items() if k in keys}
    raise UserError(f"{path}: expected a .npz or .safetensors file")


class _LatentRead:
    """`read` of stored latents: rows of one or more shards (`array_files.FileRows`) as
    float32 times data.latent_scale; a row that is not finite is refused by file and row."""

    def __init__(self, shards: list[FileRows], scale: float):
        self.shards, self.scale = shards, scale
        self.starts = np.cumsum([0] + [len(shard) for shard in shards])  # shard k: starts[k]..

    def __call__(self, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        out = torch.empty(len(positions), *self.shards[0].shape[1:])
        shard_of = np.searchsorted(self.starts, positions, side="right") - 1
        for k in np.unique(shard_of):
            where = np.nonzero(shard_of == k)[0]
            rows = self.shards[k].read(positions[where] - self.starts[k]).float()
            finite = torch.isfinite(rows).flatten(1).all(dim=1)
            if not finite.all():
                row = int(positions[where][~finite.numpy()][0] - self.starts[k])
                raise UserError(f"{self.shards[k].path}: latents contain NaN or inf (row {row})")
            out[torch.from_numpy(where)] = rows * self.scale
        return out


LATENT_LAYOUTS = ("a .npz / .safetensors file with 'latents' and 'labels', or a directory with "
                  "latents.npy and labels.npy, or shards latents-00000.npy, labels-00000.npy, ...")


def _latent_shards(root: Path) -> list[tuple[FileRows, FileRows]]:
    """(latents, labels) rows of every shard of `root`, in the order of their names: a
    directory's latents*.npy files, each with the labels*.npy of the same suffix, or one
    .safetensors file."""
    if root.is_dir():
        files = sorted(root.glob("latents*.npy"))
        if not files:
            raise UserError(f"{root / 'latents.npy'}: not found (a latents directory holds "
                            "latents.npy (N,C,H,W) and labels.npy (N,), or shards "
                            "latents-00000.npy + labels-00000.npy, ...)")
        pairs = []
        for path in files:
            labels_path = path.with_name("labels" + path.name[len("latents"):])
            if not labels_path.is_file():
                raise UserError(f"{labels_path}: not found (the labels of {path.name})")
            pairs.append((npy_rows(path), npy_rows(labels_path)))
        return pairs
    if root.suffix == ".safetensors":
        latents, labels = safetensors_rows(root, "latents"), safetensors_rows(root, "labels")
        for key, rows in (("latents", latents), ("labels", labels)):
            if rows is None:
                raise UserError(f"{root}: no array named {key!r} (expected 'latents' (N,C,H,W) "
                                "and 'labels' (N,))")
        return [(latents, labels)]
    raise UserError(f"data.root={root}: expected {LATENT_LAYOUTS}")


def _check_latent_shapes(path: Path, shape: tuple[int, ...], labels_shape: tuple[int, ...],
                         first: tuple[Path, tuple[int, ...]] | None) -> None:
    """One shard's shapes: (N, C, H, H) latents with (N,) labels, and rows shaped as the first
    shard's."""
    if len(shape) != 4:
        raise UserError(f"{path}: latents have shape {shape}, expected 4 dims (N,C,H,W)")
    if shape[2] != shape[3]:
        raise UserError(f"{path}: latents are {shape[2]}x{shape[3]}, expected square (H == W)")
    if len(labels_shape) != 1:
        raise UserError(f"{path}: labels have shape {labels_shape}, expected 1 dim (N,)")
    if labels_shape[0] != shape[0]:
        raise UserError(f"{path}: {labels_shape[0]} labels for {shape[0]} latents, "
                        "expected one label per latent")
    if shape[0] == 0:
        raise UserError(f"{path}: no latents (an empty shard)")
    if first is not None and shape[1:] != first[1][1:]:
        raise UserError(f"{path}: latents of shape {shape[1:]} per item, but {first[0].name} "
                        f"has {first[1][1:]}: every shard must hold latents of one shape")


def _check_labels(path: Path, labels: np.ndarray) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels have dtype {labels.dtype}, expected integers")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{path}: label {int(labels.min())}, expected class ids >= 0")


def _latent_class_names(root: Path, num_labels: int) -> list[str]:
    """Names from class_names.txt beside the file / in the directory, else "class i"."""
    path = (root if root.is_dir() else root.parent) / "class_names.txt"
    if not path.is_file():
        return [f"class {i}" for i in range(num_labels)]
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:  # tolerate trailing blank lines
        names.pop()
    if len(names) < num_labels:
        raise UserError(f"{path}: {len(names)} class names, expected at least {num_labels} "
                        "(one per line, for labels 0..max label)")
    return names


def _load_latents(cfg: DataConfig) -> _Pool:
    """Pre-extracted latents, scaled by `cfg.latent_scale` (SD VAE: 0.18215). A .npz is read
    whole; .npy shards and .safetensors are left on disk and read a row at a time."""
    root = _require_root(cfg)
    recorded = recorded_latent_scale(root)
    if recorded is not None and not math.isclose(cfg.latent_scale, recorded, rel_tol=1e-6):
        raise UserError(f"data.latent_scale={cfg.latent_scale:g}: {root} was encoded by a VAE "
                        f"whose scaling factor is {recorded:g} ({RECORD}); set "
                        f"data.latent_scale={recorded:g}")
    if root.suffix == ".npz":
        arrays = read_named_arrays(root, ("latents", "labels"))
        for key in ("latents", "labels"):
            if key not in arrays:
                raise UserError(f"{root}: no array named {key!r} (expected 'latents' (N,C,H,W) "
                                "and 'labels' (N,))")
        shards = [(root, arrays["latents"].shape, root, arrays["labels"])]
    else:
        files = _latent_shards(root)
        shards = [(latents.path, latents.shape, labels.path,
                   labels.read_all().numpy()) for latents, labels in files]
    first = None
    for path, shape, labels_path, labels in shards:
        _check_latent_shapes(path, tuple(shape), labels.shape, first)
        _check_labels(labels_path, labels)
        first = first or (path, tuple(shape))
    item_shape = tuple(first[1][1:])
    if cfg.image_size is not None and cfg.image_size != item_shape[-1]:
        raise UserError(f"data.image_size={cfg.image_size}: latents cannot be resized; "
                        f"use null (stored latents are {item_shape[-1]}x{item_shape[-1]})")
    labels = np.concatenate([labels for *_, labels in shards]).astype(np.int64)
    names = _latent_class_names(root, int(labels.max()) + 1)
    if root.suffix == ".npz":
        latents = arrays["latents"]
        if not np.isfinite(latents).all():
            raise UserError(f"{root}: latents contain NaN or inf")
        scaled = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)) * cfg.latent_scale
        return _array_pool(scaled, labels, names)
    read = _LatentRead([latents for latents, _ in files], cfg.latent_scale)
    return _Pool(labels, names, item_shape, read, on_disk=True)


# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    load: Callable[[DataConfig], _Pool]
    expects: str  # what data.root should be, for error messages
    default_root: str | None = None
    # A built-in set's (image_size, channels, num_classes), known without loading it (a FLOP
    # estimate needs no data); its captions come from `default_captions`. None: user data.
    builtin_shape: tuple[int, int, int] | None = None


DATASETS: dict[str, _Source] = {
    "digits": _Source(_load_digits, "no files (bundled with scikit-learn)",
                      builtin_shape=(8, 1, 10)),
    "fashion_mnist": _Source(
        _load_fashion_mnist,
        "the idx .gz files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        default_root="/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
        builtin_shape=(28, 1, 10),
    ),
    "image_folder": _Source(_load_image_folder, "a folder of class sub-folders of images"),
    "latents": _Source(_load_latents, LATENT_LAYOUTS),
}


def builtin_shape(name: str) -> tuple[int, int, int] | None:
    """(image_size, channels, num_classes) of a built-in dataset; None for the user's data."""
    source = DATASETS.get(name)
    return source.builtin_shape if source is not None else None


def _require_root(cfg: DataConfig) -> Path:
    """cfg.root (or the dataset's default), which must exist."""
    source = DATASETS[cfg.name]
    root = cfg.root or source.default_root
    if root is None:
        raise UserError(f"data.root is not set ({cfg.name} expects {source.expects})")
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"data.root={path}: not found ({cfg.name} expects {source.expects})")
    return path


def stays_on_disk(cfg: DataConfig, pool_on_disk: bool, train_bytes: int) -> bool:
    """Whether the splits' images are left on disk (`LazyImages`) rather than held in memory."""
    if cfg.stream == "auto":
        return pool_on_disk and train_bytes > IN_MEMORY_LIMIT_BYTES
    return cfg.stream == "always"


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Open `cfg.name` and split it deterministically; the images are decoded into memory
    now, or left on disk to be read when indexed (`stays_on_disk`)."""
    if cfg.name not in DATASETS:
        raise UserError(f"data.name={cfg.name!r}: unknown dataset; use one of "
                        f"{', '.join(DATASETS)}")
    _check_image_size(cfg)
    pool = DATASETS[cfg.name].load(cfg)
    if cfg.unconditional:  # one class: the model learns p(x), and its label is a constant
        pool = dataclasses.replace(pool, labels=np.zeros_like(pool.labels),
                                   class_names=[UNCONDITIONAL])
    train_idx, val_idx = split_indices(pool.size, cfg)
    labels = torch.from_numpy(pool.labels)
    train_bytes = len(train_idx) * int(np.prod(pool.item_shape)) * 4
    if stays_on_disk(cfg, pool.on_disk, train_bytes):
        train_images = LazyImages(pool.read, train_idx, pool.item_shape)
        val_images = LazyImages(pool.read, val_idx, pool.item_shape)
    else:
        train_images, val_images = pool.read(train_idx), pool.read(val_idx)
    return ImageDataset(train_images, labels[train_idx], val_images, labels[val_idx],
                        pool.class_names)


# --------------------------------------------------------------------------------------------
# Captions (for text conditioning): a few templates per class
# --------------------------------------------------------------------------------------------

# Fashion-MNIST's official names read badly in a sentence ("a photo of a Trouser").
_FASHION_NOUNS = {
    "T-shirt/top": "t-shirt", "Trouser": "pair of trousers", "Pullover": "pullover",
    "Dress": "dress", "Coat": "coat", "Sandal": "sandal", "Shirt": "shirt",
    "Sneaker": "sneaker", "Bag": "bag", "Ankle boot": "ankle boot",
}  # fmt: skip


def _a(noun: str) -> str:
    """`noun` with its indefinite article ("an eight", "a one"), by the usual spelling rule."""
    vowel_sound = noun[:1].lower() in "aeiou" and not noun.lower().startswith(("one", "uni", "eu"))
    return f"{'an' if vowel_sound else 'a'} {noun}"


def default_captions(class_names: list[str], dataset_name: str) -> list[list[str]]:
    """Three caption templates per class, in class-id order."""
    captions = []
    for name in class_names:
        if class_names == [UNCONDITIONAL]:  # data.unconditional: no class to name
            captions.append(["an image", "a picture", "a photo"])
        elif dataset_name == "digits":
            captions.append([f"a handwritten digit {name}", f"the number {name} written by hand",
                             f"a small grayscale image of {_a(name)}"])
        elif dataset_name == "fashion_mnist":
            noun = _FASHION_NOUNS.get(name, name.lower())
            captions.append([f"a photo of {_a(noun)}", f"a grayscale photo of {_a(noun)}",
                             f"{_a(noun)} on a plain background"])
        else:
            readable = name.replace("_", " ")  # folder names like golden_retriever
            captions.append([f"an image of {readable}", f"a photo of {readable}",
                             f"a picture of {readable}"])
    return captions
