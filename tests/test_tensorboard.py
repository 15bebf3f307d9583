"""train.tensorboard=true: the run's loss, validation loss, lr per muP role and throughput go to
run_dir/tensorboard as well as metrics.jsonl, and a resumed run keeps one history."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mupsweep.config import compose
from mupsweep.errors import UserError
from mupsweep.metrics import tensorboard_writer
from mupsweep.train import train

RUN = ["model=dit-tiny", "model.depth=2", "model.width=128", "train.samples=0",
       "train.progress=false", "train.log_every=5", "train.eval_every=10", "train.val_size=32",
       "train.batch_size=16", "train.tensorboard=true"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_what_metrics_jsonl_gets(tmp_path):
    cfg = compose([*RUN, "train.steps=20", f"train.run_dir={tmp_path}"])
    train(cfg)
    got = scalars(tmp_path / "tensorboard")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]
    assert [s for s, _ in got["train/loss"]] == [5, 10, 15, 20]
    assert [v for _, v in got["train/loss"]] == pytest.approx([x["loss"] for x in logged], rel=1e-6)
    assert [v for _, v in got["validation/loss"]] == pytest.approx(
        [x["validation_loss"] for x in lines if "validation_loss" in x], rel=1e-6)
    # muP: hidden layers train at lr / m, m = 128 / 32
    assert got["lr/hidden"][0][1] == pytest.approx(got["lr/base"][0][1] / 4)
    assert got["lr/output"][0][1] == pytest.approx(got["lr/base"][0][1])
    steps_per_s = [v for _, v in got["throughput/steps_per_s"]]
    assert len(steps_per_s) == 3 and all(v > 0 for v in steps_per_s)
    assert got["throughput/images_per_s"][0][1] == pytest.approx(16 * steps_per_s[0])


def test_a_resumed_run_continues_its_tensorboard_history(tmp_path):
    train(compose([*RUN, "train.steps=10", f"train.run_dir={tmp_path}"]))
    train(compose([*RUN, "train.steps=20", f"train.run_dir={tmp_path}", "train.resume=true"]))
    got = scalars(tmp_path / "tensorboard")
    assert [s for s, _ in got["train/loss"]] == [5, 10, 15, 20]


def test_without_the_package_it_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'mupsweep\[tensorboard\]'"):
        tensorboard_writer(tmp_path)
