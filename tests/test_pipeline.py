"""tune -> transfer -> train round trip for every architecture, with no special cases."""

from __future__ import annotations

import optuna
import pytest

from mupsweep.config import compose
from mupsweep.sweep.summary import study_summary
from mupsweep.sweep.tune import tune
from mupsweep.train import train
from mupsweep.transfer import transfer


@pytest.mark.parametrize("preset", ["dit-tiny", "uvit-tiny", "pixart-tiny", "mmdit-tiny"])
def test_tune_transfer_train_round_trip(preset, tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = compose([f"model={preset}", "sweep.n_trials=2", "sweep.sampler=random",
                     "sweep.pruner=none", "sweep.proxy_widths=[32]", f"sweep.out_dir={tmp_path}/sweep",
                     "train.steps=4", "train.eval_every=4", "train.val_size=32", "train.batch_size=16"])
    best = study_summary(tune(sweep))
    assert best["cost"]["n_complete"] == 2 and best["cost"]["flops"] > 0

    result = transfer(best, width=64, steps=3, overrides=[f"train.run_dir={tmp_path}/target",
                                                          "train.samples=0", "train.progress=false"])
    cfg = result.config
    assert cfg.model.arch == sweep.model.arch and cfg.model.width == 64
    assert cfg.model.base_width == sweep.model.base_width  # base shapes travel with the HPs
    for key, value in best["hparams"].items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == pytest.approx(value)
    assert cfg.provenance["trial"] == best["trial"]

    run = train(cfg)
    assert run.steps == 3 and run.validation_loss < run.initial_validation_loss * 1.5
