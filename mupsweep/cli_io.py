"""What the command line reads and says, apart from the commands themselves: configs
composed from overrides and a piped --config, list flags, --cfg, the tables on stderr, JSON on
stdout, and one-line refusals and interrupts (every way a command stops early)."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Typer 0.29 vendors click and exports no usage-error class: its own module is the one place
from typer._click import exceptions as typer_exceptions

from mupsweep.errors import UserError

err = Console(stderr=True)  # humans read stderr; stdout carries only products and JSON


def print_json(doc: object) -> None:
    """The only writer to stdout, so pipelines get clean JSON. NaN/inf become null."""
    from mupsweep.util import json_safe

    sys.stdout.write(json.dumps(json_safe(doc), indent=2) + "\n")
    sys.stdout.flush()


def compose_config(overrides: list[str] | None, config: Path | None = None,
             config_dir: Path | None = None, sweeps: bool = False):
    from mupsweep.config import compose

    readable = readable_config(config)
    try:
        return compose(overrides or [], config_file=readable, config_dir=config_dir, sweeps=sweeps)
    except UserError as e:  # name the stream the user gave, not its temporary copy
        if readable not in STREAM_COPIES:
            raise
        raise UserError(str(e).replace(readable, STREAM_COPIES[readable])) from None


STREAM_COPIES: dict[str, str] = {}  # temporary copy of a piped --config -> what the user named


def readable_config(config: Path | None) -> str | None:
    """--config as a file compose can read. '-' (stdin), /dev/stdin and a shell's <(...) are
    streams that can be read once: their text is kept in a temporary file for this process,
    so `mupsweep transfer best.json -o - | mupsweep train --config -` works."""
    import atexit
    import tempfile

    if config is None:
        return None
    if str(config) in STREAM_COPIES:
        return str(config)
    if str(config) != "-" and (config.is_file() or not config.exists()):
        return str(config)  # a file, or a missing path that compose names in its error
    if str(config) == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("--config -: stdin is a terminal; pipe a config in, e.g. "
                            "`mupsweep transfer best.json -o - | mupsweep train --config -`")
        text = sys.stdin.read()
    elif config.is_dir():
        raise UserError(f"--config {config}: a directory; give a YAML config file")
    else:
        try:
            text = config.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--config {config}: cannot read it ({e})") from None
    if not text.strip():
        raise UserError(f"--config {config}: empty (nothing was piped in)")
    fd, path = tempfile.mkstemp(prefix="mupsweep-config-", suffix=".yaml")
    atexit.register(os.unlink, path)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    STREAM_COPIES[path] = "stdin" if str(config) == "-" else str(config)
    return path


def print_config(cfg) -> None:
    """--cfg: the resolved config as YAML on stdout (every password hidden), then exit 0.
    The names a run looks up (the model registry, the datasets, the sweep's sampler and
    pruner) are checked first, so --cfg refuses what the run would."""
    from mupsweep.config import to_yaml
    from mupsweep.data import DATASETS
    from mupsweep.models.user import find_model_class
    from mupsweep.rundir import without_passwords
    from mupsweep.sweep.space import search_space
    from mupsweep.sweep.study import make_pruner, make_sampler

    find_model_class(cfg.model.arch)
    if cfg.data.name not in DATASETS:
        raise UserError(f"data.name={cfg.data.name!r}: unknown dataset; use one of {', '.join(DATASETS)}")
    make_sampler(cfg.sweep, search_space(cfg))
    make_pruner(cfg.sweep)
    sys.stdout.write(to_yaml(without_passwords(cfg)))
    sys.stdout.flush()
    raise typer.Exit(0)


def train_config(overrides: list[str] | None, config: Path | None, resume: Path | None,
                  config_dir: Path | None = None):
    """The run's config. `--resume R [overrides]` is `--config R/config.yaml [overrides]
    train.run_dir=R train.resume=true`."""
    if resume is None:
        return compose_config(overrides, config, config_dir)
    if config is not None:
        raise UserError("--resume takes the run's own config.yaml as the base; drop --config")
    for item in overrides or []:
        if item.split("=", 1)[0].lstrip("+") in ("train.run_dir", "train.resume"):
            raise UserError(f"--resume {resume} sets train.run_dir and train.resume; drop {item}")
    if not (resume / "config.yaml").is_file():
        raise UserError(f"--resume {resume}: no run to continue there ({resume / 'config.yaml'} "
                        "not found)")
    cfg = compose_config(overrides, resume / "config.yaml")
    cfg.train.run_dir, cfg.train.resume = str(resume), True
    return cfg


def int_list(text: str, what: str, distinct: bool = True) -> list[int]:
    """A comma-separated list flag: integers, at least one (an empty flag is not the default),
    and with distinct=True (every axis of a grid) no value twice."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what}={text!r}: give comma-separated integers") from None
    if not values:
        raise UserError(f"{what}={text!r}: give comma-separated integers (an empty list is "
                        "not the default; leave the flag out for that)")
    if distinct and len(set(values)) != len(values):
        raise UserError(f"{what}={text!r} lists a value twice")
    return values


def print_slopes(r) -> None:
    pivot = r.slopes.pivot(index="module", columns="step", values="slope")
    table = Table(title=escape(f"coordinate check [{r.parametrization}]: slope of log2 mean|act| "
                               f"vs log2 {r.axis}"), title_justify="left")
    table.add_column("module")
    for step in pivot.columns:
        table.add_column(f"step {step}", justify="right")
    for module, row in pivot.iterrows():
        cells = []
        for v in row.values:
            if math.isnan(v):
                cells.append("[dim]zero[/]")
            else:
                style = "red" if abs(v) > r.tolerance else "green"
                cells.append(f"[{style}]{v:+.2f}[/]")
        table.add_row(str(module), *cells)
    print_wide(table)
    verdict = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
    err.print(f"{verdict} ({r.parametrization}): max |slope| {r.max_abs_slope:.2f} at {r.worst}, "
              f"tolerance {r.tolerance}; plot {r.plot_path}")


def print_wide(table: Table, to_stdout: bool = False) -> None:
    """A table at its natural width when its stream is not a terminal (a file, a pipe: rich
    would squeeze it into 80 columns and cut every cell); on a terminal, the terminal's width.
    to_stdout: the table is the command's product (inspect), for `| grep` and files."""
    console = Console() if to_stdout else err
    if console.is_terminal:
        console.print(table)
        return
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(stderr=not to_stdout, width=max(console.width, natural)).print(table)


def choices(text: str, flag: str, allowed: tuple[str, ...], usage: str) -> tuple[str, ...]:
    """A comma-separated choice flag (--parametrizations): at least one, each allowed, none twice."""
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    if not chosen or any(p not in allowed for p in chosen) or len(set(chosen)) != len(chosen):
        raise UserError(f"{flag}={text!r}: {usage}")
    return chosen


def print_best_trials(doc: dict, top: int = 10) -> None:
    from mupsweep.sweep.summary import objective_of, sign_of

    objective, sign = objective_of(doc), sign_of(doc)
    rows = sorted((t for t in doc["trials"] if t["state"] == "COMPLETE" and t["value"] is not None),
                  key=lambda t: sign * t["value"])[:top]
    table = Table(title=f"study {doc['study']} ({doc['parametrization']}): best trials by {objective}",
                  title_justify="left")
    keys = list(doc["hparams"]) or (list(rows[0]["hparams"]) if rows else [])
    widths = [str(w) for w in doc["proxy_widths"]]
    for col in ["trial", objective, *[f"w{w}" for w in widths], *keys]:
        table.add_column(col, justify="right")
    for t in rows:
        table.add_row(str(t["number"]), f"{t['value']:.4f}",
                      *[f"{t['losses'].get(w, math.nan):.4f}" for w in widths],
                      *[f"{t['hparams'].get(k):.4g}" if isinstance(t["hparams"].get(k), float)
                        else str(t["hparams"].get(k)) for k in keys])
    print_wide(table)
    c = doc["cost"]
    extra = "".join(f", {c[k]} {k[2:]}" for k in ("n_interrupted", "n_surplus") if c.get(k))
    measuring = f" ({c['eval_time_s']:.0f} s measuring {objective})" if c.get("eval_time_s") else ""
    err.print(f"{c['n_complete']} complete, {c['n_pruned']} pruned, {c['n_failed']} failed{extra}; "
              f"{c['flops']:.3g} FLOPs, {c['wall_time_s']:.0f} s of training{measuring}; "
              f"storage {doc['storage']}",
              highlight=False, soft_wrap=True)


def summary_argument(best: str | None, storage: str | None, study: str | None,
              overrides: list[str] | None = None) -> tuple[dict, list[str]]:
    """The study summary and the remaining overrides. With --storage the first positional
    argument is an override (there is no file), so give it back to the overrides."""
    from mupsweep.sweep.summary import load_summary, load_summary_from_storage

    overrides = list(overrides or [])
    if storage or study:
        if not (storage and study):
            raise UserError("--storage and --study go together; give both, or a best.json")
        if best is not None:
            if "=" not in best:
                raise UserError(f"give either {best} or --storage/--study, not both")
            overrides.insert(0, best)
        return load_summary_from_storage(storage, study), overrides
    if best is None:
        raise UserError("no study summary: give best.json, '-' for stdin, or --storage/--study")
    return load_summary(best), overrides


def print_lr_by_width(rows: list[dict], objective: str = "validation_loss") -> None:
    table = Table(title=f"best lr per proxy width, by {objective}", title_justify="left")
    for col in ("width", "best lr", "log2 lr", objective, "trials"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["width"]), f"{r['lr']:.3g}", f"{r['log2_lr']:+.2f}", f"{r['loss']:.4f}",
                      str(r["trials"]))
    err.print(table)


def say_interrupted(e: KeyboardInterrupt, fallback: str) -> None:
    """An interrupted command's one line (what was kept, how to go on: `stopping.Interrupted`
    carries it) and its exit code, 130 for Ctrl-C, 143 for SIGTERM. Typer turns a
    KeyboardInterrupt that leaves a command into a silent exit 130: commands call this."""
    err.print(str(e) or fallback, highlight=False, markup=False, soft_wrap=True)
    sys.exit(getattr(e, "exit_code", 130))


def hydra_cfg_spelling(args: list[str]) -> list[str]:
    """Hydra's `--cfg job` (and `--cfg all`) is mupsweep's `--cfg`: the value is dropped
    (mupsweep's config is the job config; it has no Hydra runtime config for `--cfg hydra`)."""
    out = []
    for i, arg in enumerate(args):
        if i > 0 and args[i - 1] == "--cfg" and arg in ("job", "all", "hydra"):
            if arg == "hydra":
                raise UserError("--cfg hydra: mupsweep runs no Hydra job, so it has no Hydra "
                                "config; --cfg (or --cfg job) prints mupsweep's")
            continue
        out.append(arg)
    return out


def refuse(message: str, json_out: bool, code: int) -> None:
    """One line on stderr (a rank under `train --nproc-per-node` hands it to the launcher),
    with --json the error object on stdout; exit `code`."""
    from mupsweep.launch import write_rank_error

    message = " ".join(message.split())  # one line, whatever the message held
    if not write_rank_error(message, os.environ.get("RANK", "0")):
        err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        if json_out:
            print_json({"error": message, "exit_code": code})
    sys.exit(code)


def usage_line(e: typer_exceptions.UsageError) -> str:
    """Typer's usage error (it suggests the nearest command itself) as one line, with where the
    help is."""
    where = e.ctx.command_path if e.ctx is not None else "mupsweep"
    return f"{e.format_message().rstrip('.')} (see '{where} --help')"


def say_verdicts(run_grids: Callable[[], Any], json_out: bool) -> None:
    """Run validate's grids and say what they show: the JSON summary on stdout if asked, then
    the table and figure, or why a grid was not judged (exit 1)."""
    try:
        result = run_grids()
    except KeyboardInterrupt as e:  # tune re-queued the running grid points
        say_interrupted(e, "interrupted; re-run the same command to continue")
    except RuntimeError as e:  # a worker process died: the studies are intact
        refuse(f"{e}; re-run the same command to continue", json_out, 1)
    if json_out:
        print_json(result.summary())
    if result.incomplete:
        for why in result.incomplete.values():
            err.print(f"[red]not judged:[/] {escape(why)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print(Path(result.table_md).read_text(), highlight=False)
    err.print(f"figure {result.figure}", highlight=False)
    if result.loss_figure:
        err.print(f"figure {result.loss_figure}", highlight=False)
