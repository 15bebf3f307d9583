"""`sweep.pack`: a worker trains several trials at once as one packed model, through real
Optuna storages and real worker processes, and the study ends as an unpacked one would."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import assert_one_line_error, frozen_mid_trial, run_cli

from mupsweep.config import compose
from mupsweep.sweep.study import open_study
from mupsweep.sweep.tune import tune

# The smallest useful trial (as tests/test_tune.py's FAST): depth 2, 6 steps of batch 16.
FAST = ["model=dit-tiny", "model.depth=2", "train.samples=0", "train.steps=6",
        "train.eval_every=3", "train.val_size=32", "train.batch_size=16", "train.log_every=5",
        "sweep.proxy_widths=[32]"]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="mupsweep", storage=f"sqlite:///{out}/study.db")


def assert_exact_budget(study: optuna.Study, n: int) -> None:
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in FINISHED for t in trials) == n, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


# Three fixed HP sets (log2 lr, log2 init_mult, log2 output_mult), enqueued in every mode.
HP_SETS = [{"optim.lr:log2": -8.0, "model.init_mult:log2": 0.0, "model.output_mult:log2": 0.0},
           {"optim.lr:log2": -7.0, "model.init_mult:log2": -1.0, "model.output_mult:log2": 1.0},
           {"optim.lr:log2": -10.0, "model.init_mult:log2": 0.5, "model.output_mult:log2": -1.0}]


def enqueued_sweep(out: Path, pack: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = compose([*FAST, "sweep.proxy_widths=[32,64]", "sweep.n_trials=3", "sweep.pruner=none",
                   f"sweep.pack={pack}", f"sweep.out_dir={out}"])
    study = open_study(cfg)
    for hp in HP_SETS:
        study.enqueue_trial(hp)
    return tune(cfg)


def test_a_packed_sweep_gives_each_trial_its_unpacked_result(tmp_path):
    """The same enqueued HP sets, one at a time and as one pack of 3: the same per-width
    losses, objective values, FLOPs and best trial."""
    one = {t.number: t for t in enqueued_sweep(tmp_path / "one", pack=1).trials}
    packed = {t.number: t for t in enqueued_sweep(tmp_path / "pack", pack=3).trials}
    assert sorted(one) == sorted(packed) == [0, 1, 2]
    for n in one:
        a, b = one[n], packed[n]
        assert a.params == b.params and b.state == optuna.trial.TrialState.COMPLETE
        assert b.user_attrs["pack_size"] == 3 and "pack_size" not in a.user_attrs
        assert set(b.user_attrs["losses"]) == {"32", "64"}
        for width, loss in a.user_attrs["losses"].items():
            assert b.user_attrs["losses"][width] == pytest.approx(loss, rel=1e-4)
        assert b.value == pytest.approx(a.value, rel=1e-4)
        # what the pruner saw: the first width's curve at its own steps (no sawtooth of
        # widths on one axis); every width's curve in the "curves" attribute
        assert sorted(b.intermediate_values) == sorted(a.intermediate_values) == [3, 6]
        assert [b.intermediate_values[s] for s in (3, 6)] == pytest.approx(
            [a.intermediate_values[s] for s in (3, 6)], rel=1e-4)
        assert set(b.user_attrs["curves"]) == set(a.user_attrs["curves"]) == {"32", "64"}
        assert b.user_attrs["curves"]["64"] == pytest.approx(a.user_attrs["curves"]["64"], rel=1e-4)
        assert b.user_attrs["flops"] == a.user_attrs["flops"]
        assert b.user_attrs["wall_time_s"] > 0
        assert b.user_attrs["worker"]["pid"] > 0
    best = lambda trials: min(trials.values(), key=lambda t: t.value).params  # noqa: E731
    assert best(one) == best(packed)
    assert len({round(t.value, 4) for t in packed.values()}) == 3  # three different runs


def test_packs_fill_the_budget_exactly_and_a_divergent_member_is_pruned(tmp_path):
    """A grid of 5 learning rates in packs of 3 (then 2): the diverging lr is pruned with its
    reason, the others complete, and the study ends with exactly 5 finished trials."""
    out = tmp_path / "sweep"
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", "sweep.n_trials=5", "sweep.pack=3",
                   "sweep.sampler=grid", "sweep.pruner=none",
                   "sweep.params=[{name:optim.lr,type:categorical,choices:[4.0,0.001,0.002,0.004,0.0005]}]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(out)
    assert_exact_budget(study, 5)
    trials = {t.user_attrs["hparams"]["optim.lr"]: t for t in study.trials}
    assert sorted(t.user_attrs["pack_size"] for t in trials.values()) == [2, 2, 3, 3, 3]
    bad = trials.pop(4.0)
    assert bad.state == optuna.trial.TrialState.PRUNED and "diverged" in bad.user_attrs["reason"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values())


def test_a_pack_of_every_trial_warns_that_the_pruner_cannot_prune(tmp_path):
    """Hyperband sizes its rungs from the first finished trial: in one pack of all trials none
    finishes first, so none is pruned; tune says so instead of leaving the user to wonder."""
    proc = run_cli("tune", *FAST, f"sweep.out_dir={tmp_path}", "sweep.n_trials=2", "sweep.pack=2",
                   "sweep.sampler=random")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep.pack=2 packs all 2 trials at once" in " ".join(proc.stderr.split())
    proc = run_cli("tune", *FAST, f"sweep.out_dir={tmp_path}/b", "sweep.n_trials=2", "sweep.pack=1")
    assert "packs all" not in proc.stderr


def test_two_pack_workers_share_a_journal_study(tmp_path):
    journal = tmp_path / "study.journal"
    proc = run_cli("tune", *FAST, f"sweep.out_dir={tmp_path}/sweep", "sweep.n_trials=5",
                   "sweep.pack=2", "--storage", str(journal), "--workers", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    study = optuna.load_study(study_name="mupsweep", storage=optuna.storages.JournalStorage(backend))
    assert_exact_budget(study, 5)
    assert len({t.user_attrs["worker"]["pid"] for t in study.trials if "worker" in t.user_attrs}) == 2


def test_a_killed_pack_worker_has_its_trials_failed_and_retried(tmp_path):
    """SIGKILL a worker while it trains a pack of 2: both trials' heartbeats stop, a restart
    fails and re-queues them with the same parameters (one pack again), and the study ends with
    exactly n_trials finished."""
    out = tmp_path / "sweep"
    # the restart must run the same config (the study refuses another budget)
    hb = ["sweep.heartbeat_s=1", "sweep.grace_s=2", "sweep.n_trials=2", "sweep.pack=2",
          "train.steps=150", "train.eval_every=50"]
    proc = subprocess.Popen([sys.executable, "-m", "mupsweep.cli", "tune", *FAST,
                             f"sweep.out_dir={out}", *hb],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with frozen_mid_trial(proc, lambda: load(out), n=2) as running:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = sorted(t.number for t in running)
    proc = run_cli("tune", *FAST, f"sweep.out_dir={out}", *hb)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(out)
    assert_exact_budget(study, 2)
    for number in killed:
        assert study.trials[number].state == optuna.trial.TrialState.FAIL
        retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
        assert len(retried) == 1 and retried[0].state in FINISHED
        assert retried[0].params == study.trials[number].params


@pytest.mark.parametrize("args, needles", [
    (["sweep.pack=0"], ["sweep.pack=0 must be an integer >= 1"]),
    (["sweep.pack=2", "sweep.params=[{name:model.depth,type:categorical,choices:[2,3]}]"],
     ["sweep.pack=2", "model.depth", "sweep.pack=1"]),
    (["sweep.pack=2", "train.compile=true"], ["train.compile=false"]),
])
def test_bad_pack_settings_are_one_line(tmp_path, args, needles):
    proc = run_cli("tune", *FAST, f"sweep.out_dir={tmp_path}", *args, timeout=60)
    assert_one_line_error(proc, *needles)


def test_validate_trains_each_width_of_its_grid_as_one_pack(tmp_path):
    """validate's lr grid as one pack reads the same losses as one trial at a time."""
    from mupsweep.validate import validate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = compose([*FAST, f"sweep.out_dir={tmp_path}"])
    tables = {}
    for pack in (3, 1):
        cfg.sweep.study = f"grid-{pack}"
        result = validate(cfg, widths=[32, 64], log2_lrs=[-9.0, -8.0, -7.0], seeds=[0],
                          parametrizations=("mup",), out_dir=str(tmp_path / f"v{pack}"), pack=pack)
        tables[pack] = result.verdicts["mup"].table.sort_values(["width", "log2_lr"])
    study = optuna.load_study(study_name="grid-3-mup", storage=f"sqlite:///{tmp_path}/study.db")
    assert [t.user_attrs["pack_size"] for t in study.trials] == [3, 3, 3]
    assert len(tables[1]) == 6
    assert tables[3]["loss"].tolist() == pytest.approx(tables[1]["loss"].tolist(), rel=1e-4)
