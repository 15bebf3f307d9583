"""The evaluation seam (mupsweep/evaluation.py) and the sample-quality metrics
(mupsweep/sample_quality.py): a metric registered by name becomes a sweep's objective in its
own direction, sample_fd measures what it claims (real data scores near its floor, noise and a
collapsed generator far above), the same seed gives the same value, and bad input is one line.
Real training on the built-in digits, real Optuna studies; no mocks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from mupsweep.config import compose
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.evaluation import (
    METRICS,
    Metric,
    data_identity,
    feature_net_dir,
    generate_samples,
    metric_named,
    register_metric,
)
from mupsweep.sample_quality import (
    cached_feature_net,
    features_of,
    frechet_distance,
    gaussian_statistics,
)
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import tune
from mupsweep.train import train
from mupsweep.validate import grid_configs, validate

# A short run that measures sample_fd cheaply: 256 samples of 10 DDIM steps.
FAST = ["model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=12",
        "train.eval_every=6", "train.val_size=32", "train.batch_size=16", "train.log_every=6",
        "train.progress=false", "eval.samples=256", "eval.sample_steps=10"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Every test's feature nets in one cache of the session's (trained once, read after)."""
    monkeypatch.setenv("MUPSWEEP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "eval-cache"))


# --------------------------------------------------------------------------------------------
# The Frechet distance and sample_fd's features
# --------------------------------------------------------------------------------------------


def test_frechet_distance_is_the_closed_form_for_diagonal_gaussians():
    """Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, size=5), rng.uniform(0.5, 2, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


def test_sample_fd_scores_real_digits_near_its_floor_and_fakes_far_above():
    """The classifier's features separate what a sample metric must separate: real digits
    (the training split, against the validation split's statistics) score far below one class
    only (a collapsed generator), blurred digits and Gaussian noise."""
    cfg = compose([])
    dataset = load_dataset(cfg.data)
    cache = feature_net_dir(cfg)
    net = cached_feature_net(dataset, data_identity(cfg), cache, torch.device("cpu"))
    assert net["accuracy"] > 0.8, net["accuracy"]  # it learned the classes: its features mean something

    def fd(images: torch.Tensor) -> float:
        mu, sigma = gaussian_statistics(features_of(net["net"].features, images, torch.device("cpu")))
        return frechet_distance(mu, sigma, net["mu"], net["sigma"])

    real = fd(dataset.train_images[:512])
    fakes = {"one class": fd(dataset.train_images[dataset.train_labels == 3][:150]),
             "blurred": fd(torch.nn.functional.avg_pool2d(dataset.train_images[:512], 3, 1, 1)),
             "noise": fd(torch.randn(512, *dataset.train_images.shape[1:]).clamp(-1, 1))}
    assert all(real < 0.2 * fake for fake in fakes.values()), (real, fakes)
    # cached: a second call reads the file, and gives the same statistics
    again = cached_feature_net(dataset, data_identity(cfg), cache, torch.device("cpu"))
    assert np.array_equal(again["mu"], net["mu"]) and len(list(cache.glob("feature-net-*.pt"))) == 1


def test_the_same_seed_gives_the_same_sample_fd_and_another_seed_another(tmp_path):
    def measured(run: str, *extra: str) -> dict:
        cfg = compose([*FAST, "eval.metrics=[sample_fd]", f"train.run_dir={tmp_path / run}", *extra])
        return train(cfg)

    a, b = measured("a"), measured("b")
    other = measured("c", "eval.seed=1")
    assert a.metrics["sample_fd"] == b.metrics["sample_fd"]
    assert a.metrics["sample_fd"] != other.metrics["sample_fd"]
    # measuring draws from its own generator: the training itself is the same either way
    plain = train(compose([*FAST, f"train.run_dir={tmp_path / 'plain'}"]))
    assert [h["validation_loss"] for h in a.history] == [h["validation_loss"] for h in plain.history]
    # every evaluation after step 0 measured it, and its cost is logged
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "validation_loss" in r]
    assert [("sample_fd" in r, "sample_fd_time_s" in r) for r in evals] == [(False, False), (True, True), (True, True)]
    assert a.eval_time_s["sample_fd"] > 0


# --------------------------------------------------------------------------------------------
# The seam: a metric registered here becomes the objective, in its own direction
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sample_spread():
    """A test metric to maximize: the standard deviation of the generated samples."""
    metric = register_metric(Metric("sample_spread", "maximize",
                                    lambda inputs: float(generate_samples(inputs).std())))
    yield metric
    METRICS.pop(metric.name)


def test_a_metric_registered_by_name_is_the_objective_in_its_direction(tmp_path, sample_spread):
    cfg = compose([*FAST, "sweep.objective=sample_spread", "sweep.n_trials=3", "sweep.pruner=none",
                   "sweep.proxy_widths=[32]", f"sweep.out_dir={tmp_path}", "eval.samples=32"])
    study = tune(cfg)
    assert study.direction == 2  # optuna's StudyDirection.MAXIMIZE
    assert study.metric_names == ["sample_spread"]
    doc = study_summary(study)
    assert (doc["objective"], doc["direction"]) == ("sample_spread", "maximize")
    values = {t["number"]: t["value"] for t in doc["trials"]}
    assert doc["value"] == max(values.values()) and values[doc["trial"]] == doc["value"]
    trial = doc["trials"][0]
    # the objective per width, and every metric measured at the width's end
    assert trial["losses"]["32"] == trial["value"] == trial["metrics"]["32"]["sample_spread"]
    assert math.isfinite(trial["metrics"]["32"]["validation_loss"])
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["objective"] == "sample_spread" and best["trial"] == doc["trial"]
    # report carries the name, and ranks by the direction
    proc = run_cli("report", str(tmp_path / "best.json"), "-o", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "objective: sample_spread (maximize)" in md
    top = md.split("## Top")[1].splitlines()[4]
    assert top.startswith(f"| {doc['trial']} |"), top


def test_tune_with_sample_fd_end_to_end(tmp_path):
    """The issue's done-when: tune -> best.json -> report -> transfer, each naming the metric;
    the feature net is trained once, next to the study."""
    out = tmp_path / "sweep"
    proc = run_cli("tune", *FAST, "sweep.objective=sample_fd", "sweep.n_trials=3", "sweep.pruner=none",
                   "sweep.proxy_widths=[32,64]", f"sweep.out_dir={out}", "--json", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["objective"] == "sample_fd" and doc["direction"] == "minimize"
    assert doc["value"] == min(t["value"] for t in doc["trials"])
    assert "best trials by sample_fd" in proc.stderr and "measuring sample_fd" in proc.stderr
    assert doc["cost"]["eval_time_s"] > 0
    for t in doc["trials"]:
        assert t["value"] == pytest.approx(np.mean([t["metrics"][w]["sample_fd"] for w in ("32", "64")]))
    assert len(list((out / "feature_nets").glob("feature-net-*.pt"))) == 1
    proc = run_cli("transfer", str(out / "best.json"), "--width", "128", "-o", str(tmp_path / "t.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "objective: sample_fd" in (tmp_path / "t.yaml").read_text()


def test_a_packed_trial_measures_what_it_measures_alone(tmp_path):
    """sweep.pack=2 measures each member on its own weights: the values of the trials alone."""
    def values(pack: int) -> list[float]:
        cfg = compose([*FAST, "sweep.objective=sample_fd", "sweep.n_trials=2", "sweep.pruner=none",
                       "sweep.sampler=random", "sweep.proxy_widths=[32]", f"sweep.pack={pack}",
                       f"sweep.out_dir={tmp_path / str(pack)}"])
        return [t.value for t in sorted(tune(cfg).trials, key=lambda t: t.number)]

    alone, packed = values(1), values(2)
    assert packed == pytest.approx(alone, rel=1e-3)


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["tune", "sweep.objective=sample_df"], ["sweep.objective=sample_df", "did you mean sample_fd?"]),
    (["train", "eval.metrics=[fidd]"], ["eval.metrics=fidd", "did you mean fid?"]),
    (["train", "eval.metrics=[fid]"], ["eval.inception_weights=PATH", "weights-inception-2015-12-05"]),
    (["train", "eval.metrics=[fid]", "eval.inception_weights=/nonexistent/w.pth"],
     ["eval.inception_weights=/nonexistent/w.pth: no such file"]),
    (["train", "eval.metrics=[sample_fd]", "eval.samples=40"],
     ["eval.samples=40 is too few for sample_fd", "64 features"]),
    (["train", "eval.metrics=[sample_fd]", "data.unconditional=true"], ["data of one class"]),
    (["train", "eval.metrics=[sample_fd]", "data.val_fraction=0.02"], ["validation split", "raise data.val_fraction"]),
])
def test_bad_objectives_are_one_line(cli, args, needles):
    assert_one_line_error(cli(args[0], *FAST, *args[1:]), *needles)


def test_fid_names_what_it_lacks_here(tmp_path, cli):
    """A weights file that exists, without torch-fidelity importable (this machine's torchvision
    does not import beside the CPU torch): one line saying what to install."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    try:
        import torch_fidelity  # noqa: F401
        pytest.skip("torch-fidelity imports here")
    except Exception:
        pass
    assert_one_line_error(cli("train", *FAST, "eval.metrics=[fid]", f"eval.inception_weights={weights}"),
                          "fid needs torch-fidelity")


def test_metric_named_refuses_with_the_list():
    with pytest.raises(UserError, match="the metrics are fid, sample_fd, validation_loss"):
        metric_named("psnr")


def test_validate_refuses_a_metric_to_maximize(cli, sample_spread):
    assert_one_line_error(cli("validate", *FAST, "sweep.objective=sample_spread", "--widths", "32,64"),
                          "sweep.objective=sample_spread is to be maximized")


def test_validate_grids_share_one_feature_net(tmp_path):
    """Every grid of a validate run (each parametrization, each depth shape) reads one cached
    feature net beside them, not one trained per grid; a cache the user names stands."""
    cfg = compose([*FAST, "sweep.objective=sample_fd"])
    out = tmp_path / "validate"
    width_grids = [run for par in ("sp", "mup")
                   for run in grid_configs(cfg, par, [32, 64], None, [-8.0, -7.0], [0], out)]
    depth_grids = grid_configs(cfg, "completep", [32, 32], [2, 4], [-8.0, -7.0], [0], out, 2)
    assert {r.sweep.out_dir for r in width_grids + depth_grids} == {
        str(out / "sp"), str(out / "mup"), str(out / "completep-w32-d2"), str(out / "completep-w32-d4")}
    assert {r.eval.cache_dir for r in width_grids + depth_grids} == {str(out / "feature_nets")}
    named = compose([*FAST, f"eval.cache_dir={tmp_path / 'mine'}"])
    assert grid_configs(named, "mup", [32], None, [-8.0], [0], out)[0].eval.cache_dir == str(tmp_path / "mine")


def test_validate_by_another_metric_judges_the_validation_loss_too(tmp_path):
    """A grid ranked by a sample metric is judged twice from one set of runs: by the metric
    and by the validation loss every trial recorded; each size's best is its own metric's."""
    register_metric(Metric("sample_level", "minimize",
                           lambda inputs: float(generate_samples(inputs).abs().mean())))
    try:
        cfg = compose([*FAST, "sweep.objective=sample_level", "eval.samples=32", f"sweep.out_dir={tmp_path}"])
        result = validate(cfg, [32, 64], [-11.0, -9.0, -7.0], [0], ("sp",))
    finally:
        METRICS.pop("sample_level")
    doc = json.loads((tmp_path / "sp" / "best.json").read_text())
    for metric, verdict in (("sample_level", result.verdicts["sp"]), ("validation_loss", result.loss_verdicts["sp"])):
        assert verdict.objective == metric
        for row in verdict.best.itertuples():
            values = {t["hparams"]["optim.lr"]: t["metrics"][str(row.width)][metric] for t in doc["trials"]}
            assert row.loss_at_best == min(values.values())
            assert 2.0 ** row.best_log2_lr == min(values, key=values.get)
    assert result.summary()["validation_loss"]["sp"]["objective"] == "validation_loss"
    assert (tmp_path / "validate_validation_loss.png").stat().st_size > 0
    md = (tmp_path / "validate.md").read_text()
    assert "sample level at best" in md and "The same runs judged by validation_loss" in md


def test_a_study_resumed_with_another_objective_is_refused(tmp_path):
    """Values of two metrics must not mix in one study: the objective is in its signature."""
    out = tmp_path / "sweep"
    first = run_cli("tune", *FAST, "sweep.n_trials=1", "sweep.proxy_widths=[32]", f"sweep.out_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("tune", *FAST, "sweep.n_trials=2", "sweep.proxy_widths=[32]", f"sweep.out_dir={out}",
                    "sweep.objective=sample_fd")
    assert_one_line_error(again, "was run with another config", "sweep.objective")


def test_ddp_ranks_measure_one_value(tmp_path):
    """Under torchrun every rank measures and rank 0's value stands: two ranks finish with
    the metric recorded once per evaluation, finite."""
    proc = run_cli("train", *FAST, "eval.metrics=[sample_fd]", "--nproc-per-node", "2",
                   f"train.run_dir={tmp_path / 'ddp'}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
             if "sample_fd" in line]
    assert len(evals) == 2 and all(math.isfinite(r["sample_fd"]) for r in evals)
