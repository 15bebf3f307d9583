"""Tests for mupsweep.data: real files written to tmp_path, no mocks."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mupsweep.config import DataConfig
from mupsweep.data import (
    DATASETS,
    FASHION_NAMES,
    ImageDataset,
    default_captions,
    load_dataset,
    split_indices,
)
from mupsweep.errors import UserError

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _all_images(ds: ImageDataset) -> torch.Tensor:
    return torch.cat([ds.train_images, ds.val_images])


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    """The real idx layout: big-endian magic, big-endian dims, then unsigned bytes."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _write_fashion(root: Path, n_train: int = 12, n_test: int = 8, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, 2051, gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels, 2049, gz)


def _write_image_folder(root: Path) -> None:
    """2 classes, 3 non-square images each (so the center crop matters)."""
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 10 * i, 30), color).save(root / name / f"{i}.png")


def _latents(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 4, 4, 4)).astype(np.float32), np.arange(n) % 3


# --------------------------------------------------------------------------------------------
# digits and the split
# --------------------------------------------------------------------------------------------


def test_digits_shapes_range_classes():
    ds = load_dataset(DataConfig())
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape[1:] == (1, 8, 8)
    assert len(ds.train_images) + len(ds.val_images) == 1797
    assert len(ds.val_images) == round(0.1 * 1797)
    images = _all_images(ds)
    assert images.min() == -1.0 and images.max() == 1.0
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 8)
    assert ds.class_names[7] == "seven"
    assert set(torch.cat([ds.train_labels, ds.val_labels]).tolist()) == set(range(10))


def test_split_is_deterministic_and_disjoint():
    a, b = load_dataset(DataConfig()), load_dataset(DataConfig())
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.val_labels, b.val_labels)
    c = load_dataset(DataConfig(split_seed=1))
    assert not torch.equal(a.val_images, c.val_images)

    train, val = split_indices(1797, DataConfig())
    assert not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(1797))


def test_max_items_and_val_fraction():
    ds = load_dataset(DataConfig(max_items=50, val_fraction=0.2))
    assert (len(ds.train_images), len(ds.val_images)) == (40, 10)
    # max_items keeps the first items of the same shuffled order
    train, val = split_indices(1797, DataConfig(max_items=50, val_fraction=0.2))
    full_order = np.random.default_rng(0).permutation(1797)
    assert list(np.concatenate([train, val])) == list(full_order[:50])
    # at least one validation item, and at least one left to train on
    assert len(split_indices(3, DataConfig(val_fraction=0.01))[1]) == 1
    with pytest.raises(UserError, match="at least 2 items"):
        load_dataset(DataConfig(max_items=1))


def test_digits_resize():
    ds = load_dataset(DataConfig(image_size=16, max_items=20))
    assert ds.train_images.shape[1:] == (1, 16, 16)
    assert ds.train_images.min() >= -1.0 and ds.train_images.max() <= 1.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="digits, fashion_mnist, image_folder, latents"):
        load_dataset(DataConfig(name="cifar"))
    assert set(DATASETS) == {"digits", "fashion_mnist", "image_folder", "latents"}


# --------------------------------------------------------------------------------------------
# fashion_mnist
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    _write_fashion(tmp_path, gz=gz)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), val_fraction=0.25))
    assert len(ds.train_images) + len(ds.val_images) == 20  # train + t10k pooled
    assert len(ds.val_images) == 5
    assert (ds.num_classes, ds.channels, ds.image_size) == (10, 1, 28)
    assert ds.class_names == FASHION_NAMES and ds.class_names[9] == "Ankle boot"
    images = _all_images(ds)
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_fashion_mnist_pixel_values_and_labels(tmp_path):
    _write_fashion(tmp_path)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), val_fraction=0.25))
    raw = np.frombuffer(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()),
                        dtype=np.uint8, offset=16).reshape(12, 28, 28)
    expected = torch.from_numpy(raw.astype(np.float32) / 127.5 - 1.0)
    # pooled index 0 is the first train image; find where the split put it
    train, val = split_indices(20, DataConfig(val_fraction=0.25))
    where = list(np.concatenate([train, val])).index(0)
    got = torch.cat([ds.train_images, ds.val_images])[where, 0]
    assert torch.allclose(got, expected[0])


def test_fashion_mnist_truncated_file(tmp_path):
    _write_fashion(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])  # a cut-off download
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_short_payload_and_bad_magic(tmp_path):
    _write_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-1]))  # valid gzip, one pixel short
    with pytest.raises(UserError, match="expected"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    path.write_bytes(gzip.compress((2049).to_bytes(4, "big") + data[4:]))
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


def test_fashion_mnist_missing_dir_and_file(tmp_path):
    with pytest.raises(UserError, match="not found.*fashion_mnist expects the idx .gz files"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "nope")))
    _write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# image_folder
# --------------------------------------------------------------------------------------------


def test_image_folder_rgb_resize(tmp_path):
    _write_image_folder(tmp_path)
    ds = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=16,
                                 val_fraction=0.34))
    assert ds.class_names == ["cat", "dog"]
    assert (ds.num_classes, ds.channels, ds.image_size) == (2, 3, 16)
    assert len(ds.train_images) + len(ds.val_images) == 6
    images, labels = _all_images(ds), torch.cat([ds.train_labels, ds.val_labels])
    for image, label in zip(images, labels, strict=True):
        red, blue = (1.0, -1.0) if label == 0 else (-1.0, 1.0)  # cat is red, dog is blue
        assert torch.allclose(image[0], torch.full((16, 16), red))
        assert torch.allclose(image[2], torch.full((16, 16), blue))


def test_image_folder_default_size_and_grayscale(tmp_path):
    _write_image_folder(tmp_path)
    ds = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), grayscale=True))
    assert (ds.channels, ds.image_size) == (1, 32)
    assert ds.train_images.min() >= -1.0 and ds.train_images.max() <= 1.0


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no class sub-folders"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path)))
    _write_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png: unreadable image"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path)))
    (tmp_path / "dog" / "broken.png").unlink()
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UserError, match="empty_class: no images"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path)))
    with pytest.raises(UserError, match="data.root is not set"):
        load_dataset(DataConfig(name="image_folder"))


# --------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------


def _check_latents(ds: ImageDataset, latents: np.ndarray, scale: float) -> None:
    assert (ds.channels, ds.image_size, ds.num_classes) == (4, 4, 3)
    train, val = split_indices(len(latents), DataConfig())
    expected = torch.from_numpy(latents) * scale
    assert torch.allclose(ds.train_images, expected[train])
    assert torch.allclose(ds.val_images, expected[val])


def test_latents_npz_with_scale(tmp_path):
    latents, labels = _latents()
    np.savez(tmp_path / "lat.npz", latents=latents, labels=labels)
    ds = load_dataset(DataConfig(name="latents", root=str(tmp_path / "lat.npz"),
                                 latent_scale=0.18215))
    _check_latents(ds, latents, 0.18215)
    assert ds.class_names == ["class 0", "class 1", "class 2"]


def test_latents_safetensors_with_class_names(tmp_path):
    latents, labels = _latents()
    save_file({"latents": torch.from_numpy(latents), "labels": torch.from_numpy(labels)},
              str(tmp_path / "lat.safetensors"))
    (tmp_path / "class_names.txt").write_text("tench\ngoldfish\nwhite shark\n")
    ds = load_dataset(DataConfig(name="latents", root=str(tmp_path / "lat.safetensors"),
                                 latent_scale=2.0))
    _check_latents(ds, latents, 2.0)
    assert ds.class_names == ["tench", "goldfish", "white shark"]


def test_latents_npy_directory(tmp_path):
    latents, labels = _latents()
    np.save(tmp_path / "latents.npy", latents)
    np.save(tmp_path / "labels.npy", labels)
    ds = load_dataset(DataConfig(name="latents", root=str(tmp_path)))
    _check_latents(ds, latents, 1.0)


def test_latents_errors(tmp_path):
    latents, labels = _latents()
    np.savez(tmp_path / "short.npz", latents=latents, labels=labels[:-1])
    with pytest.raises(UserError, match="9 labels for 10 latents"):
        load_dataset(DataConfig(name="latents", root=str(tmp_path / "short.npz")))
    np.savez(tmp_path / "nokey.npz", latents=latents)
    with pytest.raises(UserError, match="no array named 'labels'"):
        load_dataset(DataConfig(name="latents", root=str(tmp_path / "nokey.npz")))
    np.savez(tmp_path / "flat.npz", latents=latents[:, 0], labels=labels)
    with pytest.raises(UserError, match="expected 4 dims"):
        load_dataset(DataConfig(name="latents", root=str(tmp_path / "flat.npz")))
    with pytest.raises(UserError, match="not found"):
        load_dataset(DataConfig(name="latents", root=str(tmp_path / "missing.npz")))
    with pytest.raises(UserError, match="latents.npy: not found"):
        load_dataset(DataConfig(name="latents", root=str(tmp_path)))  # a dir without .npy files


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------


def test_default_captions():
    digits = default_captions(["seven", "eight"], "digits")
    assert digits[0] == ["a handwritten digit seven", "the number seven written by hand",
                         "a small grayscale image of a seven"]
    assert digits[1][2] == "a small grayscale image of an eight"
    fashion = default_captions(FASHION_NAMES, "fashion_mnist")
    assert len(fashion) == 10 and all(len(c) == 3 for c in fashion)
    assert fashion[9][0] == "a photo of an ankle boot"
    assert default_captions(["golden_retriever"], "image_folder")[0][0] == (
        "an image of golden retriever"
    )


# --------------------------------------------------------------------------------------------
# unconditional data
# --------------------------------------------------------------------------------------------


def test_a_folder_of_images_without_class_folders_is_one_class(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(root / f"{i}.png")
    ds = load_dataset(DataConfig(name="image_folder", root=str(root), image_size=8))
    assert ds.class_names == ["photos"] and ds.num_classes == 1
    assert len(ds.train_images) + len(ds.val_images) == 4
    assert set(ds.train_labels.tolist()) == {0}


def test_unconditional_ignores_the_labels():
    labelled = load_dataset(DataConfig())
    ds = load_dataset(DataConfig(unconditional=True))
    assert ds.class_names == ["unconditional"] and ds.num_classes == 1
    assert set(ds.train_labels.tolist()) == set(ds.val_labels.tolist()) == {0}
    assert torch.equal(ds.train_images, labelled.train_images)  # the same split
    assert default_captions(ds.class_names, "digits") == [["an image", "a picture", "a photo"]]
