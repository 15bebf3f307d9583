"""`transfer`, `report`, `demo`, `inspect` and the model presets never give a wrong answer in
silence: a preset may change the model's size only (anything else is refused, or accepted by
name and recorded), a gradient clip carried across width is flagged, the paper presets use the
official base shapes, outputs are written whole or not at all, and bad input is one line."""

from __future__ import annotations

import copy
import json
import resource
import signal
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from conftest import assert_one_line_error, run_cli
from test_transfer import real_best_doc
from test_tune import tune_cli

from mupsweep.config import CONFIG_DIR, compose, to_dict
from mupsweep.data import load_dataset
from mupsweep.diffusion import make_diffusion
from mupsweep.errors import UserError
from mupsweep.parametrize import build_model, describe_parameters, make_conditioner, make_optimizer
from mupsweep.report import write_report
from mupsweep.transfer import list_presets, load_preset, transfer


@pytest.fixture
def doc() -> dict:
    return copy.deepcopy(real_best_doc())


def write(tmp_path, doc: dict, name: str = "best.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def proxy_doc(doc: dict, *overrides: str) -> dict:
    """The real study summary, as if its sweep had run on another base config."""
    doc["base_config"] = to_dict(compose(["sweep.proxy_widths=[32,64]", *overrides]))
    return doc


# --------------------------------------------------------------------------------------------
# --preset changes the size of the model, nothing else unless accepted by name
# --------------------------------------------------------------------------------------------


def test_preset_of_another_architecture_is_refused(tmp_path, doc):
    """`--preset uvit-s` on a DiT proxy swapped the architecture under the tuned HPs."""
    out = tmp_path / "t.yaml"
    proc = run_cli("transfer", write(tmp_path, doc), "--preset", "uvit-s", "-o", str(out))
    assert_one_line_error(proc, "--preset uvit-s is a uvit model but the proxy is a dit",
                          "tune a narrow uvit proxy")
    assert not out.exists()


def test_preset_lists_every_structural_difference(tmp_path, doc):
    """`--preset dit-xl-4` on dit-tiny silently switched on learn_sigma (another loss) and
    patch 4. Every difference is listed, each with the override that accepts it."""
    out = tmp_path / "t.yaml"
    proc = run_cli("transfer", write(tmp_path, doc), "--preset", "dit-xl-4", "-o", str(out))
    assert_one_line_error(proc, "model.patch_size: proxy 2, preset 4",
                          "model.learn_sigma: proxy false, preset true",
                          "(model.patch_size=4 model.learn_sigma=true)",
                          "keep the proxy's (model.patch_size=2 model.learn_sigma=false)")
    assert not out.exists()


def test_accepted_difference_is_applied_and_recorded(tmp_path, doc):
    out = tmp_path / "t.yaml"
    proc = run_cli("transfer", write(tmp_path, doc), "--preset", "dit-xl-2", "--width", "128",
                   "model.learn_sigma=true", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    written = yaml.safe_load(out.read_text())
    assert written["model"]["learn_sigma"] is True and written["model"]["depth"] == 28
    prov = written["provenance"]
    assert prov["accepted_differences"] == {
        "model.learn_sigma": {"proxy": False, "preset": True, "target": True}}
    assert any(w.startswith("model.learn_sigma: the proxy had false, the preset true; true accepted")
               for w in prov["warnings"])
    # keeping the proxy's value by name is no difference at all
    kept = transfer(doc, preset="dit-xl-2", overrides=["model.learn_sigma=false"])
    assert kept.config.model.learn_sigma is False and not kept.provenance["accepted_differences"]
    assert (kept.config.model.width, kept.config.model.depth) == (1152, 28)


def test_text_model_preset_lists_its_text_settings(doc):
    """PixArt/MMDiT presets carry their encoders' sizes in model.text_* (and MMDiT, a global
    preset, diffusion.kind): a tiny proxy's 64-dim hash captions are not T5-XXL's 4096."""
    with pytest.raises(UserError) as e:
        transfer(proxy_doc(doc, "model=pixart-tiny"), preset="pixart")
    for needle in ("model.learn_sigma: proxy false, preset true",
                   "model.text_dim: proxy 64, preset 4096",
                   "model.text_len: proxy 16, preset 120"):
        assert needle in str(e.value)
    with pytest.raises(UserError) as e:  # the global mmdit preset used to fail on model.model
        transfer(proxy_doc(doc, "model=mmdit-tiny"), preset="mmdit")
    assert "model.pooled_dim: proxy 64, preset 2048" in str(e.value)
    assert "diffusion.kind" not in str(e.value)  # both rectified flow: no difference
    accepted = transfer(proxy_doc(doc, "model=mmdit-tiny"), preset="mmdit", width=256, overrides=[
        "model.text_dim=4096", "model.text_len=154", "model.pooled_dim=2048"])
    assert accepted.config.model.text_dim == 4096
    assert set(accepted.provenance["accepted_differences"]) == {
        "model.text_dim", "model.text_len", "model.pooled_dim"}


def test_a_users_own_preset_is_a_transfer_preset(tmp_path, monkeypatch):
    """configs/model/NAME.yaml of the working directory is `model=NAME` for every command, so
    it is `--preset NAME` too, and it wins over a packaged preset of the same name."""
    doc = real_best_doc()
    user = tmp_path / "configs" / "model"
    user.mkdir(parents=True)
    packaged = (CONFIG_DIR / "model" / "dit-tiny.yaml").read_text()
    (user / "dit-tiny-wide.yaml").write_text(packaged.replace("width: 64", "width: 96"))
    (user / "dit-tiny.yaml").write_text(packaged.replace("width: 64", "width: 80"))
    monkeypatch.chdir(tmp_path)
    assert "dit-tiny-wide" in list_presets()
    assert transfer(doc, preset="dit-tiny-wide").config.model.width == 96
    assert transfer(doc, preset="dit-tiny").config.model.width == 80


def test_every_preset_loads_flat():
    for name in list_presets():
        settings = load_preset(name)
        arch = settings["model.arch"]
        assert arch in ("dit", "uvit", "pixart", "mmdit") or ":" in arch, name  # or diffusers' class
        assert all(not isinstance(v, dict) for v in settings.values()), name


# --------------------------------------------------------------------------------------------
# Gradient clipping is not transferred by muP
# --------------------------------------------------------------------------------------------


def global_grad_norm_at_init(width: int, parametrization: str) -> float:
    """The norm a clip threshold is compared with, on the first batch of dit-tiny on digits."""
    cfg = compose(["model=dit-tiny", f"model.width={width}", f"model.parametrization={parametrization}"])
    dataset = load_dataset(cfg.data)
    conditioner = make_conditioner(cfg, dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model, conditioner.data_spec)
    diffusion = make_diffusion(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x0, y = dataset.train_images[:64], dataset.train_labels[:64]
    t = diffusion.sample_timesteps(64, g, torch.device("cpu"))
    noise = torch.randn(x0.shape, generator=g)
    no_drop = torch.zeros(64, dtype=torch.bool)
    diffusion.loss(model, x0, t, noise, conditioner(y, g), no_drop).mean().backward()
    return float(torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in model.parameters() if p.grad is not None])))


def test_global_grad_norm_falls_with_width_under_mup():
    """Why transfer warns: under muP the gradient norm at width 256 is less than half of width
    32's (measured 1.13 -> 0.41), so one clip threshold means different things at each width.
    (Under SP it grows instead: 1.49 -> 2.24.)"""
    mup32, mup256 = (global_grad_norm_at_init(w, "mup") for w in (32, 256))
    sp32, sp256 = (global_grad_norm_at_init(w, "sp") for w in (32, 256))
    assert mup256 < 0.5 * mup32
    assert sp256 > sp32


def test_grad_clip_carried_across_width_warns_and_is_recorded(tmp_path, doc):
    doc["base_config"]["optim"]["grad_clip"] = 1.0
    out = tmp_path / "t.yaml"
    proc = run_cli("transfer", write(tmp_path, doc), "--width", "256", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    warning = ("optim.grad_clip=1 is carried from the proxy (widths 32, 64) to width 256: a clip "
               "threshold is not a muP-transferred HP")
    assert warning in " ".join(proc.stderr.split())
    prov = yaml.safe_load(out.read_text())["provenance"]
    assert any(w.startswith(warning) and w.endswith("disable it with optim.grad_clip=0")
               for w in prov["warnings"])
    # no warning when the user set the clip for the target, or when the width does not change
    for quiet in (transfer(doc, width=256, overrides=["optim.grad_clip=0.5"]),
                  transfer(doc, width=64)):
        assert not any("grad_clip" in w for w in quiet.warnings)
    doc["base_config"]["optim"]["grad_clip"] = 0.0
    assert not any("grad_clip" in w for w in transfer(doc, width=256).warnings)


# --------------------------------------------------------------------------------------------
# Outputs: whole or not at all
# --------------------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: a write past `limit` bytes fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_transfer_output_is_atomic(tmp_path, doc):
    """A size limit (as a full disk) mid-write left a 1024-byte half YAML over the previous
    config. Now the write fails whole: one line, the previous file intact, no temp file."""
    out = tmp_path / "target.yaml"
    out.write_text("previous: config\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mupsweep.cli", "transfer", write(tmp_path, doc), "--width", "128",
         "-o", str(out)], capture_output=True, text=True, timeout=120,
        preexec_fn=_file_size_limit(1024))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write {out}: File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "previous: config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "target.yaml"]


def test_transfer_output_that_is_a_directory(tmp_path, doc):
    proc = run_cli("transfer", write(tmp_path, doc), "--width", "128", "-o", str(tmp_path))
    assert_one_line_error(proc, f"-o {tmp_path} is a directory", "target.yaml")


@pytest.mark.parametrize("trials, needle", [
    ([1, 2], "trials[0] is 1, not an object"),
    ([{"number": 0, "hparams": [1]}], 'trials[0].hparams is [1], not an object or null'),
    ([{"number": 0, "losses": "0.1"}], 'trials[0].losses is "0.1", not an object or null'),
    ([{"number": "x"}], 'trials[0].number is "x", not an integer >= 0 or null'),
])
def test_best_json_with_malformed_trials(tmp_path, doc, trials, needle):
    doc["trials"] = trials
    path = write(tmp_path, doc)
    assert_one_line_error(run_cli("transfer", path, "--width", "128", "-o", str(tmp_path / "t.yaml")),
                          needle)
    assert_one_line_error(run_cli("report", path, "-o", str(tmp_path / "r")), needle)


def test_report_bad_output_and_top(tmp_path, doc):
    existing = tmp_path / "report.md"
    existing.write_text("mine\n")
    path = write(tmp_path, doc)
    assert_one_line_error(run_cli("report", path, "-o", str(existing)),
                          f"-o {existing} is a file, not a folder")
    assert existing.read_text() == "mine\n"
    assert_one_line_error(run_cli("report", path, "-o", str(tmp_path / "r"), "--top", "-1"),
                          "--top -1")
    assert not (tmp_path / "r").exists()


def test_report_says_why_there_is_no_best_trial(tmp_path, doc):
    for t in doc["trials"]:
        t["state"], t["value"] = "PRUNED", None
    doc.update(trial=None, value=None, hparams={})
    doc["cost"].update(n_complete=0, n_pruned=3, n_failed=0)
    text = write_report(doc, tmp_path / "r").read_text()
    assert "- best trial: none: no complete trial (3 pruned, 0 failed)" in text
    assert "best trial: ," not in text


def test_demo_refuses_bad_trials_at_once(tmp_path):
    proc = run_cli("demo", "--trials", "-1", "--out", str(tmp_path / "demo"), timeout=60)
    assert_one_line_error(proc, "--trials=-1: give at least 1")
    assert not (tmp_path / "demo").exists()  # no stage ran


# --------------------------------------------------------------------------------------------
# Paper presets: the official DiT-muP base shapes
# --------------------------------------------------------------------------------------------


def test_paper_presets_use_four_and_five_heads_as_base_shapes():
    """The official DiT-muP code builds base shapes at 4 heads (DiT-XL/2: 288) with a delta
    of 5 (360); the official PixArt-muP base shapes are width 288 too. U-ViT and MMDiT follow
    the same rule. (The tiny CPU presets keep base 32: their proxies are 32 wide.) The packaged
    presets only: a user's own (./configs/model) may choose other base shapes."""
    for name in sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")):
        m = compose([f"model={name}"]).model
        if name.endswith("tiny") or name == "dit-small-cpu" or ":" in m.arch:
            continue  # (diffusers-dit is sized like the tiny presets: base 32)
        assert (m.base_width, m.delta_width) == (4 * m.head_dim, 5 * m.head_dim), name


def test_paper_lr_means_the_official_hidden_lr_at_dit_xl():
    """With base width 288, DiT-XL/2's hidden layers train at lr / 4 (1152 / 288), as in the
    official code; with the one-head base (72) they trained at lr / 16."""
    cfg = compose(["model=dit-xl-2", "model.depth=1", "optim.lr=0.0009765625"])  # 2^-10
    model = build_model(cfg.model, make_conditioner(cfg, load_dataset(cfg.data)).data_spec)
    rows = describe_parameters(model, cfg.model, make_optimizer(model, cfg.model, cfg.optim))
    hidden = {r["lr_mult"] for r in rows if r["role"] == "hidden"}
    assert hidden == {0.25}
    assert {r["lr_mult"] for r in rows if r["role"] in ("input", "vector")} == {1.0}


def test_inspect_says_the_base_shapes():
    proc = run_cli("inspect", "model=dit-xl-2", "model.depth=1", "model.width=576", timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # the table's title: the table is inspect's product
    assert "base shapes: width 288 (4 heads of 72), delta 360 (5 heads)" in text


# --------------------------------------------------------------------------------------------
# PostgreSQL: transfer and report read the study tune wrote
# --------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_transfer_and_report_read_a_postgresql_study(tmp_path, postgres_url):
    """`transfer`/`report --storage postgresql://...` once failed with a driver ImportError
    while `tune` worked on the same URL; all three now open storages in mupsweep.sweep.storage."""
    tune_cli(tmp_path / "sweep", "sweep.n_trials=2", "sweep.sampler=random", "sweep.pruner=none",
             "--storage", postgres_url, "--study", "pg-transfer")
    out = tmp_path / "t.yaml"
    proc = run_cli("transfer", "--storage", postgres_url, "--study", "pg-transfer", "--width",
                   "64", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    prov = json.loads(proc.stdout)["provenance"]
    study = optuna.load_study(study_name="pg-transfer",
                              storage=postgres_url.replace("postgresql://", "postgresql+psycopg2://"))
    assert prov["study"] == "pg-transfer" and prov["trial"] == study.best_trial.number
    assert yaml.safe_load(out.read_text())["model"]["width"] == 64
    proc = run_cli("report", "--storage", postgres_url, "--study", "pg-transfer", "-o",
                   str(tmp_path / "r"), "--json")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r" / "report.md").read_text()
    assert "# Sweep report: pg-transfer" in text and f"best trial: {study.best_trial.number}," in text
