"""Values read from files, architecture-specific keys and absurd sizes are refused like values
typed on the command line: one line naming the field (and the file), exit 2, no traceback, and
never a value changed in silence (issue "Never a wrong answer in silence, round 2", items 4-6).

The tables run the CLI's own entry point in this process (conftest's `cli` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_one_line_error

from mupsweep.config import compose, to_dict
from mupsweep.models import get_model_class

# --------------------------------------------------------------------------------------------
# Item 4a: best.json, through `transfer` and `report`
# --------------------------------------------------------------------------------------------


def _best_doc() -> dict:
    """A well-formed study summary (synthetic losses; its base config is dit-tiny's)."""
    base = to_dict(compose(["model=dit-tiny", "train.steps=10", "sweep.proxy_widths=[32,64]"]))
    trials = [{"number": i, "state": "COMPLETE", "value": 0.5 - 0.1 * i,
               "hparams": {"optim.lr": 2.0 ** (-10 + 3 * i)},
               "losses": {"32": 0.5 - 0.1 * i, "64": 0.5 - 0.1 * i}, "flops": 1e9,
               "wall_time_s": 1.0, "reason": ""} for i in range(3)]
    return {"study": "s", "storage": "sqlite:///x.db", "parametrization": "mup", "value": 0.3,
            "trial": 2, "hparams": {"optim.lr": 2.0**-4}, "proxy_widths": [32, 64],
            "base_config": base, "cost": {"flops": 3e9, "wall_time_s": 3.0, "n_complete": 3,
                                          "n_pruned": 0, "n_failed": 0}, "trials": trials}


def _set(path: str, value):
    """An edit of the document: set the field at `path` ('cost.flops', 'trials.0.value')."""
    def edit(doc: dict) -> None:
        *parents, last = path.split(".")
        obj = doc
        for part in parents:
            obj = obj[int(part)] if isinstance(obj, list) else obj[part]
        obj[int(last) if isinstance(obj, list) else last] = value
    return edit


BAD_BEST = [
    ("cost-not-object", _set("cost", "abc"), "cost is \"abc\", not an object"),
    ("cost-flops-string", _set("cost.flops", "abc"), "cost.flops is \"abc\""),
    ("trials-not-list", _set("trials", {"a": 1}), "trials is {\"a\": 1}, not a list"),
    ("trial-value-string", _set("trials.0.value", "abc"), "trials[0].value is \"abc\", not a number"),
    ("trial-losses-string", _set("trials.0.losses", {"32": "abc"}), "trials[0].losses has"),
    ("hparams-not-object", _set("hparams", [1]), "hparams is [1], not an object"),
    ("widths-negative", _set("proxy_widths", [-32, 64]), "proxy_widths is [-32, 64]"),
    ("widths-zero", _set("proxy_widths", [0]), "proxy_widths is [0]"),
    ("widths-bool", _set("proxy_widths", [True]), "proxy_widths is [true]"),
    ("value-string", _set("value", "abc"), "value is \"abc\", not a number"),
    ("trial-string", _set("trial", "abc"), "trial is \"abc\""),
    ("parametrization", _set("parametrization", 3), "parametrization is 3"),
    ("study-list", _set("study", [1]), "study is [1], not a string"),
    ("base-config-arch-refuses", _set("base_config.model", {**to_dict(compose(TINY))["model"],
                                                          "arch": "uvit", "depth": 4}),
     "base_config: model.depth=4: U-ViT needs an odd depth"),
]


@pytest.mark.parametrize("command", ["transfer", "report"])
@pytest.mark.parametrize("name,edit,needle", BAD_BEST, ids=[c[0] for c in BAD_BEST])
def test_bad_best_json(cli, tmp_path, command, name, edit, needle):
    doc = _best_doc()
    edit(doc)
    path = tmp_path / "best.json"
    path.write_text(json.dumps(doc))
    args = ["--width", "128", "-o", str(tmp_path / "t.yaml")] if command == "transfer" else [
        "-o", str(tmp_path / "r")]
    assert_one_line_error(cli(command, str(path), *args), str(path), needle)


def test_best_json_not_utf8(cli, tmp_path):
    path = tmp_path / "best.json"
    path.write_bytes(b"\xff\xfe{}")
    assert_one_line_error(cli("transfer", str(path), "--width", "128", "-o", "t.yaml"),
                          "is not UTF-8 text")


def test_good_best_json_still_transfers(cli, tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps(_best_doc()))
    proc = cli("transfer", str(path), "--width", "128", "-o", str(tmp_path / "t.yaml"))
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# Item 4b: a checkpoint whose config matches but whose contents do not
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from mupsweep.train import train

    run_dir = tmp_path_factory.mktemp("ckpt") / "R"
    train(compose([*TINY, "train.steps=2", "train.eval_every=2", f"train.run_dir={run_dir}"]))
    return run_dir


def _first_moment(ckpt: dict) -> None:
    state = ckpt["optimizer"]["state"]
    state[next(iter(state))]["exp_avg"] = torch.zeros(7)


BAD_CKPT = [
    ("tensor-shape", lambda c: c["model"].__setitem__(next(iter(c["model"])), torch.zeros(3, 3)),
     "of shape (3, 3), this run's is"),
    ("step-string", lambda c: c.__setitem__("step", "abc"), "has step 'abc', not an integer in [0, train.steps=3]"),
    ("step-past-steps", lambda c: c.__setitem__("step", 10**6), "has step 1000000"),
    ("step-negative", lambda c: c.__setitem__("step", -5), "has step -5"),
    ("no-optimizer", lambda c: c.pop("optimizer"), "has no optimizer state"),
    ("optimizer-moment-shape", _first_moment, "has optimizer exp_avg of shape (7,)"),
    ("generator", lambda c: c.__setitem__("gen_index", torch.zeros(3)), "random generator state"),
    ("history", lambda c: c.__setitem__("history", "abc"), "history that is not a list"),
]


@pytest.mark.parametrize("name,edit,needle", BAD_CKPT, ids=[c[0] for c in BAD_CKPT])
def test_bad_checkpoint_contents(cli, tmp_path, finished_run, name, edit, needle):
    import shutil

    run_dir = tmp_path / "R"
    shutil.copytree(finished_run, run_dir)
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, run_dir / "last.pt")
    assert_one_line_error(cli("train", "--resume", str(run_dir), "train.steps=3"),
                          f"checkpoint {run_dir / 'last.pt'}", needle)


# --------------------------------------------------------------------------------------------
# Item 4c: YAML that is not YAML (a preset, a --config file, an override)
# --------------------------------------------------------------------------------------------


def test_preset_not_yaml(cli, tmp_path):
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "bad.yaml").write_text("arch: dit\nwidth: [1\n")
    assert_one_line_error(cli("train", "model=bad", "--cfg"), "not valid YAML", "bad.yaml")


def test_config_file_and_override_not_yaml(cli, tmp_path):
    good = tmp_path / "good.yaml"
    from mupsweep.config import to_yaml

    good.write_text(to_yaml(compose(TINY)))
    assert_one_line_error(cli("train", "--config", str(good), "model.width=[1", "--cfg"),
                          "bad override 'model.width=[1'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {width: [1\n")
    assert_one_line_error(cli("train", "--config", str(bad), "--cfg"), "is not valid YAML",
                          "line 2")


# --------------------------------------------------------------------------------------------
# Item 5: architecture-specific keys, and booleans / integers never coerced
# --------------------------------------------------------------------------------------------

BAD_ARCH = [
    (["model=pixart-tiny", "model.text_dim=abc"], "model.text_dim=abc (Value 'abc' of type 'str' could not be converted to Integer)"),
    (["model=pixart-tiny", "model.text_len=inf"], "model.text_len=inf (Value 'inf' of type 'float' could not be converted"),
    (["model=pixart-tiny", "model.text_dim=0"], "model.text_dim=0 must be an integer >= 1"),
    (["model=pixart-tiny", "model.text_dim=1.7"], "model.text_dim=1.7 (Value '1.7' of type 'float' could not be converted"),
    (["model=mmdit-tiny", "model.pooled_dim=-1 must be an integer >= 1"], "model.pooled_dim=-1 must be an integer >= 1"),
    (["model=pixart-tiny", "model.text_encoder=t5"], "model.text_encoder='t5': use hash, minilm or file"),
    (["model=uvit-tiny", "model.output_conv=2"], "model.output_conv=2 must be true or false"),
    (["model=uvit-tiny", "model.output_conv=yes"], "model.output_conv='yes' must be true or false"),
    (["+model.extra.text_dim=8"], "model.extra is gone, its settings are model keys now; write model.text_dim"),
    (["model=uvit-tiny", "model.extra.conv=true"], "write model.output_conv"),
    (["model=uvit-tiny", "+model.output_cnv=true"], "did you mean model.output_conv?"),
    (["model=pixart-tiny", "+model.text_dims=8"], "did you mean model.text_dim?"),
    (["model.output_conv=true"], "model.output_conv=true is not read by model.arch=dit (only by uvit)"),
    (["model=uvit-tiny", "model.text_len=8"], "model.text_len=8 is not read by model.arch=uvit (only by pixart, mmdit, your own class)"),
    (["model.learn_sigma=2"], "model.learn_sigma=2 must be true or false"),
    (["model.learn_sigma=yes"], "model.learn_sigma='yes' must be true or false"),
    (["train.compile=on"], "train.compile='on' must be true or false"),
    (["model.adaln_zero=3"], "model.adaln_zero=3 must be true or false (or null)"),
]


@pytest.mark.parametrize("overrides,needle", BAD_ARCH, ids=[" ".join(c[0]) for c in BAD_ARCH])
def test_arch_keys_and_strict_types(cli, overrides, needle):
    assert_one_line_error(cli("train", *TINY, *overrides, "--cfg"), needle)


def test_every_key_read_by_one_architecture_names_real_ones():
    """A key's read_by names built-in architectures (or your own class), and every built-in
    is registered: a misspelt name would refuse the key under the architecture that reads it."""
    import mupsweep.models.registry as registry
    from mupsweep.config import BUILTIN_ARCHS
    from mupsweep.config.keys import declared_rules
    from mupsweep.config.rules import YOUR_CLASS

    for arch in BUILTIN_ARCHS:
        get_model_class(arch)
    assert set(registry._MODELS) - {"test-ignores-depth"} == set(BUILTIN_ARCHS)
    readers = {a for r in declared_rules().values() if r.read_by for a in r.read_by}
    assert readers == {"uvit", "pixart", "mmdit", YOUR_CLASS}


# --------------------------------------------------------------------------------------------
# Item 6: sizes that cannot fit, refused before allocation with the limit and why
# --------------------------------------------------------------------------------------------

TOO_BIG = [
    ("train.batch_size=2000000000", "train.batch_size=2000000000 is over the limit of 1048576"),
    ("diffusion.num_timesteps=100000000000", "diffusion.num_timesteps=100000000000 is over the limit of 100000"),
    ("model.width=1048576", "model.width=1048576 is over the limit of 65536"),
    ("model.depth=100000", "model.depth=100000 is over the limit of 1024"),
    ("model.head_dim=1048576", "model.head_dim=1048576 is over the limit"),
    ("data.image_size=1000000", "data.image_size=1000000 is over the limit of 16384"),
    ("model.mlp_ratio=1e12", "model.mlp_ratio=1000000000000.0 is over the limit of 64"),
    ("train.val_size=2000000000", "train.val_size=2000000000 is over the limit"),
    ("sweep.proxy_widths=[64,10000000]", "10000000 is over the limit of 65536"),
]


@pytest.mark.parametrize("override,needle", TOO_BIG, ids=[c[0] for c in TOO_BIG])
def test_absurd_sizes_refused(cli, override, needle):
    assert_one_line_error(cli("train", *TINY, override, "--cfg"), needle)


def test_paper_sizes_still_compose():
    """DiT-XL/2 (width 1152, depth 28, batch 256 on 32x32x4 latents) and the largest presets."""
    cfg = compose(["+experiment=paper-dit-xl-2"])
    assert (cfg.model.width, cfg.model.depth, cfg.train.batch_size) == (1152, 28, 256)
    for preset in ("mmdit", "pixart", "uvit-l", "dit-xl-2"):
        compose([f"model={preset}"])
