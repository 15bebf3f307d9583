"""`mupsweep encode` and latent sample grids, with a real diffusers AutoencoderKL built from a
small config and saved (no download): an image folder of real digits -> .npy shards -> a
training run on them whose sample grid is decoded through the same VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, assert_one_line_error, run_cli
from PIL import Image

from mupsweep.config import compose
from mupsweep.data import load_dataset, read_image
from mupsweep.encode import encode
from mupsweep.errors import UserError
from mupsweep.vae import encode_images, load_vae

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=8, sample_size=16,
                        scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """30 real digits (classes 0, 1, 2) as 8x8 RGB PNGs in class folders."""
    ds = load_dataset(compose([]).data)
    images, labels = ds.train_images, ds.train_labels
    root = tmp_path_factory.mktemp("images")
    count = {0: 0, 1: 0, 2: 0}
    for image, label in zip(images, labels.tolist(), strict=True):
        if label in count and count[label] < 10:
            folder = root / f"digit{label}"
            folder.mkdir(exist_ok=True)
            pixels = ((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"{count[label]}.png")
            count[label] += 1
    (root / "captions.txt").write_text("a zero|the digit zero\na one\na two\n")  # one line a class
    return root


def test_encode_writes_shards_that_train_with_decoded_samples(vae_dir, image_folder, tmp_path):
    out = tmp_path / "latents"
    proc = run_cli("encode", str(image_folder), str(out), "--vae", str(vae_dir),
                   "--image-size", "16", "--shard-size", "12", "--batch-size", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["items"], result["classes"], result["shards"]) == (30, 3, 3)
    assert result["latent_shape"] == [4, 8, 8] and result["scaling_factor"] == 0.5
    assert "data.latent_scale=0.5" in proc.stderr
    assert sorted(p.name for p in out.glob("*-0000*.npy")) == [
        "labels-00000.npy", "labels-00001.npy", "labels-00002.npy",
        "latents-00000.npy", "latents-00001.npy", "latents-00002.npy"]

    # the stored latents are the VAE's of the images, labels from the folders
    first = sorted((image_folder / "digit0").iterdir())[0]
    want = encode_images(load_vae(vae_dir), torch.from_numpy(read_image(first, 16, False))[None])
    assert np.allclose(np.load(out / "latents-00000.npy")[0], want[0].numpy(), atol=1e-5)
    assert np.load(out / "labels-00002.npy").tolist() == [2] * 6  # items 24..29
    assert (out / "class_names.txt").read_text().split() == ["digit0", "digit1", "digit2"]
    assert (out / "captions.txt").read_text() == (image_folder / "captions.txt").read_text()

    # a run on them, its samples decoded through the VAE into 16x16 RGB images
    run = run_cli("train", *TINY, "data=latents", f"data.root={out}", "data.latent_scale=0.5",
                  f"data.vae={vae_dir}", "train.steps=3", "train.samples=3",
                  "diffusion.sample_steps=2", f"train.run_dir={tmp_path}/run", "--json")
    assert run.returncode == 0, run.stderr
    grid = Image.open(json.loads(run.stdout)["samples_path"])
    assert grid.mode == "RGB" and grid.width == (3 * (16 + 2) + 2) * 4  # 16x16 images, x4
    assert "raw latents" not in run.stderr


def test_latent_samples_without_a_vae_say_they_are_raw(vae_dir, image_folder, tmp_path):
    out = tmp_path / "latents"
    encode(image_folder, out, vae_dir, image_size=16, progress=False)
    run = run_cli("train", *TINY, "data=latents", f"data.root={out}", "data.latent_scale=0.5",
                  "train.steps=2", "train.samples=3", "diffusion.sample_steps=2",
                  f"train.run_dir={tmp_path}/run")
    assert run.returncode == 0, run.stderr
    assert "samples.png: raw latents: channel 0 of 4 (data.vae=DIR decodes them)" in run.stderr


def test_an_interrupted_encode_keeps_its_finished_shards(vae_dir, image_folder, tmp_path):
    """What an interruption leaves (shards are written whole, labels last): the finished
    shards, and a last one without its labels. Run again, it encodes only that one."""
    out = tmp_path / "latents"
    first = encode(image_folder, out, vae_dir, image_size=16, shard_size=12, progress=False)
    whole = np.load(out / "latents-00002.npy")
    (out / "labels-00002.npy").unlink()
    kept_mtime = (out / "latents-00000.npy").stat().st_mtime_ns
    again = encode(image_folder, out, vae_dir, image_size=16, shard_size=12, progress=False)
    assert (first.shards_kept, again.shards_kept) == (0, 2)
    assert (out / "latents-00000.npy").stat().st_mtime_ns == kept_mtime
    assert np.array_equal(np.load(out / "latents-00002.npy"), whole)
    with pytest.raises(UserError, match="holds an encoding with other image_size, shard_size"):
        encode(image_folder, out, vae_dir, image_size=8, shard_size=10, progress=False)


def test_a_latent_scale_other_than_the_recorded_one_is_refused(vae_dir, image_folder, tmp_path):
    out = tmp_path / "latents"
    encode(image_folder, out, vae_dir, image_size=16, progress=False)
    with pytest.raises(UserError, match=r"scaling factor is 0.5 \(vae.json\); set data.latent_scale=0.5"):
        load_dataset(compose(["data=latents", f"data.root={out}"]).data)


@pytest.mark.parametrize("damage, needle", [
    ("missing", "not a directory"),
    ("no weights", "no weights (diffusion_pytorch_model.safetensors)"),
    ("not a vae", "holds a UNet2DModel, not an AutoencoderKL"),
])
def test_a_bad_vae_directory_is_one_line(vae_dir, image_folder, tmp_path, damage, needle):
    bad = tmp_path / "vae"
    if damage != "missing":
        bad.mkdir()
        config = json.loads((vae_dir / "config.json").read_text())
        if damage == "not a vae":
            config["_class_name"] = "UNet2DModel"
            for weights in vae_dir.glob("diffusion_pytorch_model*"):
                (bad / weights.name).write_bytes(weights.read_bytes())
        (bad / "config.json").write_text(json.dumps(config))
    proc = run_cli("encode", str(image_folder), str(tmp_path / "out"), "--vae", str(bad))
    assert_one_line_error(proc, f"--vae {bad}", needle)
    assert not (tmp_path / "out").exists()  # refused before anything was written
