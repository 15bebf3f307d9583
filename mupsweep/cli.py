"""The `mupsweep` command line: thin. Each command composes a config, calls one library
function and prints. Humans read stderr (rich); `--json` puts one document on stdout.

Exit codes: 0 ok; 1 the work ran and failed its own check (coord check); 2 bad input.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

# Typer 0.29 vendors click and exports no usage-error class: its own module is the one place
from typer._click import exceptions as typer_exceptions

from mupsweep.cli_io import (
    choices,
    compose_config,
    err,
    hydra_cfg_spelling,
    int_list,
    print_best_trials,
    print_config,
    print_json,
    print_lr_by_width,
    print_slopes,
    print_wide,
    readable_config,
    refuse,
    say_interrupted,
    say_verdicts,
    summary_argument,
    train_config,
    usage_line,
)
from mupsweep.errors import CheckFailed, UserError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                  help="muP hyperparameter transfer for diffusion transformers.")

OVERRIDES = typer.Argument(None, help="Hydra overrides: model=dit-tiny model.width=128 optim.lr=2e-3 "
                           "(groups and their options: below)")
JSON = typer.Option(False, "--json", help="print one JSON document on stdout")
CONFIG = typer.Option(None, "--config", help="a resolved YAML (from transfer or a run dir) as base")
PRINT_CFG = typer.Option(False, "--cfg", help="print the resolved config (YAML) on stdout and "
                         "exit without running (Hydra's --cfg job)")
CONFIG_DIR = typer.Option(None, "--config-dir", help="your config groups (DIR/model/NAME.yaml is "
                          "model=NAME) [default: ./configs when it exists]")


def _groups_epilog() -> str:
    """The config groups and their options on the search path, for --help."""
    from mupsweep.config import config_groups

    try:
        groups = config_groups()
    except (OSError, UserError):
        return ""
    listed = "\n\n".join(f"{'+' if g == 'experiment' else ''}{g}=: {', '.join(opts)}"
                         for g, opts in groups.items())
    return ("Config groups (group=option; add your own as ./configs/GROUP/NAME.yaml or "
            f"--config-dir DIR):\n\n{listed}")


EPILOG = _groups_epilog()
app.info.epilog = EPILOG


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


@app.command(epilog=EPILOG)
def train(overrides: list[str] = OVERRIDES, config: Path = CONFIG, json_out: bool = JSON,
          print_cfg: bool = PRINT_CFG, config_dir: Path = CONFIG_DIR,
          resume: Path = typer.Option(None, "--resume", help="continue the run in this run "
                                      "directory: its config.yaml is the base, with overrides "
                                      "on top (train.steps may grow)"),
          nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="DDP processes (torchrun)"),
          nnodes: str = typer.Option("1", "--nnodes", help="torchrun --nnodes"),
          rdzv_endpoint: str = typer.Option(None, "--rdzv-endpoint", help="torchrun rendezvous host:port"),
          node_rank: int = typer.Option(None, "--node-rank", help="torchrun --node-rank")) -> None:
    """Train a model (a full run, or any config): checkpoints, metrics, samples, summary.

    Each run gets a new directory (`runs/train/DATE_TIME`) unless train.run_dir is given;
    exit 1 when the run diverged."""
    from mupsweep.launch import check_launch, launch_train

    check_launch(nproc_per_node, nnodes, node_rank)
    if config is not None:  # a pipe is read once, here: the ranks read the same text from a file
        config = Path(readable_config(config))
    cfg = train_config(overrides, config, resume, config_dir)  # validate before any process starts
    if print_cfg:
        print_config(cfg)
    if nproc_per_node > 1 or nnodes != "1":
        args = ["train", *(overrides or [])]
        for flag, value in (("--config-dir", config_dir), ("--config", config), ("--resume", resume)):
            if value:
                args += [flag, str(value)]
        launch_train(cfg, args + (["--json"] if json_out else []), nproc_per_node, nnodes,
                     rdzv_endpoint, node_rank)
        return

    from mupsweep.stopping import Interrupted, stop_signals
    from mupsweep.train import train as run_train

    try:
        with stop_signals():  # SIGTERM too: the last checkpoint stays, resume is exact
            result = run_train(cfg)
    except KeyboardInterrupt as e:
        by = Interrupted.of(e, "").by
        kept = ("the run directory keeps its last checkpoint (every train.ckpt_every="
                f"{cfg.train.ckpt_every} steps); continue with the `mupsweep train --resume` line "
                "printed at its start" if cfg.train.ckpt_every else
                "nothing was checkpointed (train.ckpt_every=0 saves only at the end): re-run to "
                "start again, with train.ckpt_every=N to keep progress")
        say_interrupted(Interrupted.of(e, f"interrupted{by}: {kept}"), "")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    status = "[red]diverged:[/] " + escape(result.reason) if result.diverged else "[bold]done[/]"
    others = "".join(f", {name} {value:.4g}" for name, value in result.metrics.items()
                     if name != "validation_loss")
    err.print(f"{status}  validation loss {result.initial_validation_loss:.4f} -> "
              f"{result.validation_loss:.4f}{others} in {result.steps} steps, {result.wall_time_s:.1f} s; "
              f"run dir {result.run_dir}" + (f", samples {result.samples_path}" if result.samples_path else ""),
              highlight=False, soft_wrap=True)
    if json_out:
        print_json(result.to_dict())
    if result.diverged:  # the run's own check failed: its numbers must not pass for a result
        raise typer.Exit(1)


@app.command()
def preset(name: str = typer.Argument(..., help="your preset's name (GROUP=NAME selects it)"),
           source: str = typer.Option(..., "--from", help="the packaged preset to start from, "
                                      "e.g. dit-s-2"),
           group: str = typer.Option("model", "--group", help="its config group"),
           config_dir: Path = typer.Option(None, "--config-dir", help="where your configs live "
                                           "[default: ./configs]")) -> None:
    """Start a preset of your own from a packaged one, from any directory: writes
    ./configs/GROUP/NAME.yaml (edit it; `model=NAME` then selects it)."""
    from mupsweep.config import copy_preset

    path, selector = copy_preset(group, source, name, config_dir)
    err.print(f"wrote {path}; edit it, then use {selector} (check what it composes: "
              f"mupsweep train {selector} --cfg)", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# coord-check and inspect
# --------------------------------------------------------------------------------------------


@app.command("coord-check", epilog=EPILOG)
def coord_check(overrides: list[str] = OVERRIDES, json_out: bool = JSON,
                print_cfg: bool = PRINT_CFG, config_dir: Path = CONFIG_DIR,
                both: bool = typer.Option(False, "--both", help="also run SP (with --depths: the "
                                          "other depth parametrization), to show it fail"),
                depths: str = typer.Option(None, "--depths", help="check across depth instead, "
                                           "width fixed: comma-separated depths, e.g. 2,4,8,16")) -> None:
    """Prove the parametrization is muP: activation size vs width over the first steps
    (with --depths: activation size and per-step update of the residual stream vs depth)."""
    from mupsweep.config import set_by_path
    from mupsweep.coordcheck import coord_check as run_check

    cfg = compose_config(overrides, config_dir=config_dir)
    if print_cfg:
        print_config(cfg)
    if depths is not None:
        _coord_check_depths(cfg, int_list(depths, "--depths"), both, json_out)
    parametrizations = [cfg.model.parametrization] + (["sp" if cfg.model.parametrization == "mup" else "mup"] if both else [])
    results = []
    for par in parametrizations:
        set_by_path(cfg, "model.parametrization", par)
        with err.status(f"coordinate check ({par}) at widths {cfg.coord.widths} ..."):
            r = run_check(cfg, out_dir=cfg.coord.out_dir)
        results.append(r)
        print_slopes(r)
    if json_out:
        print_json([r.summary() for r in results])
    # the verdict is the first (requested) parametrization's
    raise typer.Exit(0 if results[0].passed else 1)


def _coord_check_depths(cfg, depths: list[int], both: bool, json_out: bool) -> None:
    """coord-check --depths: the depth parametrization asked for (and with --both the other
    one); exits with the first one's verdict."""
    from mupsweep.config import check_config, set_by_path
    from mupsweep.coordcheck import coord_check as run_check

    first = cfg.model.depth_parametrization
    results = []
    for par in [first] + ([{"none": "completep"}.get(first, "none")] if both else []):
        set_by_path(cfg, "model.depth_parametrization", par)
        check_config(cfg)
        base = cfg.model.base_depth if cfg.model.base_depth is not None else min(depths)
        with err.status(f"depth coordinate check ({par}, base depth {base}) at depths {depths}, "
                        f"width {cfg.model.width} ..."):
            r = run_check(cfg, out_dir=cfg.coord.out_dir, depths=depths)
        results.append(r)
        print_slopes(r)
    if json_out:
        print_json([r.summary() for r in results])
    raise typer.Exit(0 if results[0].passed else 1)


@app.command(epilog=EPILOG)
def inspect(overrides: list[str] = OVERRIDES, config: Path = CONFIG, json_out: bool = JSON,
            print_cfg: bool = PRINT_CFG, config_dir: Path = CONFIG_DIR) -> None:
    """Show each parameter's muP role, init std and the lr the optimizer really uses."""
    from mupsweep.completep import base_depth_of
    from mupsweep.data import load_dataset
    from mupsweep.parametrize import (
        base_shape_widths,
        build_model,
        data_spec_of,
        describe_blocks,
        describe_parameters,
        make_optimizer,
    )

    cfg = compose_config(overrides, config, config_dir)
    if print_cfg:
        print_config(cfg)
    model = build_model(cfg.model, data_spec_of(load_dataset(cfg.data)))
    rows = describe_parameters(model, cfg.model, make_optimizer(model, cfg.model, cfg.optim))
    m = cfg.model
    if m.parametrization == "mup":
        base, delta = base_shape_widths(m)
        shapes = (f"base shapes: width {base} ({base // m.head_dim} heads of {m.head_dim}), "
                  f"delta {delta} ({delta // m.head_dim} heads)")
    else:
        shapes = "SP: no base shapes (every width multiplier is 1)"
    depth = (f", depth {m.depth}" if m.depth_parametrization == "none" else
             f", depth {m.depth} ({m.depth_parametrization}, base depth {base_depth_of(m)}, "
             f"alpha {m.depth_alpha:g})")
    table = Table(title=f"{m.arch} width {m.width} ({m.parametrization}, {shapes}{depth}, "
                  f"lr {cfg.optim.lr:g})", title_justify="left")
    for col in ("parameter", "shape", "role", "block", "init", "init std", "lr", "lr x",
                "depth lr x", "eps"):
        table.add_column(col, justify="left" if col in ("parameter", "role", "init") else "right",
                         no_wrap=col == "parameter")
    for r in rows:
        table.add_row(r["name"], "x".join(map(str, r["shape"])), r["role"],
                      "yes" if r["residual_block"] else "", r["init"], f"{r['init_std']:.4g}",
                      f"{r['lr']:.3g}", f"{r['lr_mult']:.3g}", f"{r['depth_lr_mult']:.3g}",
                      f"{r['eps']:.3g}")
    print_wide(table, to_stdout=not json_out)  # the product: stdout, unless JSON is
    blocks = describe_blocks(model)
    mults = sorted({b["residual_mult"] for b in blocks})
    err.print(f"{len(blocks)} residual blocks, each branch added x "
              f"{', '.join(f'{v:.4g}' for v in mults)} "
              f"({'m_L^-alpha = (base_depth / depth)^alpha' if m.depth_parametrization == 'completep' else 'no depth scaling'})")
    n = sum(math.prod(r["shape"]) for r in rows)
    err.print(f"{len(rows)} tensors, {n:,} parameters")
    if json_out:
        print_json(rows)


# --------------------------------------------------------------------------------------------
# demo: the main job on the built-in data
# --------------------------------------------------------------------------------------------


@app.command()
def demo(out_dir: str = typer.Option(None, "--out", help="where everything goes "
                                      "[default: runs/demo, with --quick runs/demo-quick]"),
         n_trials: int = typer.Option(None, "--trials", help="sweep trials on the proxies "
                                      "[default: 12, with --quick 6]"),
         quick: bool = typer.Option(False, "--quick", help="a first look in about a minute: 6 "
                                    "trials of 60 steps, a width-128 target trained 600 steps "
                                    "(its samples are digits)"),
         json_out: bool = JSON) -> None:
    """The main job on built-in digits: coord-check, tune, transfer, train, report."""
    import optuna

    from mupsweep.demo import QUICK, run_demo
    from mupsweep.report import check_output_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = dict(QUICK) if quick else {}
    if n_trials is not None:
        settings["n_trials"] = n_trials
    if out_dir is None:  # (a str, not a Path: Typer makes Path("") the current directory)
        out_dir = "runs/demo-quick" if quick else "runs/demo"
    try:
        summary = run_demo(check_output_dir(out_dir, "--out"), console=err, **settings)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the line says the stage and what out_dir keeps
        say_interrupted(e, "interrupted")
    if json_out:
        print_json(summary)
    raise typer.Exit(0 if summary["coord_check_mup"]["passed"] else 1)


@app.command(epilog=EPILOG)
def validate(overrides: list[str] = OVERRIDES, json_out: bool = JSON,
             print_cfg: bool = PRINT_CFG, config_dir: Path = CONFIG_DIR,
             widths: str = typer.Option(None, "--widths", help="comma-separated widths "
                                        "[default: 32,64,128,256; with --depths: model.width, or "
                                        "one width per depth for a joint grid]"),
             lrs: str = typer.Option("-12:-5", "--log2-lr", help="log2 lr grid LOW:HIGH[:STEP]"),
             seeds: str = typer.Option("0", "--seeds", help="comma-separated seeds"),
             only: str = typer.Option("sp,mup", "--parametrizations", help="sp,mup or one of them"),
             workers: int = typer.Option(1, "--workers", help="worker processes per study"),
             pack: int = typer.Option(None, "--pack", help="grid points trained at once as one "
                                      "packed model (default: the whole grid on a GPU, 1 on a CPU)"),
             depths: str = typer.Option(None, "--depths", help="grid across depth instead: "
                                        "comma-separated depths, e.g. 2,4,8,16 (muP, none vs completep)"),
             depth_pars: str = typer.Option("none,completep", "--depth-parametrizations",
                                            help="with --depths: none,completep or one of them")) -> None:
    """Grid of log2 lr x width in muP and SP: does the optimum stay put? (figure + table)

    With --depths: log2 lr x depth (or x (width, depth) with as many --widths), none vs
    completep. Each grid point runs once, whatever --workers; re-run the same command to
    resume. Exit 1 when a grid has missing points (re-run to complete it)."""
    import optuna

    from mupsweep.validate import check_grid, parse_log2_grid
    from mupsweep.validate import validate as run_validate

    if print_cfg:
        print_config(compose_config(overrides, config_dir=config_dir))
    grid, note = parse_log2_grid(lrs)
    if note:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    seed_list = int_list(seeds, "--seeds")
    if depths is None:  # along width: muP vs SP
        depth_list = None
        width_list = int_list("32,64,128,256" if widths is None else widths, "--widths")
        check_grid(width_list, grid, seed_list)
        pars = choices(only, "--parametrizations", ("sp", "mup"), "use sp, mup or sp,mup")
        cfg = compose_config(overrides, config_dir=config_dir)
    else:  # along depth: none vs completep, at model.width or one width per depth (a joint grid)
        depth_list = int_list(depths, "--depths")
        pars = choices(depth_pars, "--depth-parametrizations", ("none", "completep"),
                        "use none, completep or both")
        cfg = compose_config(overrides, config_dir=config_dir)
        # a joint grid may hold a width twice (one width per depth)
        width_list = (int_list(widths, "--widths", distinct=False) if widths is not None
                      else [cfg.model.width] * len(depth_list))
        check_grid(width_list, grid, seed_list, depth_list)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say_verdicts(lambda: run_validate(cfg, width_list, grid, seed_list, pars, workers=workers,
                                       pack=pack, depths=depth_list), json_out)


# --------------------------------------------------------------------------------------------
# tune: Optuna sweep of the muP hyperparameters on proxy widths (mupsweep/sweep/tune.py)
# --------------------------------------------------------------------------------------------


@app.command("tune", epilog=EPILOG)
def tune_cmd(overrides: list[str] = OVERRIDES, json_out: bool = JSON,
             print_cfg: bool = PRINT_CFG, config_dir: Path = CONFIG_DIR,
             storage: str = typer.Option(None, "--storage", help="Optuna storage: SQLAlchemy URL, "
                                         "PATH.journal or journal:PATH (= sweep.storage)"),
             study: str = typer.Option(None, "--study", help="study name (= sweep.study)"),
             workers: int = typer.Option(1, "--workers", help="worker processes on this machine")) -> None:
    """Sweep lr / init / output multiplier on narrow proxies; sweep.n_trials is the global budget.

    Re-run the same command (here or on another machine, same --storage) to add workers or to
    continue an interrupted study. Writes sweep.out_dir/trials.csv and best.json. Exit 1 when
    the sweep ran but has nothing to transfer (budget not met, or no trial completed).

    Search space: sweep.params, a list of axes {name, type (float|int|categorical), low, high,
    log2 / log, step, choices}; default: log2 of optim.lr, model.init_mult and
    model.output_mult. E.g. 'sweep.params=[{name: optim.lr, log2: true, low: -12, high: -6}]'
    (quote it for the shell), or sweep=paper-grid (lr = 2^-13 .. 2^-9, sampler grid).
    Sampler: sweep.sampler=tpe|gp|random|grid; pruner: sweep.pruner=hyperband|
    successive_halving|median|none."""
    import optuna

    from mupsweep.config import set_by_path
    from mupsweep.coordcheck import gate
    from mupsweep.sweep.summary import study_summary
    from mupsweep.sweep.tune import SweepFailed
    from mupsweep.sweep.tune import tune as run_tune

    cfg = compose_config(overrides, config_dir=config_dir, sweeps=True)
    if storage is not None:
        set_by_path(cfg, "sweep.storage", storage)
    if study is not None:
        set_by_path(cfg, "sweep.study", study)
    if print_cfg:
        print_config(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own per-trial lines instead
    gate(cfg, "tune")  # a model mupsweep converted to muP itself is checked before any sweep
    try:
        result = run_tune(cfg, workers=workers)
    except SweepFailed as e:  # best.json and trials.csv are written; show what there is
        doc = study_summary(e.study)
        print_best_trials(doc)
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        if json_out:  # the document exists (value null): the pipe's next command says why
            print_json(doc)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: workers stopped, trials re-queued, outputs written
        say_interrupted(e, "interrupted; re-run the same command to continue")
    doc = study_summary(result)
    print_best_trials(doc)
    if json_out:
        print_json(doc)


# --------------------------------------------------------------------------------------------
# transfer and report: read the sweep's study summary (a file, stdin, or the study itself)
# --------------------------------------------------------------------------------------------

BEST = typer.Argument(None, help="best.json from `mupsweep tune` ('-' reads stdin, e.g. piped "
                      "from `mupsweep tune --json`)", show_default=False)
STORAGE = typer.Option(None, "--storage", help="read the study from this Optuna storage URL instead")
STUDY = typer.Option(None, "--study", help="study name (with --storage)")


@app.command("transfer", epilog=EPILOG)
def transfer_cmd(best: str = BEST, overrides: list[str] = OVERRIDES,
                 width: int = typer.Option(None, "--width", help="target model.width"),
                 preset: str = typer.Option(None, "--preset", help="target model preset, e.g. dit-xl-2"),
                 depth: int = typer.Option(None, "--depth", help="target model.depth (HPs carry "
                                           "over under model.depth_parametrization=completep)"),
                 steps: int = typer.Option(None, "--steps", help="target train.steps"),
                 out: str = typer.Option(None, "-o", "--out", help="target YAML to write; '-' for stdout"),
                 force: bool = typer.Option(False, "--force", help="write it even for an SP study"),
                 storage: str = STORAGE, study: str = STUDY, json_out: bool = JSON,
                 config_dir: Path = CONFIG_DIR, print_cfg: bool = typer.Option(False, "--cfg", help="print the target config "
                                                "(YAML) on stdout instead of writing it (= -o -)")) -> None:
    """Best proxy HPs -> a resolved config for the wide model, with provenance and checks.

    Train it with `mupsweep train --config TARGET.yaml`."""
    from mupsweep.transfer import check_output, write_config
    from mupsweep.transfer import transfer as run_transfer

    if print_cfg:
        if out not in (None, "-"):
            raise UserError(f"--cfg prints the target config; drop -o {out}, or drop --cfg")
        out = "-"
    if out is None:
        raise UserError("no output: give -o TARGET.yaml (or -o - to print the YAML on stdout)")
    if out == "-" and json_out:
        raise UserError("-o - and --json both want stdout; write the YAML to a file with -o")
    check_output(out)
    doc, overrides = summary_argument(best, storage, study, overrides)
    result = run_transfer(doc, width=width, preset=preset, overrides=overrides, steps=steps,
                          force=force, depth=depth, config_dir=config_dir)
    if result.unreliable:
        from mupsweep.sweep.summary import objective_of

        print_lr_by_width(result.drift, objective_of(doc))
    for w in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    err.print(escape(result.cost_line), highlight=False, soft_wrap=True)
    path = write_config(result.config, out)
    m = result.config.model
    err.print(f"wrote {path if path != '-' else 'stdout'}: {m.arch} width {m.width} depth {m.depth} "
              f"({m.parametrization}), lr {result.config.optim.lr:g}", highlight=False)
    if json_out:
        print_json({"config_path": str(Path(path).resolve()), "warnings": result.warnings,
                     "provenance": result.provenance})


@app.command()
def report(best: str = BEST,
           out_dir: str = typer.Option("runs/report", "-o", "--out", help="output folder"),
           top: int = typer.Option(20, "--top", help="trials in the Markdown table"),
           storage: str = STORAGE, study: str = STUDY, json_out: bool = JSON) -> None:
    """Plots (loss vs lr per width, history) and a Markdown summary of a sweep (the summary
    on stdout; with --json, the paths instead)."""
    from mupsweep.report import check_output_dir, write_report

    check_output_dir(out_dir, "-o")  # before reading a study that may take a while
    doc, extra = summary_argument(best, storage, study)
    if extra:
        raise UserError(f"report takes no overrides (got {extra[0]})")
    md = write_report(doc, out_dir, top=top)
    err.print(f"wrote {md}, {md.parent / 'lr_vs_loss.png'}, {md.parent / 'history.png'}")
    if not json_out:  # the product, for a pipe or a file
        sys.stdout.write(md.read_text())
        sys.stdout.flush()
    else:
        print_json({"markdown": str(md), "lr_vs_loss": str(md.parent / "lr_vs_loss.png"),
                     "history": str(md.parent / "history.png")})


@app.command()
def encode(images: Path = typer.Argument(..., help="an image folder: one sub-folder per class"),
           out_dir: Path = typer.Argument(..., help="where the latent shards go (data.root)"),
           vae: Path = typer.Option(..., "--vae", help="a diffusers AutoencoderKL directory "
                                    "(save_pretrained); never downloaded"),
           image_size: int = typer.Option(256, "--image-size", help="center-crop and resize to this"),
           batch_size: int = typer.Option(32, "--batch-size", help="images per VAE call"),
           shard_size: int = typer.Option(10_000, "--shard-size", help="images per shard file"),
           device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
           json_out: bool = JSON) -> None:
    """Encode an image folder into VAE latents, in .npy shards that data=latents reads from
    disk; run it again to finish an interrupted encode (finished shards are kept)."""
    from mupsweep.encode import encode as run_encode
    from mupsweep.group_setup import resolve_device

    result = run_encode(images, out_dir, vae, image_size=image_size, batch_size=batch_size,
                        shard_size=shard_size, device=str(resolve_device(device)),
                        progress=sys.stderr.isatty())
    kept = f" ({result.shards_kept} kept from an earlier run)" if result.shards_kept else ""
    err.print(f"[bold]done[/]  {result.items} images of {result.classes} classes -> "
              f"{result.shards} shard(s){kept} of latents {tuple(result.latent_shape)} in "
              f"{result.out_dir}, {result.wall_time_s:.1f} s; train on them with: "
              f"{result.train_args()}", highlight=False, soft_wrap=True)
    if json_out:
        print_json(result.to_dict())


# --------------------------------------------------------------------------------------------
# entry point: turn bad input into one line and exit code 2
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Every way a command can refuse ends in one line on stderr (and with --json an
    {"error": ...} object on stdout, so a pipe's next command can say what failed), never a
    traceback: a usage error (a flag, a command, a flag's value: Typer's boxed usage text
    otherwise) and a UserError from library code exit 2; a sweep that ran but has nothing to
    use (tune.SweepFailed), a launch whose rank failed, exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = hydra_cfg_spelling(args)
        code = app(args=args, prog_name="mupsweep", standalone_mode=False)
    except typer_exceptions.NoArgsIsHelpError as e:  # `mupsweep` alone: the help (Typer prints it)
        if e.format_message().strip():
            err.print(e.format_message(), highlight=False, markup=False)
        sys.exit(2)
    except typer_exceptions.UsageError as e:
        refuse(usage_line(e), "--json" in args, 2)
    except UserError as e:
        refuse(str(e), "--json" in args, 2)
    except CheckFailed as e:
        refuse(str(e), "--json" in args, 1)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (stopping.Interrupted says what to do)
        say_interrupted(e, "interrupted")
    except Exception as e:
        from mupsweep.launch import RanksFailed
        from mupsweep.sweep.storage import storage_failure
        from mupsweep.sweep.tune import (
            SweepFailed,  # here only: importing it loads optuna and torch
        )

        full = storage_failure(e)  # a full disk met inside a trial, behind Optuna's AssertionError
        if full is not None:
            refuse(str(full), "--json" in args, 2)
        if isinstance(e, RanksFailed):
            refuse(str(e), "--json" in args, e.exit_code)
        if not isinstance(e, SweepFailed):
            raise
        # A command built on tune (demo, validate) whose sweep has nothing to use: exit 1.
        refuse(str(e), False, 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
