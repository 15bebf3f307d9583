"""Packed training (`train.train_group` with K > 1): K runs in one model with stacked weights
train exactly as K separate `train()` runs, a member that leaves does not disturb the others,
and the group's AdamW is torch's AdamW/MuAdamW per member (and for a run alone). Real digits,
real models, no mocks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mupsweep.config import Config, compose
from mupsweep.data import load_dataset
from mupsweep.errors import UserError
from mupsweep.group import GroupWeights, check_packable
from mupsweep.group_adamw import GroupAdamW, lr_lambda, read_member_optimizers
from mupsweep.group_setup import setup
from mupsweep.models import DataSpec
from mupsweep.parametrize import build_model, check_roles, describe_parameters, make_optimizer
from mupsweep.train import train, train_group
from mupsweep.vendor.mup import MuReadout

SMALL = ["model.width=32", "model.depth=2", "train.progress=false", "train.samples=0",
         "train.steps=12", "train.eval_every=4", "train.log_every=4", "train.val_size=32",
         "train.batch_size=16", "train.save=false", "train.resume=false"]

# Per-member settings a sweep varies: seed, lr, init and output multiplier; the last member
# also weight decay, gradient clipping and a warmup + cosine schedule.
MEMBERS = [
    {"train.seed": 0, "optim.lr": 2.0**-8, "model.init_mult": 1.0, "model.output_mult": 1.0},
    {"train.seed": 1, "optim.lr": 2.0**-7, "model.init_mult": 0.5, "model.output_mult": 2.0},
    {"train.seed": 0, "optim.lr": 2.0**-7, "model.init_mult": 1.0, "model.output_mult": 0.5,
     "optim.weight_decay": 0.1, "optim.grad_clip": 0.5, "optim.warmup_steps": 3,
     "optim.schedule": "cosine"},
]


def member_configs(base: Config, tmp: Path, members: list[dict]) -> list[Config]:
    cfgs = []
    for i, hp in enumerate(members):
        cfg = copy.deepcopy(base)
        for key, value in hp.items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        cfg.train.run_dir = str(tmp / f"m{i}")
        cfgs.append(cfg)
    return cfgs


def losses(history: list[dict]) -> list[float]:
    return [h["validation_loss"] for h in history]


@pytest.mark.parametrize("preset", ["dit-tiny", "mmdit-tiny"])
def test_packed_members_train_as_their_unpacked_runs(tmp_path, preset):
    base = compose([f"model={preset}", *SMALL])
    dataset = load_dataset(base.data)
    cfgs = member_configs(base, tmp_path / "packed", MEMBERS)
    # both use torch's fused attention kernel (a pack folds its members into the batch)
    alone = [train(c, dataset=dataset) for c in member_configs(base, tmp_path / "alone", MEMBERS)]
    packed = train_group(cfgs, dataset=dataset)
    for want, got in zip(alone, packed, strict=True):
        assert got.error is None
        r = got.result
        assert [h["step"] for h in r.history] == [h["step"] for h in want.history] == [0, 4, 8, 12]
        assert losses(r.history) == pytest.approx(losses(want.history), rel=1e-5)
        assert losses(r.history)[-1] < 0.9 * losses(r.history)[0]  # it learned
        assert (r.steps, r.flops, r.diverged) == (want.steps, want.flops, False)
        assert r.wall_time_s > 0
    # the members really differ: a pack is not K copies of one run
    finals = [losses(o.result.history)[-1] for o in packed]
    assert len({round(f, 4) for f in finals}) == 3
    # what train() writes beside a trial, each member writes in its own run_dir
    for cfg, o in zip(cfgs, packed, strict=True):
        run_dir = Path(cfg.train.run_dir)
        assert json.loads((run_dir / "result.json").read_text())["validation_loss"] == o.result.validation_loss
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines if "validation_loss" in x] == [0, 4, 8, 12]
        assert [x["step"] for x in lines if "loss" in x] == [4, 8, 12]
    alone_lr = [json.loads(x)["lr"] for x in (tmp_path / "alone" / "m2" / "metrics.jsonl").read_text().splitlines()
                if "lr" in json.loads(x)]
    packed_lr = [json.loads(x)["lr"] for x in (tmp_path / "packed" / "m2" / "metrics.jsonl").read_text().splitlines()
                 if "lr" in json.loads(x)]
    assert packed_lr == pytest.approx(alone_lr)


def lr_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k.startswith("lr")} for x in lines if "loss" in x]


def test_a_member_logs_the_lrs_its_unpacked_run_logs_away_from_the_base_width(tmp_path):
    """At width 64 on base 32 (m = 2) the roles' lrs differ: metrics.jsonl's "lr" is the base
    lr (not the first optimizer group's, which is the hidden lr / m), and each role's lr is
    logged as train() logs it, schedule (warmup) included."""
    base = compose(["model=dit-tiny", *SMALL, "model.width=64", "train.steps=4",
                    "train.eval_every=4", "train.log_every=2", "optim.warmup_steps=3"])
    dataset = load_dataset(base.data)
    train(member_configs(base, tmp_path / "alone", MEMBERS[:1])[0], dataset=dataset)
    train_group(member_configs(base, tmp_path / "packed", MEMBERS[:2]), dataset=dataset)  # a pack
    alone, packed = lr_records(tmp_path / "alone" / "m0"), lr_records(tmp_path / "packed" / "m0")
    assert alone[0]["lr_hidden"] == pytest.approx(alone[0]["lr"] / 2)  # the run really has m = 2
    assert len(packed) == len(alone) == 2
    for got, want in zip(packed, alone, strict=True):
        assert got.keys() == want.keys()
        assert list(got.values()) == pytest.approx(list(want.values()))


def test_a_member_that_leaves_does_not_change_the_others(tmp_path):
    """Member 1 is pruned at step 4 (its on_eval raises), member 3 diverges (lr 4): both leave
    with train()'s step, FLOPs and reason; members 0 and 2 train on exactly as a pack of the
    two of them does."""
    base = compose(["model=dit-tiny", *SMALL])
    dataset = load_dataset(base.data)
    diverging = {"train.seed": 2, "optim.lr": 4.0, "model.init_mult": 1.0, "model.output_mult": 1.0}
    cfgs = member_configs(base, tmp_path / "four", [*MEMBERS, diverging])

    class Pruned(Exception):
        pass

    def prune_at_4(step: int, values: dict) -> None:
        if step == 4:
            raise Pruned(f"pruned at {step}")

    four = train_group(cfgs, on_evals=[None, prune_at_4, None, None], dataset=dataset)
    two = train_group(member_configs(base, tmp_path / "two", [MEMBERS[0], MEMBERS[2]]),
                       dataset=dataset)
    for kept, alone in ((four[0], two[0]), (four[2], two[1])):
        assert losses(kept.result.history) == pytest.approx(losses(alone.result.history), rel=1e-5)
        assert kept.result.steps == 12
    pruned = four[1]
    assert isinstance(pruned.error, Pruned) and pruned.result.steps == 4
    assert pruned.result.flops == four[0].result.flops / 3
    assert not (Path(cfgs[1].train.run_dir) / "result.json").exists()  # as a pruned train()
    alone_cfg = copy.deepcopy(cfgs[3])  # its own run directory: the member's holds a run
    alone_cfg.train.run_dir = str(tmp_path / "alone")
    unpacked = train(alone_cfg, dataset=dataset)
    diverged = four[3].result
    assert four[3].error is None and unpacked.diverged and unpacked.steps < 12
    assert (diverged.diverged, diverged.steps) == (True, unpacked.steps)
    # the same rule at the same step ("validation loss X at step S is above 3.0 x its start Y");
    # X itself, a blown-up loss, agrees only in its order of magnitude
    assert diverged.reason.split(" at step ")[1] == unpacked.reason.split(" at step ")[1]


def test_a_pack_whose_members_all_leave_at_once_ends_cleanly(tmp_path):
    base = compose(["model=dit-tiny", *SMALL])

    def prune(step: int, values: dict) -> None:
        if step == 4:
            raise RuntimeError("stop")

    out = train_group(member_configs(base, tmp_path, MEMBERS[:2]), on_evals=[prune, prune])
    assert [(str(o.error), o.result.steps) for o in out] == [("stop", 4), ("stop", 4)]


def stack(cfgs: list[Config], width: int) -> tuple[list[torch.nn.Module], GroupWeights, GroupAdamW]:
    spec = DataSpec(image_size=8, channels=1, num_classes=10)
    models = []
    for seed, cfg in enumerate(cfgs):
        torch.manual_seed(seed)
        models.append(build_model(cfg.model, spec))
    opts = read_member_optimizers(models, cfgs)
    weights = GroupWeights(models)
    return models, weights, GroupAdamW(weights, opts, cfgs)


def test_packed_adamw_is_torch_adamw_per_member():
    """Two members with different lr, weight decay, betas, eps and schedules, on the same
    random gradients: GroupAdamW's weights equal MuAdamW's (muP: hidden lr / m, wd x m)."""
    cfgs = [compose(["model.width=64", "optim.weight_decay=0.1", "optim.warmup_steps=2",
                     "optim.schedule=cosine", "train.steps=6"]),
            compose(["model.width=64", "optim.lr=0.01", "optim.beta1=0.8", "optim.beta2=0.99",
                     "optim.eps=1e-6", "train.steps=6"])]
    models, weights, packed = stack(cfgs, 64)
    start = weights.member_state_dict(0)
    torch_opts = [make_optimizer(m, c.model, c.optim) for m, c in zip(models, cfgs, strict=True)]
    assert all(isinstance(o, torch.optim.AdamW) for o in torch_opts)
    assert len(torch_opts[0].param_groups) == 2 == len(packed.groups)  # hidden (lr / 2), the rest
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(c)) for o, c in zip(torch_opts, cfgs, strict=True)]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        for leaf in weights.leaves.values():
            leaf.grad = torch.randn(leaf.shape, generator=g)
        for k, model in enumerate(models):
            for name, p in model.named_parameters():
                p.grad = weights.leaves[name].grad[k].clone()
        packed.step()
        for o, s in zip(torch_opts, scheds, strict=True):
            o.step()
            s.step()
    moved = 0
    for k, model in enumerate(models):
        for name, p in model.named_parameters():
            torch.testing.assert_close(weights.leaves[name][k], p, rtol=1e-6, atol=1e-7)
            moved += not torch.equal(p, start[name]) if k == 0 else 0
    assert moved == len(start)  # every weight moved: a no-op optimizer would pass nothing


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_a_run_alone_steps_as_torch_adamw(grad_clip):
    """A group of one updates the model's own parameters as torch's MuAdamW (+ LambdaLR and
    clip_grad_norm_) does: bit for bit, step for step, and its state_dict is torch's."""
    cfg = compose(["model.width=64", "optim.weight_decay=0.1", "optim.warmup_steps=2",
                   "optim.schedule=cosine", "train.steps=6", f"optim.grad_clip={grad_clip}"])
    (model,), weights, group_opt = stack([cfg], 64)
    twin = build_model(cfg.model, DataSpec(image_size=8, channels=1, num_classes=10))
    twin.load_state_dict(model.state_dict())
    assert all(weights.leaves[n] is p for n, p in model.named_parameters())  # its own parameters
    opt = make_optimizer(twin, cfg.model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=g) * 3
            q.grad = p.grad.clone()
        group_opt.clip_grad_norms()
        group_opt.step()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(twin.parameters(), grad_clip)
        opt.step()
        sched.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    ours, theirs = group_opt.state_dict(), opt.state_dict()
    assert [len(x["params"]) for x in ours["param_groups"]] == [len(x["params"]) for x in theirs["param_groups"]]
    for i, moments in theirs["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours["state"][i][key], moments[key])


def test_packed_grad_clipping_is_per_member():
    cfgs = [compose(["model.width=32", "optim.grad_clip=0.5"]), compose(["model.width=32"])]
    _, weights, packed = stack(cfgs, 32)
    for leaf in weights.leaves.values():
        leaf.grad = torch.ones_like(leaf)
    norm = lambda: torch.linalg.vector_norm(  # noqa: E731
        torch.cat([leaf.grad.reshape(2, -1) for leaf in weights.leaves.values()], 1), dim=1)
    before = norm()
    packed.clip_grad_norms()
    after = norm()
    assert before[0] > 1 and after[0] == pytest.approx(0.5, rel=1e-4)  # clipped
    assert after[1] == before[1]  # member 1 has no clipping


def test_a_packed_member_is_an_inspectable_mup_model(tmp_path):
    """Each member keeps base shapes and roles; its lr per parameter in the pack is what
    `mupsweep inspect` shows for it alone (hidden lr / m)."""
    base = compose(["model=dit-tiny", *SMALL, "model.width=64"])
    pack = setup(member_configs(base, tmp_path, MEMBERS[:2]))
    pack.close()
    for k, hp in enumerate(MEMBERS[:2]):
        model = pack.member_model(k)
        check_roles(model)
        assert model.final_layer.linear.width_mult() == 2.0
        cfg = pack.members[k].cfg
        rows = describe_parameters(model, cfg.model, make_optimizer(model, cfg.model, cfg.optim))
        for row in rows:
            assert pack.optimizer.lr(row["name"], k) == pytest.approx(row["lr"])
            want = hp["optim.lr"] / 2 if row["role"] == "hidden" else hp["optim.lr"]
            assert row["lr"] == pytest.approx(want)
        # the stacked readout multipliers are this member's
        assert pack.weights.buffers["final_layer.linear.multipliers"][k].tolist() == [hp["model.output_mult"], 2.0]


def test_readout_keeps_mureadout_numbers_and_never_uses_an_unset_width_multiplier():
    """The readout holds its multipliers in a buffer (a packed model swaps its weights for
    stacked ones without infshape); unpacked outputs stay bit for bit MuReadout's."""
    cfg = compose(["model.width=128", "model.output_mult=0.37"])
    model = build_model(cfg.model, DataSpec(image_size=8, channels=1, num_classes=10))
    ro = model.final_layer.linear
    torch.nn.init.normal_(ro.weight)
    x = torch.randn(4, 16, 128)
    assert torch.equal(ro(x), MuReadout.forward(ro, x))
    assert (ro.output_mult, ro.width_mult()) == (0.37, 4.0)
    fresh = type(ro)(128, 4)  # never given base shapes: its output says so, it is not silently 1
    assert torch.isnan(fresh(x)).all()


def test_configs_that_cannot_share_a_pack_are_refused(tmp_path):
    base = compose(["model=dit-tiny", *SMALL])
    a, b = member_configs(base, tmp_path, MEMBERS[:2])
    b.model.depth = 3
    with pytest.raises(UserError, match="differ in model.depth"):
        check_packable([a, b])
    c = copy.deepcopy(a)
    c.train.save = True
    with pytest.raises(UserError, match="train.save=false"):
        check_packable([c, copy.deepcopy(c)])
