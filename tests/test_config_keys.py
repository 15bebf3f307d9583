"""Each config key declares its rules with the key (mupsweep/config/schema.py), and every list
of keys the rest of mupsweep reads is derived from those declarations.

The RECORDED_* values below are the hand-kept lists as they were before the declarations
replaced them (config.RANGES / CAPS / CHOICES / NON_EMPTY / WIDTH_LISTS / RESULT_NEUTRAL,
config.EXTRA_KEYS for the keys one architecture reads,
sweep.study.NOT_IN_SIGNATURE, packed.PER_MEMBER_KEYS (now each key's per_member= rule), transfer.NOT_TRANSFERRED /
PROXY_SHAPE_FIELDS / PRESET_SIZE_FIELDS, sweep.space.NOT_HYPERPARAMETERS), copied from that
code: the derived lists must say exactly what they said. Change a key's rules on purpose, and
change its record here with it.
"""

from __future__ import annotations

import dataclasses

import pytest

from mupsweep.config import (
    PRESET_KEEPS_PROXY,
    PRESET_KEEPS_STUDY,
    PRESET_SETS,
    Config,
    ModelConfig,
    Range,
    compose,
    is_per_member,
    key,
    keys_outside_signature,
    not_hyperparameters,
    per_member_keys,
    preset_keys,
    result_neutral_keys,
    section,
    untransferred_keys,
    why_not_a_hyperparameter,
)
from mupsweep.config.keys import conflicting_rules, declared_rules, undeclared_keys
from mupsweep.errors import UserError

POSITIVE, NON_NEGATIVE, AT_LEAST_1, UNIT = Range(0, low_open=True), Range(0), Range(1), Range(0, 1)
SEED = Range(0, 2**31 - 1)
RECORDED_RANGES = {
    "model.width": AT_LEAST_1, "model.depth": AT_LEAST_1, "model.head_dim": AT_LEAST_1,
    "model.patch_size": AT_LEAST_1, "model.mlp_ratio": POSITIVE, "model.class_dropout": UNIT,
    "model.base_width": AT_LEAST_1, "model.delta_width": AT_LEAST_1,
    "model.init_mult": POSITIVE, "model.output_mult": POSITIVE, "model.attn_mult": POSITIVE,
    "model.base_depth": AT_LEAST_1, "model.depth_alpha": Range(0.5, 1),
    # model.extra's text keys (checks.TEXT_KEYS) until issue 17 made them model keys
    "model.text_dim": AT_LEAST_1, "model.text_len": AT_LEAST_1, "model.pooled_dim": AT_LEAST_1,
    "data.val_fraction": Range(0, 1, low_open=True, high_open=True), "data.split_seed": SEED,
    "data.image_size": AT_LEAST_1, "data.max_items": Range(2), "data.latent_scale": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "diffusion.num_timesteps": Range(2), "diffusion.beta_start": Range(0, 1, True, True),
    "diffusion.beta_end": Range(0, 1, True, True), "diffusion.sample_steps": AT_LEAST_1,
    "diffusion.cfg_scale": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": Range(0, 1, high_open=True), "optim.beta2": Range(0, 1, high_open=True),
    "optim.eps": POSITIVE, "optim.warmup_steps": NON_NEGATIVE, "optim.min_lr_ratio": UNIT,
    "optim.grad_clip": NON_NEGATIVE,
    "train.steps": NON_NEGATIVE, "train.batch_size": AT_LEAST_1, "train.seed": SEED,
    "train.eval_every": AT_LEAST_1, "train.val_size": AT_LEAST_1, "train.val_seed": SEED,
    "train.log_every": AT_LEAST_1, "train.ckpt_every": NON_NEGATIVE,
    "train.ema_decay": Range(0, 1, high_open=True), "train.samples": NON_NEGATIVE,
    "train.diverge_factor": Range(1, low_open=True),
    "eval.samples": Range(2), "eval.sample_steps": AT_LEAST_1, "eval.cfg_scale": NON_NEGATIVE,
    "eval.seed": SEED,
    "coord.steps": AT_LEAST_1, "coord.seeds": AT_LEAST_1, "coord.lr": POSITIVE,
    "coord.batch_size": AT_LEAST_1, "coord.tolerance": POSITIVE,
    "sweep.n_trials": AT_LEAST_1, "sweep.seed": SEED, "sweep.heartbeat_s": NON_NEGATIVE,
    "sweep.grace_s": AT_LEAST_1, "sweep.max_retry": NON_NEGATIVE, "sweep.pack": AT_LEAST_1,
}
WIDTH = (2**16, "3.5x the widest published transformer, PaLM's 18432")
DEPTH = (1024, "the deepest trained transformers have 1000 layers (DeepNet)")
IMAGES = (2**20, "every rank draws the whole global batch; published diffusion training uses "
          "a few thousand")
TIMESTEPS = (100_000, "DDPM and DiT use 1000; the schedule keeps tables of this length")
RECORDED_CAPS = {
    "model.width": WIDTH, "model.base_width": WIDTH, "model.delta_width": WIDTH,
    "model.head_dim": WIDTH, "model.depth": DEPTH, "model.base_depth": DEPTH,
    "model.text_dim": WIDTH, "model.pooled_dim": WIDTH,
    "model.text_len": (2**14, "T5's context is 512 tokens; PixArt-alpha uses 120, SD3 154"),
    "model.mlp_ratio": (64, "transformer MLPs are 4x the width"),
    "model.patch_size": (2**14, "no image is wider"),
    "data.image_size": (2**14, "one 16384^2 RGB image is 3 GiB of float32"),
    "data.num_workers": (256, "a worker is a process"),
    "diffusion.num_timesteps": TIMESTEPS, "diffusion.sample_steps": TIMESTEPS,
    "train.batch_size": IMAGES, "train.val_size": IMAGES, "train.samples": IMAGES,
    "eval.samples": IMAGES, "eval.sample_steps": TIMESTEPS,
    "coord.batch_size": IMAGES,
}
RECORDED_CHOICES = {
    "model.parametrization": ("mup", "sp"),
    "model.depth_parametrization": ("none", "completep"),
    "model.text_encoder": ("hash", "minilm", "file"),
    "data.stream": ("auto", "always", "never"),
    "diffusion.kind": ("ddpm", "rectified_flow"),
    "optim.schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "bf16"),
}
RECORDED_NON_EMPTY = ("model.arch", "model.text_file", "data.name", "data.root", "data.vae", "train.device", "train.run_dir",
                      "eval.inception_weights", "eval.cache_dir",
                      "coord.out_dir", "sweep.study", "sweep.storage", "sweep.out_dir", "sweep.objective")
RECORDED_WIDTH_LISTS = {"coord.widths": 2, "sweep.proxy_widths": 1}
RECORDED_RESULT_NEUTRAL = (
    "data.stream", "data.num_workers", "data.vae", "train.progress", "train.tensorboard", "train.log_every", "train.eval_every",
    "train.ckpt_every", "train.device", "train.compile", "train.samples", "train.save",
    "train.run_dir", "train.resume", "eval", "coord", "sweep", "provenance")
RECORDED_NOT_IN_SIGNATURE = (
    "sweep.n_trials", "sweep.storage", "sweep.out_dir", "sweep.study", "sweep.seed",
    "sweep.sampler", "sweep.pruner", "sweep.heartbeat_s", "sweep.grace_s", "sweep.max_retry",
    "sweep.pack", "train.progress", "train.tensorboard", "train.log_every", "train.device",
    "train.compile", "train.run_dir", "train.resume", "train.save", "train.samples",
    "train.ckpt_every", "data.stream", "data.num_workers", "data.vae", "diffusion.sample_steps", "diffusion.cfg_scale", "model.width", "coord",
    "provenance", "eval.cache_dir",
)
RECORDED_PER_MEMBER_KEYS = ("model.init_mult", "model.output_mult", "model.class_dropout", "optim",
                            "train.seed", "train.run_dir", "train.diverge_factor")
RECORDED_NOT_TRANSFERRED = ("model.base_width", "model.delta_width", "model.head_dim",
                            "model.depth", "model.patch_size", "train.batch_size")
RECORDED_PROXY_SHAPE_FIELDS = ("base_width", "delta_width", "head_dim")  # model.*
RECORDED_PRESET_SIZE_FIELDS = ("model.width", "model.depth")

_BASE_SHAPES = ("muP's base shapes (width = heads x head_dim): the tuned HPs are defined "
                "relative to them, so a study holds them fixed and transfer keeps the proxy's")
_DEPTH_BASE = ("CompleteP's base depth and exponent: the tuned HPs are defined relative to "
               "them, so a study holds them fixed and transfer keeps the proxy's")
_STUDY_KIND = ("what the study tunes for: best.json and transfer take it from the study's base "
               "config, so a swept value would be reported and transferred as the base one")
_OBJECTIVE = ("it defines the validation loss the trials are ranked by: losses under different "
              "values measure different things and do not compare")
_SET_BY_TRIAL = "every trial sets it itself (a new run directory, no checkpoint, no progress bar)"
_NEUTRAL = "it cannot change the validation loss a trial is ranked by, so there is nothing to tune"
RECORDED_NOT_HYPERPARAMETERS: dict[str, str] = {
    **{k: _NEUTRAL for k in RECORDED_RESULT_NEUTRAL},
    "diffusion.sample_steps": _NEUTRAL + " (it only sets how sample grids are drawn)",
    "diffusion.cfg_scale": _NEUTRAL + " (it only sets how sample grids are drawn)",
    "sweep": "a setting of tune itself, which no trial reads",
    "eval": "it sets how a run is measured, not how it trains",
    "coord": "a setting of coord-check, which no trial reads",
    "provenance": "written by transfer, and read by no trial",
    "train.run_dir": _SET_BY_TRIAL, "train.resume": _SET_BY_TRIAL,
    "train.save": _SET_BY_TRIAL, "train.progress": _SET_BY_TRIAL,
    "model.width": ("every trial trains at each of sweep.proxy_widths, so a swept width would be "
                    "overwritten; list the proxy widths in sweep.proxy_widths (transfer sets the "
                    "target's with --width)"),
    "model.head_dim": _BASE_SHAPES, "model.base_width": _BASE_SHAPES,
    "model.delta_width": _BASE_SHAPES,
    "model.base_depth": _DEPTH_BASE, "model.depth_alpha": _DEPTH_BASE,
    "model.arch": _STUDY_KIND, "model.parametrization": _STUDY_KIND,
    "model.depth_parametrization": _STUDY_KIND,
    "data": ("the dataset is loaded once per study and every trial trains on it, so a swept "
             "data key would never be read"),
    "train.val_size": _OBJECTIVE, "train.val_seed": _OBJECTIVE, "model.learn_sigma": _OBJECTIVE,
    "diffusion.kind": _OBJECTIVE, "diffusion.num_timesteps": _OBJECTIVE,
    "diffusion.beta_start": _OBJECTIVE, "diffusion.beta_end": _OBJECTIVE,
}


def declared(rule: str) -> dict:
    """{key: value} of one value check, for every key that declares it, in schema order."""
    return {k: getattr(r, rule) for k, r in declared_rules().items() if getattr(r, rule)}


# --------------------------------------------------------------------------------------------
# The derived lists say what the hand-kept ones said
# --------------------------------------------------------------------------------------------


def test_value_checks_are_the_recorded_ones_in_the_same_order():
    """Same keys, same values, same order (check_config names problems in this order)."""
    assert list(declared("valid").items()) == list(RECORDED_RANGES.items())
    assert declared("cap") == RECORDED_CAPS
    assert list(declared("choices").items()) == list(RECORDED_CHOICES.items())
    assert tuple(declared("non_empty")) == RECORDED_NON_EMPTY
    assert list(declared("min_widths").items()) == list(RECORDED_WIDTH_LISTS.items())
    assert list(declared("pattern")) == ["train.device"]
    caption_models = ("pixart", "mmdit", "module:Class")
    assert declared("read_by") == {"model.output_conv": ("uvit",),
                                   **{f"model.{k}": caption_models for k in
                                      ("text_encoder", "text_file", "text_dim", "text_len", "pooled_dim")}}


def test_result_neutral_keys_are_the_recorded_ones():
    assert set(result_neutral_keys()) == set(RECORDED_RESULT_NEUTRAL)


def test_keys_outside_the_signature_are_the_recorded_ones():
    assert set(keys_outside_signature()) == set(RECORDED_NOT_IN_SIGNATURE)


def test_per_member_keys_are_the_recorded_ones():
    assert set(per_member_keys()) == set(RECORDED_PER_MEMBER_KEYS)
    assert is_per_member("optim.lr") and is_per_member("model.init_mult")
    assert not is_per_member("model.width") and not is_per_member("optimizer")


def test_transfer_and_preset_keys_are_the_recorded_ones():
    assert set(untransferred_keys()) == set(RECORDED_NOT_TRANSFERRED)
    assert set(preset_keys(PRESET_KEEPS_PROXY)) == {f"model.{f}" for f in RECORDED_PROXY_SHAPE_FIELDS}
    assert set(preset_keys(PRESET_SETS)) == set(RECORDED_PRESET_SIZE_FIELDS)
    assert preset_keys(PRESET_KEEPS_STUDY) == ("model.parametrization",)


def test_not_hyperparameters_are_the_recorded_ones():
    assert not_hyperparameters() == RECORDED_NOT_HYPERPARAMETERS


@pytest.mark.parametrize(("key", "why"), [
    ("train.run_dir", _SET_BY_TRIAL),  # its own reason before its section's neutral one
    ("train.log_every", _NEUTRAL),
    ("coord.lr", "a setting of coord-check, which no trial reads"),  # from its section
    ("data.root", RECORDED_NOT_HYPERPARAMETERS["data"]),
    ("optim.lr", None), ("model.init_mult", None), ("model.depth", None),
    ("model.output_conv", None), ("modelx", None),
])
def test_why_not_a_hyperparameter_takes_the_most_specific_reason(key, why):
    assert why_not_a_hyperparameter(key) == why


def test_a_nullable_empty_path_says_it_may_be_null():
    """'or leave it null' is derived from the field's type (str | None), as it was listed."""
    with pytest.raises(UserError) as e:
        compose(["data.root=", "data.name= "])
    assert str(e.value) == ("data.name is empty: give a value; data.root is empty: give a value "
                            "or leave it null")


# --------------------------------------------------------------------------------------------
# Every key declares its rules; the check has teeth
# --------------------------------------------------------------------------------------------


def test_every_config_key_declares_its_rules():
    assert undeclared_keys() == [], ("declare each key's rules with key(...) / section(...) "
                                     "in mupsweep/config/schema.py")


# Made-up schemas for the checks' teeth (at module level: the checks read their type hints).
@dataclasses.dataclass
class HalfDeclared:
    good: int = key(1)
    bare: int = 2  # no key(): undeclared


@dataclasses.dataclass
class SchemaWithBareKeys:
    model: ModelConfig = section(ModelConfig)
    extra: HalfDeclared = section(HalfDeclared)
    plain: HalfDeclared = dataclasses.field(default_factory=HalfDeclared)


@dataclasses.dataclass
class Quiet:
    quiet: int = key(1, neutral=False)


@dataclasses.dataclass
class SchemaWithConflict:
    loud: Quiet = section(Quiet, neutral=True)


def test_undeclared_key_is_found():
    """A field written without key() (here one of a section, and a section itself) is named."""
    assert undeclared_keys(SchemaWithBareKeys) == ["extra.bare", "plain", "plain.bare"]


def test_no_key_contradicts_its_section():
    assert conflicting_rules() == []
    assert conflicting_rules(SchemaWithConflict) == [
        "loud.quiet: neutral=False under loud's neutral=True"]


def test_a_misspelt_rule_is_refused_at_import():
    with pytest.raises(TypeError):
        key(1, tranfers=False)
    with pytest.raises(ValueError):
        key(1, preset="sets the size")


def test_the_rules_do_not_change_the_schema():
    """A field's metadata is all key() adds: OmegaConf and dataclasses see the same defaults."""
    cfg = Config()
    assert cfg.model.width == 64 and cfg.coord.widths == [32, 64, 128, 256]
    assert Config().coord.widths is not cfg.coord.widths  # a factory, not a shared list
