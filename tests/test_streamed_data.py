"""Data left on disk (`data.stream`): latent shards and .safetensors read a row at a time, an
image folder decoded per batch, through a DataLoader with workers. A streamed run trains on
exactly the batches of an in-memory one (alone, in a pack, under DDP, after a resume), and its
memory does not grow with the dataset. Real digits stored as latent files; no mocks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_one_line_error, run_cli
from PIL import Image
from safetensors.torch import save_file

from mupsweep.config import compose
from mupsweep.data import LazyImages, load_dataset
from mupsweep.errors import UserError
from mupsweep.train import train, train_group


def digits_as_latents() -> tuple[np.ndarray, np.ndarray]:
    """The real 8x8 digits, stored as (N, 1, 8, 8) float32 'latents'."""
    ds = load_dataset(compose([]).data)
    images = torch.cat([ds.train_images, ds.val_images]).numpy()
    labels = torch.cat([ds.train_labels, ds.val_labels]).numpy()
    return images, labels


def write_shards(root, images: np.ndarray, labels: np.ndarray, n_shards: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(len(labels)), n_shards)):
        np.save(root / f"latents-{k:05d}.npy", images[rows])
        np.save(root / f"labels-{k:05d}.npy", labels[rows])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    images, labels = digits_as_latents()
    write_shards(root, images, labels, n_shards=3)
    return root, images, labels


def data_args(root, stream: str, workers: int = 2) -> list[str]:
    return ["data.name=latents", f"data.root={root}", f"data.stream={stream}",
            f"data.num_workers={workers}"]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_shards_read_on_disk_give_the_images_held_in_memory(shards):
    root, images, _ = shards
    in_memory = load_dataset(compose(data_args(root, "never")).data)
    on_disk = load_dataset(compose(data_args(root, "always")).data)
    assert isinstance(on_disk.train_images, LazyImages)
    assert isinstance(in_memory.train_images, torch.Tensor)
    assert on_disk.train_images.shape == in_memory.train_images.shape
    idx = torch.tensor([5, 0, 1500, 5, 700])  # across shards, repeated, out of order
    assert torch.equal(on_disk.train_images[idx], in_memory.train_images[idx])
    assert torch.equal(on_disk.val_labels, in_memory.val_labels)
    assert (on_disk.num_classes, on_disk.channels, on_disk.image_size) == (10, 1, 8)
    # the whole set, in the order of the shards' names, is the one the files hold
    assert in_memory.train_images.shape[0] + in_memory.val_images.shape[0] == len(images)


def test_safetensors_read_a_row_at_a_time_in_bfloat16(tmp_path):
    latents = torch.randn(20, 4, 4, 4).to(torch.bfloat16)
    save_file({"latents": latents, "labels": torch.arange(20) % 3},
              str(tmp_path / "lat.safetensors"))
    ds = load_dataset(compose(["data.name=latents", f"data.root={tmp_path / 'lat.safetensors'}",
                               "data.stream=always", "data.latent_scale=0.5"]).data)
    assert isinstance(ds.train_images, LazyImages)
    positions = ds.train_images.positions
    assert torch.equal(ds.train_images[np.arange(len(positions))],
                       latents.float()[torch.from_numpy(positions)] * 0.5)


def test_an_image_folder_on_disk_is_decoded_when_indexed(tmp_path):
    """The digits as PNG files in class folders: decoded per index, the images decoding the
    whole folder gives."""
    images, labels = digits_as_latents()
    for i in range(60):
        folder = tmp_path / f"class{labels[i]}"
        folder.mkdir(exist_ok=True)
        pixels = ((images[i, 0] + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    args = ["data.name=image_folder", f"data.root={tmp_path}", "data.grayscale=true",
            "data.image_size=8"]
    in_memory = load_dataset(compose([*args, "data.stream=never"]).data)
    on_disk = load_dataset(compose([*args, "data.stream=always"]).data)
    assert isinstance(on_disk.train_images, LazyImages)
    assert on_disk.train_images.shape == in_memory.train_images.shape == (54, 1, 8, 8)
    idx = torch.tensor([3, 3, 0, 53])
    assert torch.equal(on_disk.train_images[idx], in_memory.train_images[idx])


def test_auto_keeps_a_small_set_in_memory(shards):
    root, _, _ = shards
    assert isinstance(load_dataset(compose(data_args(root, "auto")).data).train_images,
                      torch.Tensor)


@pytest.mark.parametrize("damage, needle", [
    ("empty", "latents-00001.npy: no latents (an empty shard)"),
    ("shapes", "latents-00002.npy: latents of shape (1, 4, 4) per item"),
    ("truncated", "latents-00001.npy: "),
    ("no labels", "labels-00002.npy: not found"),
    ("garbage", "latents-00001.npy: not a readable .npy file"),
    ("negative label", "labels-00000.npy: label -1, expected class ids >= 0"),
    ("class names", "class_names.txt: 3 class names, expected at least 10"),
])
def test_a_bad_shard_is_named(tmp_path, damage, needle):
    images, labels = digits_as_latents()
    images, labels = images[:300], labels[:300]
    write_shards(tmp_path, images, labels, n_shards=3)
    if damage == "empty":
        np.save(tmp_path / "latents-00001.npy", images[:0])
        np.save(tmp_path / "labels-00001.npy", labels[:0])
    elif damage == "shapes":
        np.save(tmp_path / "latents-00002.npy", np.zeros((100, 1, 4, 4), np.float32))
    elif damage == "truncated":
        path = tmp_path / "latents-00001.npy"
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "garbage":
        (tmp_path / "latents-00001.npy").write_bytes(b"not an array")
    elif damage == "no labels":
        (tmp_path / "labels-00002.npy").unlink()
    elif damage == "negative label":
        np.save(tmp_path / "labels-00000.npy", labels[:100] - 1)
    elif damage == "class names":
        (tmp_path / "class_names.txt").write_text("a\nb\nc\n")
    with pytest.raises(UserError) as e:
        load_dataset(compose(data_args(tmp_path, "always")).data)
    assert needle in str(e.value) and "\n" not in str(e.value)
    if damage == "truncated":
        assert "truncated" in str(e.value)


def test_a_bad_row_found_while_streaming_is_one_line_naming_its_file(tmp_path):
    """A NaN is found when its row is read, in a loader worker, mid-run: exit 2, one line."""
    images, labels = digits_as_latents()
    images = images[:200].copy()
    images[:, :, 0, 0] = np.nan
    write_shards(tmp_path / "data", images, labels[:200], n_shards=2)
    proc = run_cli("train", *TINY, *data_args(tmp_path / "data", "always"), "train.steps=3",
                   "train.val_size=8", f"train.run_dir={tmp_path}/run")
    assert_one_line_error(proc, "latents-0000", "latents contain NaN or inf (row")


# --------------------------------------------------------------------------------------------
# Training on streamed data
# --------------------------------------------------------------------------------------------

SHORT = [*TINY, "train.steps=12", "train.eval_every=6", "train.batch_size=16", "train.val_size=32",
         "train.save=false"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_run_trains_on_the_batches_of_an_in_memory_run(shards, tmp_path, workers):
    root, _, _ = shards
    common = [*SHORT, "data.hflip=true"]
    in_memory = train(compose([*common, *data_args(root, "never"), f"train.run_dir={tmp_path}/a"]))
    streamed = train(compose([*common, *data_args(root, "always", workers),
                              f"train.run_dir={tmp_path}/b"]))
    assert streamed.history == in_memory.history
    assert streamed.validation_loss < 0.9 * streamed.initial_validation_loss  # it learned


def test_flips_change_the_run(shards, tmp_path):
    """data.hflip has teeth: the same run without flips ends elsewhere."""
    root, _, _ = shards
    flipped = train(compose([*SHORT, *data_args(root, "always"), "data.hflip=true",
                             f"train.run_dir={tmp_path}/a"]))
    plain = train(compose([*SHORT, *data_args(root, "always"), f"train.run_dir={tmp_path}/b"]))
    assert flipped.validation_loss != plain.validation_loss


def test_a_streamed_run_resumed_matches_the_uninterrupted_one(shards, tmp_path):
    root, _, _ = shards
    common = [*TINY, "train.eval_every=6", "train.batch_size=16", "train.val_size=32",
              *data_args(root, "always")]
    straight = train(compose([*common, "train.steps=12", f"train.run_dir={tmp_path}/a"]))
    train(compose([*common, "train.steps=6", f"train.run_dir={tmp_path}/b"]))
    resumed = train(compose([*common, "train.steps=12", "train.resume=true",
                             f"train.run_dir={tmp_path}/b"]))
    assert resumed.steps == 12
    assert resumed.history == straight.history


def test_a_streamed_pack_trains_as_its_runs_in_memory(shards, tmp_path):
    """K = 3 members read through one loader; member 1 leaves at step 6 (pruned) and the
    others train on as their in-memory runs."""
    root, _, _ = shards

    def member(i: int, stream: str, lr: float):
        return compose([*SHORT, *data_args(root, stream), f"train.seed={i}", f"optim.lr={lr}",
                        f"train.run_dir={tmp_path}/{stream}{i}"])

    def prune(step: int, values: dict) -> None:
        if step == 6:
            raise RuntimeError("pruned")

    lrs = [2.0**-8, 2.0**-7, 2.0**-6]
    packed = train_group([member(i, "always", lr) for i, lr in enumerate(lrs)],
                         on_evals=[None, prune, None])
    assert packed[1].error is not None and packed[1].result.steps == 6
    for i in (0, 2):
        alone = train(member(i, "never", lrs[i]))
        got = [h["validation_loss"] for h in packed[i].result.history]
        assert got == pytest.approx([h["validation_loss"] for h in alone.history], rel=1e-5)


def test_ddp_on_streamed_data_matches_one_process_in_memory(shards, tmp_path):
    """Two gloo ranks each read only their half of every global batch from the shards."""
    root, _, _ = shards
    common = [*TINY, "train.steps=20", "train.eval_every=20", "train.batch_size=32"]
    single = run_cli("train", *common, *data_args(root, "never"), f"train.run_dir={tmp_path}/one",
                     "--json")
    assert single.returncode == 0, single.stderr
    ddp = run_cli("train", *common, *data_args(root, "always", 1), f"train.run_dir={tmp_path}/two",
                  "--json", "--nproc-per-node", "2", env={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr
    a, b = json.loads(single.stdout), json.loads(ddp.stdout)
    assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=2e-3)
    assert b["validation_loss"] < 0.8 * b["initial_validation_loss"]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

def bench_streaming():
    """scripts/bench_streaming.py, whose measurement this test runs at a smaller size."""
    path = Path(__file__).parents[1] / "scripts" / "bench_streaming.py"
    spec = importlib.util.spec_from_file_location("bench_streaming", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_of_a_streamed_run_does_not_grow_with_the_dataset(tmp_path):
    """A 0.3 GiB latent set (4 x 32 x 32 float32 items, random: only its size matters here):
    read from disk, the trainer's and each worker's peak RSS stay far below the file; held in
    memory (the same run with data.stream=never) the trainer's peak grows by more than the
    file, so the measure can tell the two apart."""
    bench = bench_streaming()
    folder = bench.latent_set(tmp_path, 0.3)
    file_mb = (folder / "latents.npy").stat().st_size / 2**20
    streamed = bench.peak_rss(folder, "always", steps=30)
    in_memory = bench.peak_rss(folder, "never", steps=30)
    measured = (streamed, in_memory, file_mb)
    assert in_memory["trainer_mb"] - streamed["trainer_mb"] > file_mb, measured
    assert in_memory["trainer_mb"] - streamed["workers_mb"] > file_mb, measured


def test_an_unconditional_run_learns_one_class(tmp_path):
    """data.unconditional: the model's label table holds one class (and the null class), and
    the run learns p(x) from the digits without their labels."""
    cfg = compose([*SHORT, "train.steps=40", "train.eval_every=40", "data.unconditional=true",
                   "train.save=true", "train.samples=2", "diffusion.sample_steps=2",
                   f"train.run_dir={tmp_path}"])
    result = train(cfg)
    assert result.validation_loss < 0.8 * result.initial_validation_loss
    weights = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    tables = [v for k, v in weights.items() if "y_embedder" in k or "label" in k]
    assert tables and tables[0].shape[0] == 2, [k for k in weights if "embed" in k]
