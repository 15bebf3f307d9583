"""`train --nproc-per-node N` (and --nnodes): torchrun's elastic launcher, run in this process
so that what a rank says reaches the user as it would from one process.

Each rank is `python -m mupsweep.cli train ...`. A rank that meets bad input (a UserError)
writes its one line to a file in RANK_ERRORS_ENV's directory instead of stderr; the launcher
prints the first rank's line once and exits 2, where torchrun would print every rank's line and
then its own ChildFailedError traceback. A rank that crashes prints its own traceback, and the
launcher one line saying which rank failed. torchrun's own log lines (the OMP_NUM_THREADS
banner, the agent's progress) are quieted: the run logs its world size itself.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

from mupsweep.errors import UserError

RANK_ERRORS_ENV = "MUPSWEEP_RANK_ERRORS"  # a directory: a rank's UserError lands in rank<N>.txt
NNODES = re.compile(r"[1-9]\d*(:[1-9]\d*)?")  # torchrun's --nnodes: N or MIN:MAX


class RanksFailed(Exception):
    """A rank exited non-zero; `exit_code` is what the launch exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def check_launch(nproc_per_node: int, nnodes: str, node_rank: int | None) -> None:
    """Refuse launch options torchrun would answer with a traceback."""
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node={nproc_per_node}: give 1 or more processes")
    match = NNODES.fullmatch(nnodes)
    if not match or (match.group(1) and int(nnodes.split(":")[0]) > int(nnodes.split(":")[1])):
        raise UserError(f"--nnodes={nnodes!r}: give a number of nodes (2) or a range MIN:MAX (1:4)")
    if node_rank is not None and node_rank < 0:
        raise UserError(f"--node-rank={node_rank}: give 0 or more")


def launch_train(cfg, rank_args: list[str], nproc_per_node: int, nnodes: str,
                 rdzv_endpoint: str | None, node_rank: int | None) -> None:
    """`train` as `nproc_per_node` ranks of `mupsweep train RANK_ARGS`. A run directory that is
    taken or holds another run is refused here, once, before every rank would repeat it."""
    if cfg.train.run_dir is not None:
        from mupsweep.rundir import RunDirLock, check_run_dir

        check_run_dir(cfg, Path(cfg.train.run_dir))
        RunDirLock(Path(cfg.train.run_dir)).check_free()
    launch(rank_args, nproc_per_node, nnodes, rdzv_endpoint, node_rank)


def write_rank_error(message: str, rank: str) -> bool:
    """In a rank under `launch`: keep a UserError's line for the launcher; False elsewhere."""
    import os

    folder = os.environ.get(RANK_ERRORS_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    (Path(folder) / f"rank{rank}.txt").write_text(message)
    return True


def launch(rank_args: list[str], nproc_per_node: int, nnodes: str = "1",
           rdzv_endpoint: str | None = None, node_rank: int | None = None) -> None:
    """Run `python -m mupsweep.cli RANK_ARGS` on nproc_per_node local ranks (torchrun's elastic
    agent). Returns when every rank exited 0; raises RanksFailed (bad input: exit 2) otherwise."""
    import os

    check_launch(nproc_per_node, nnodes, node_rank)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # torchrun sets each logger's own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    torchrun = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if rdzv_endpoint:
        torchrun += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    if node_rank is not None:
        torchrun += [f"--node-rank={node_rank}"]
    errors = Path(tempfile.mkdtemp(prefix="mupsweep-ranks-"))
    os.environ[RANK_ERRORS_ENV] = str(errors)  # the ranks inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    try:
        run(get_args_parser().parse_args([*torchrun, "-m", "mupsweep.cli", *rank_args]))
    except ChildFailedError as e:
        said = sorted(errors.glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
        if said:  # bad input met in a rank: every rank meets the same, so one line is enough
            raise RanksFailed(said[0].read_text().strip(), 2) from None
        rank, failure = min(e.failures.items())
        raise RanksFailed(f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}"
                          " (its output is above)", 1 if failure.exitcode != 2 else 2) from None
    finally:
        os.environ.pop(RANK_ERRORS_ENV, None)
        shutil.rmtree(errors, ignore_errors=True)
    sys.stdout.flush()
