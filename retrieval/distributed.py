"""Index builds across several processes: `torchrun --nproc-per-node N -m retrieval build ...` (or one process per
node with --nnodes) splits the embedding shards and the on-disk index parts between the ranks.

Rank 0 does what must happen once (the lock, chunking, training the quantizer, merging, the manifest); every rank
embeds the shards s with s % world == rank and adds the index parts p with p % world == rank. The ranks meet at
barriers between the steps (torch.distributed over gloo, so CPUs and GPUs alike). Every file is written atomically
as in a single-process build, so an interrupted distributed build resumes with any number of processes, one
included.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, NoReturn

# Long steps (embedding a shard range, training a quantizer on millions of vectors) sit between two barriers.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def main_first(self, step: Callable[[], None], then: Callable[[], None] = lambda: None) -> None:
        """`step()` on rank 0, `then()` on every rank, a barrier, then `step()` on the others. With a `step` that
        records settings the first time and checks them later, rank 0 records and the others check its record."""
        if self.main:
            step()
        then()
        self.barrier()
        if not self.main:
            step()

    def mine(self, items: list) -> list:
        """This rank's share of `items`: every world-th, from its rank."""
        return items[self.rank::self.world]


SINGLE = Ranks()


def ranks_from_env() -> Ranks:
    """The ranks torchrun set up (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT in the environment), joining a gloo
    process group unless one exists; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), dist.barrier)


def exit_process(rc: int) -> NoReturn:
    """End a command-line process (train.py, eval.py, `python -m retrieval`) with exit status `rc`. Under torchrun
    (WORLD_SIZE > 1) it leaves the process group and, once stdout, stderr and the logs are flushed, skips the
    interpreter's teardown: a C++ thread that gloo leaves joinable can otherwise abort a rank whose results are all
    written ("terminate called without an active exception"), and torchrun then reports the finished run as
    failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(rc)
    leave_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def leave_process_group() -> None:
    """Destroy the default process group if this process joined one (torchrun runs of train.py, eval.py and the build).
    Left to interpreter exit, gloo's threads can abort an otherwise finished process ("terminate called without
    an active exception")."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
