"""Datasets: load a whole (small) dataset into memory and split it into train / validation.

Every dataset goes through the same three steps:

1. a loader from the `DATASETS` registry opens the source and returns a `_Pool`: how many
   items there are, the class names, and a `take(indices)` that decodes just those items;
2. `split_indices` shuffles 0..N-1 with `cfg.split_seed`, keeps `cfg.max_items`, and cuts off
   the validation tail, so the same config always gives the same split;
3. `load_dataset` takes both parts and returns an `ImageDataset` of float32 tensors.

Images are scaled to [-1, 1] (the range the diffusion code assumes); latents are returned as
stored times `cfg.latent_scale`. Nothing here touches the network. Every bad input raises a
one-line `UserError` naming the path or key and what was expected.
"""

from __future__ import annotations

import gzip
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mupsweep.config import DataConfig
from mupsweep.errors import UserError
from mupsweep.util import first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FASHION_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


@dataclass
class ImageDataset:
    """A whole dataset held in memory as tensors.

    Our datasets are small and latents are pre-extracted, so everything fits in memory.
    """

    train_images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1] (latents: stored * latent_scale)
    train_labels: torch.Tensor  # (N,) int64 class ids in [0, num_classes)
    val_images: torch.Tensor
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
    """Every item of a dataset before the split; `take` decodes only the items asked for."""

    size: int
    class_names: list[str]
    take: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # idx -> (images, labels)


def _array_pool(images: np.ndarray | torch.Tensor, labels: np.ndarray,
                class_names: list[str]) -> _Pool:
    """A pool over arrays already in memory (images float32, already scaled)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    labels_t = torch.as_tensor(labels, dtype=torch.int64)

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.int64)
        return images[i].contiguous(), labels_t[i].contiguous()

    return _Pool(len(labels_t), class_names, take)


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


def _resized_pool(pool: _Pool, size: int | None) -> _Pool:
    """Wrap a pool of pixel images so `take` returns them resized to `size`."""
    if size is None:
        return pool

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = pool.take(idx)
        return _resize(images, size), labels

    return _Pool(pool.size, pool.class_names, take)


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


def _list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """All image files under root/<class>/ with their class ids; hidden entries ignored."""
    if not root.is_dir():
        raise UserError(f"data.root={root}: not a directory "
                        "(image_folder expects a folder of class sub-folders of images)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"data.root={root}: no class sub-folders "
                        "(image_folder expects root/<class name>/<image files>)")
    paths, labels = [], []
    for class_id, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if not files:  # an empty class would still count in num_classes; refuse it
            raise UserError(f"{root / name}: no images (expected {'/'.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [class_id] * len(files)
    return paths, labels, classes


def _read_image(path: Path, size: int, grayscale: bool) -> np.ndarray:
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


def _load_image_folder(cfg: DataConfig) -> _Pool:
    """A folder of class sub-folders; only the images selected by the split are decoded."""
    root = _require_root(cfg)
    paths, labels, classes = _list_image_folder(root)
    size = cfg.image_size or 32
    labels_arr = np.asarray(labels, dtype=np.int64)

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([_read_image(paths[i], size, cfg.grayscale) for i in idx])
        return torch.from_numpy(images), torch.from_numpy(labels_arr[idx])

    return _Pool(len(paths), classes, take)


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


def _read_latent_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(latents, labels) as numpy arrays from one of the three supported layouts."""
    if root.is_dir():
        arrays = {}
        for key in ("latents", "labels"):
            path = root / f"{key}.npy"
            if not path.is_file():
                raise UserError(f"{path}: not found (latents directory expects "
                                "latents.npy (N,C,H,W) and labels.npy (N,))")
            try:
                arrays[key] = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise UserError(f"{path}: not a readable .npy file ({first_line(e)})") from None
        return arrays["latents"], arrays["labels"]
    if root.suffix in (".npz", ".safetensors"):
        arrays = read_named_arrays(root, ("latents", "labels"))
    else:
        raise UserError(f"data.root={root}: expected a .npz or .safetensors file, or a directory "
                        "with latents.npy and labels.npy")
    for key in ("latents", "labels"):
        if key not in arrays:
            raise UserError(f"{root}: no array named {key!r} (expected 'latents' (N,C,H,W) "
                            "and 'labels' (N,))")
    return arrays["latents"], arrays["labels"]


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
    """Pre-extracted latents, scaled by `cfg.latent_scale` (SD VAE: 0.18215)."""
    root = _require_root(cfg)
    latents, labels = _read_latent_arrays(root)
    if latents.ndim != 4:
        raise UserError(f"{root}: latents have shape {latents.shape}, expected 4 dims (N,C,H,W)")
    if latents.shape[2] != latents.shape[3]:
        raise UserError(f"{root}: latents are {latents.shape[2]}x{latents.shape[3]}, "
                        "expected square (H == W)")
    if labels.ndim != 1:
        raise UserError(f"{root}: labels have shape {labels.shape}, expected 1 dim (N,)")
    if len(labels) != len(latents):
        raise UserError(f"{root}: {len(labels)} labels for {len(latents)} latents, "
                        "expected one label per latent")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{root}: labels have dtype {labels.dtype}, expected integers")
    if len(labels) and labels.min() < 0:
        raise UserError(f"{root}: label {int(labels.min())}, expected class ids >= 0")
    if cfg.image_size is not None and cfg.image_size != latents.shape[-1]:
        raise UserError(f"data.image_size={cfg.image_size}: latents cannot be resized; "
                        f"use null (stored latents are {latents.shape[-1]}x{latents.shape[-1]})")
    if not np.isfinite(latents).all():
        raise UserError(f"{root}: latents contain NaN or inf")
    names = _latent_class_names(root, int(labels.max()) + 1 if len(labels) else 0)
    scaled = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)) * cfg.latent_scale
    return _array_pool(scaled, labels.astype(np.int64), names)


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
    "latents": _Source(
        _load_latents,
        "a .npz / .safetensors file with 'latents' and 'labels', or a directory with "
        "latents.npy and labels.npy",
    ),
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


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load `cfg.name`, split it deterministically, and return in-memory tensors."""
    if cfg.name not in DATASETS:
        raise UserError(f"data.name={cfg.name!r}: unknown dataset; use one of "
                        f"{', '.join(DATASETS)}")
    _check_image_size(cfg)
    pool = DATASETS[cfg.name].load(cfg)
    train_idx, val_idx = split_indices(pool.size, cfg)
    train_images, train_labels = pool.take(train_idx)
    val_images, val_labels = pool.take(val_idx)
    return ImageDataset(train_images, train_labels, val_images, val_labels, pool.class_names)


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
        if dataset_name == "digits":
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
