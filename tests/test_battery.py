"""A battery of bad inputs across every command and every config section: each ends in its
expected exit code (2: bad input, one line naming it; 1: a check that ran and failed), never a
traceback, and never a run started on a value it should have refused.

Two tables, meant to grow: one generated from the config schema (every leaf key given values
of the wrong kind: text for a number, a number for a flag, a list for a scalar, ...), one
written by hand (files that are not what they claim, paths that cannot be written, flags,
stdin, relations between keys). Add a row when a bad input is found that ends otherwise.

Cases run through the CLI's own entry point in this process (conftest's `cli` fixture). A
case accepted by mistake trains 2 steps of a tiny model, so the whole battery stays fast."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from conftest import TINY

from mupsweep.config import Config

QUICK = [*TINY, "train.steps=2", "train.eval_every=2", "train.val_size=16", "train.batch_size=8"]

# --------------------------------------------------------------------------------------------
# Generated from the schema: values of the wrong kind for every leaf key
# --------------------------------------------------------------------------------------------

WRONG_KIND = {  # for a key of this type: values that are never valid
    int: ["abc", "1.5", "[1]", "{a: 1}", "true", "''"],
    float: ["abc", "[1]", "{a: 1}", "true", "''"],
    bool: ["abc", "2", "[1]", "{a: 1}", "0.5"],
    str: ["[1]", "{a: 1}"],
    list: ["abc", "5", "{a: 1}", "[abc]", "[1.5]"],
}

# A key's command: the one that reads it (a key refused at compose is refused by every command).
COMMAND_OF_SECTION = {"coord": ["coord-check"], "sweep": ["tune"]}
NOT_A_VALUE = {"provenance", "model.args", "sweep.params"}  # free-form; hand-written below


def _leaf_keys() -> list[tuple[str, type]]:
    """(dotted key, its kind) for every leaf of the schema, Optional[...] unwrapped."""
    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, hint = f"{prefix}{f.name}", hints[f.name]
            if key in NOT_A_VALUE:
                continue
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
                hint = args[0]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{key}.")
            else:
                keys.append((key, list if typing.get_origin(hint) is list else hint))

    walk(Config, "")
    return keys


GENERATED = [(key, value) for key, kind in _leaf_keys() for value in WRONG_KIND[kind]]


@pytest.mark.parametrize("key, value", GENERATED, ids=[f"{k}={v}" for k, v in GENERATED])
def test_a_value_of_the_wrong_kind_is_one_line(cli, key, value):
    command = COMMAND_OF_SECTION.get(key.split(".")[0], ["train"])
    proc = cli(*command, *QUICK, f"{key}={value}")
    _assert_refused(proc, 2, key)


# --------------------------------------------------------------------------------------------
# Written by hand: files, paths, flags, relations
# --------------------------------------------------------------------------------------------


def _files(root: Path) -> None:
    """The files the hand-written cases name, in the current directory of the case."""
    (root / "not_json.json").write_text("{oops")
    (root / "array.json").write_text("[1, 2]")
    (root / "latin1.json").write_bytes(b'{"study": "caf\xe9"}')
    (root / "empty.json").write_text("")
    (root / "bad.yaml").write_text("model: [1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "a_file").write_text("x")
    (root / "a_dir").mkdir()
    (root / "images").mkdir()


HAND = [
    # config files and overrides that are not YAML, or not a config
    (["train", "--config", "bad.yaml"], 2, "bad.yaml"),
    (["train", "--config", "list.yaml"], 2, "list.yaml"),
    (["train", "--config", "missing.yaml"], 2, "missing.yaml"),
    (["train", "--config", "a_dir"], 2, "a_dir"),
    (["train", *QUICK, "model.width=[1"], 2, "model.width"),
    (["train", *QUICK, "model.width"], 2, "model.width"),
    (["train", *QUICK, "=1"], 2, "=1"),
    (["train", *QUICK, "model=nope"], 2, "nope"),
    (["train", *QUICK, "modell.width=64"], 2, "modell"),
    (["train", *QUICK, "+experiment=nope"], 2, "nope"),
    (["train", *QUICK, "model.arch=nope"], 2, "nope"),
    (["train", *QUICK, "model.parametrization=mupp"], 2, "mupp"),
    (["train", *QUICK, "data.name=cifar"], 2, "cifar"),
    (["train", *QUICK, "data=image_folder", "data.root=images"], 2, "images"),
    (["train", *QUICK, "data=image_folder", "data.root=a_file"], 2, "a_file"),
    (["train", *QUICK, "data=latents", "data.root=missing.npz"], 2, "missing.npz"),
    (["train", *QUICK, "data=latents", "data.root=not_json.json"], 2, "not_json.json"),
    (["train", *QUICK, "diffusion.kind=ddim"], 2, "ddim"),
    (["train", *QUICK, "optim.schedule=linear"], 2, "linear"),
    (["train", *QUICK, "train.precision=fp8"], 2, "fp8"),
    (["train", *QUICK, "model.width=48", "model.head_dim=32"], 2, "model.width"),
    (["train", *QUICK, "model.patch_size=3"], 2, "patch"),
    (["train", *QUICK, "model.depth_parametrization=completep", "model.parametrization=sp"], 2,
     "completep"),
    (["train", *QUICK, "model.depth_alpha=2", "model.depth_parametrization=completep"], 2,
     "depth_alpha"),
    (["train", *QUICK, "train.resume=true"], 2, "train.resume"),
    (["train", *QUICK, "train.run_dir=a_file"], 2, "a_file"),
    (["train", *QUICK, "train.run_dir=/proc/x"], 2, "/proc/x"),
    (["train", "--resume", "a_dir"], 2, "a_dir"),
    (["train", "--resume", "missing"], 2, "missing"),
    (["train", "--resume", "a_dir", "--config", "bad.yaml"], 2, "--config"),
    (["train", *QUICK, "--config-dir", "missing"], 2, "missing"),
    # Hydra's habits: honoured or refused by name, never ignored
    (["train", *QUICK, "hydra.run.dir=out/x"], 2, "train.run_dir"),
    (["train", *QUICK, "hydra.job.chdir=true"], 2, "hydra.job.chdir"),
    (["tune", *QUICK, "hydra.sweep.dir=out/x"], 2, "sweep.out_dir"),
    (["train", "--cfg", "hydra"], 2, "--cfg hydra"),
    (["train", *QUICK, "model.arch=foo", "--cfg"], 2, "model.arch='foo'"),
    (["tune", *QUICK, "sweep.sampler=tpe2", "--cfg"], 2, "sweep.sampler='tpe2'"),
    (["train", *QUICK, "data.name=cifar", "--cfg"], 2, "data.name='cifar'"),
    (["train", *QUICK, "train.resume=true", "--cfg"], 2, "train.resume"),
    # sizes that cannot fit
    (["train", *QUICK, "train.batch_size=2000000000"], 2, "train.batch_size"),
    (["train", *QUICK, "diffusion.num_timesteps=100000000000"], 2, "diffusion.num_timesteps"),
    (["train", *QUICK, "model.width=1048576", "model.head_dim=16"], 2, "model.width"),
    (["train", *QUICK, "model.depth=100000"], 2, "model.depth"),
    # architecture-specific keys
    (["train", *QUICK, "model=pixart-tiny", "model.text_dim=abc"], 2, "text_dim"),
    (["train", *QUICK, "model=pixart-tiny", "model.text_len=inf"], 2, "text_len"),
    (["train", *QUICK, "model=pixart-tiny", "model.text_dim=0"], 2, "text_dim"),
    (["train", *QUICK, "model=pixart-tiny", "model.text_dim=1.7"], 2, "text_dim"),
    (["train", *QUICK, "+model.bogus=1"], 2, "bogus"),
    (["train", *QUICK, "model.extra.text_dim=8"], 2, "model.extra is gone"),
    (["train", *QUICK, "model.text_dim=8"], 2, "not read by model.arch=dit"),
    (["train", *QUICK, "model.args=5"], 2, "model.args=5"),
    (["train", *QUICK, "+model.args.x=1"], 2, "model.args is for your own model class"),
    (["train", *QUICK, "model.arch=nowhere.py:DiT"], 2, "no file nowhere.py"),
    (["train", *QUICK, "model.arch=json:JSONDecoder"], 2, "not an nn.Module subclass"),
    (["train", *QUICK, "model.learn_sigma=2"], 2, "learn_sigma"),
    # sweep
    (["tune", *QUICK, "sweep.params=abc"], 2, "sweep.params"),
    (["tune", *QUICK, "sweep.params=[abc]"], 2, "sweep.params"),
    (["tune", *QUICK, "sweep.params=[{name: optim.lr}]"], 2, "optim.lr"),
    (["tune", *QUICK, "sweep.params=[{name: model.width, type: categorical, choices: [64, 48]}]"],
     2, "model.width"),
    (["tune", *QUICK, "sweep.params=[{name: optim.lr, log2: true, low: 3, high: 6}]"], 2, "optim.lr"),
    (["tune", *QUICK, "sweep.params=[{name: optim.lr, type: categorical, choices: []}]"], 2,
     "optim.lr"),
    (["tune", *QUICK, "sweep.storage=bogus://x"], 2, "bogus://x"),
    (["tune", *QUICK, "--workers", "0"], 2, "--workers"),
    (["tune", *QUICK, "--workers", "-1"], 2, "--workers"),
    (["tune", *QUICK, "sweep.out_dir=a_file"], 2, "a_file"),
    (["tune", *QUICK, "sweep.out_dir=/proc/x"], 2, "/proc/x"),
    (["tune", *QUICK, "sweep.out_dir="], 2, "sweep.out_dir"),
    # coord-check
    (["coord-check", *QUICK, "coord.out_dir=a_file"], 2, "a_file"),
    (["coord-check", *QUICK, "coord.out_dir=/proc/x"], 2, "/proc/x"),
    (["coord-check", *QUICK, "coord.out_dir="], 2, "coord.out_dir"),
    (["coord-check", *QUICK, "--depths", "abc"], 2, "--depths"),
    (["coord-check", *QUICK, "--depths", "0,2"], 2, "--depths"),
    (["coord-check", *QUICK, "--depths", "4"], 2, "--depths"),
    # inspect
    (["inspect", *QUICK, "model=nope"], 2, "nope"),
    (["inspect", "--config", "bad.yaml"], 2, "bad.yaml"),
    # validate
    (["validate", *QUICK, "--log2-lr", "abc"], 2, "--log2-lr"),
    (["validate", *QUICK, "--log2-lr", "5:1"], 2, "--log2-lr"),
    (["validate", *QUICK, "--log2-lr", "-8:-6:0"], 2, "--log2-lr"),
    (["validate", *QUICK, "--log2-lr", "3:6"], 2, "--log2-lr"),
    (["validate", *QUICK, "--parametrizations", "foo"], 2, "--parametrizations"),
    (["validate", *QUICK, "--workers", "0"], 2, "--workers"),
    (["validate", *QUICK, "--pack", "0"], 2, "pack"),
    (["validate", *QUICK, "--widths", "32,0"], 2, "0"),
    (["validate", *QUICK, "--widths", "32"], 2, "2 widths"),
    (["validate", *QUICK, "--depths", "2,4", "--depth-parametrizations", "x"], 2,
     "--depth-parametrizations"),
    (["validate", *QUICK, "--depths", "2,4", "--widths", "32"], 2, "--widths"),
    # transfer: files that are not a study summary, targets that cannot be written
    (["transfer", "missing.json", "-o", "t.yaml"], 2, "missing.json"),
    (["transfer", "not_json.json", "-o", "t.yaml"], 2, "not_json.json"),
    (["transfer", "array.json", "-o", "t.yaml"], 2, "array.json"),
    (["transfer", "latin1.json", "-o", "t.yaml"], 2, "latin1.json"),
    (["transfer", "empty.json", "-o", "t.yaml"], 2, "empty.json"),
    (["transfer", "a_dir", "-o", "t.yaml"], 2, "a_dir"),
    (["transfer", "not_json.json"], 2, "-o"),
    (["transfer", "not_json.json", "-o", "a_dir"], 2, "a_dir"),
    (["transfer", "not_json.json", "-o", "/proc/x.yaml"], 2, "/proc/x.yaml"),
    (["transfer", "not_json.json", "-o", "-", "--json"], 2, "stdout"),
    (["transfer", "--storage", "sqlite:///x.db", "-o", "t.yaml"], 2, "--study"),
    (["transfer", "--width", "abc", "not_json.json", "-o", "t.yaml"], 2, "--width"),
    # report
    (["report", "missing.json"], 2, "missing.json"),
    (["report", "not_json.json"], 2, "not_json.json"),
    (["report"], 2, "best"),
    (["report", "array.json", "-o", "a_file"], 2, "a_file"),
    # demo: refused before any work
    (["demo", "--out", "a_file"], 2, "a_file"),
    (["demo", "--out", "/proc/x"], 2, "/proc/x"),
    (["demo", "--trials", "0"], 2, "--trials"),
    # usage
    (["nope"], 2, "nope"),
    (["train", "--nope"], 2, "--nope"),
    (["train", "--nproc-per-node", "abc"], 2, "--nproc-per-node"),
    (["train", "--nnodes", "abc"], 2, "--nnodes"),
]


@pytest.mark.parametrize("args, code, needle", HAND, ids=[" ".join(a[-3:]) for a, _, _ in HAND])
def test_a_bad_input_ends_as_expected(cli, tmp_path, args, code, needle):
    _files(tmp_path)
    proc = cli(*args)
    _assert_refused(proc, code, needle, json_out="--json" in args)


def _assert_refused(proc, code: int, needle: str, json_out: bool = False) -> None:
    """The expected exit code; no traceback; for bad input (2) one line naming it, and on
    stdout nothing (with --json: the error object, for a pipe's next command)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    if code == 2:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr[-3000:]
        assert needle in lines[0], (needle, lines[0])
        if json_out:
            assert json.loads(proc.stdout) == {"error": lines[0].removeprefix("error: "),
                                               "exit_code": 2}
        else:
            assert proc.stdout == ""


def test_the_battery_is_large(capsys):
    """The battery covers every leaf key of the schema and every command."""
    assert len(GENERATED) + len(HAND) >= 400
    commands = {a[0] for a, _, _ in HAND}
    assert {"train", "tune", "transfer", "report", "coord-check", "inspect", "validate",
            "demo"} <= commands
    json.dumps(GENERATED)
