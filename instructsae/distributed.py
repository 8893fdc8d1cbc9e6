"""torch.distributed under `torchrun`: who this process is, the process group, the few collectives the stages
use, and what rank 0 does for every rank (hold the writer lock, take the decisions all must share). Without
torchrun's environment every function here is what one process does alone, so a plain command runs as it
always did.

Backends: NCCL when this rank computes on a CUDA GPU, gloo on CPUs (and for the CPU-side barriers).
"""

import datetime
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from instructsae.errors import UserError
from instructsae.locks import writer_lock

T = TypeVar("T")

# A barrier waits for the slowest rank: a sweep's rank with the largest SAEs, an extraction's with the longest
# work unit. torchrun ends every rank when one fails, so a long timeout only guards against a silent hang.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine, which share its host memory

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def under_torchrun() -> bool:
    """torchrun (torch.distributed.run) started this process: its environment names the rank and world."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def ranks() -> Ranks:
    """This process's place, from torchrun's environment (one rank of one without it)."""
    if not under_torchrun():
        return Ranks()
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))


def start(device: str) -> Ranks:
    """Join the process group once (torchrun gives the rendezvous); one rank needs no group at all."""
    place = ranks()
    if place.distributed and not dist.is_initialized():
        on_gpu = torch.device(device).type == "cuda"
        if on_gpu:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=BARRIER_TIMEOUT)
    return place


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Leave the group cleanly (a barrier first, so no rank exits while another still needs it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def decided_on_main(decide: Callable[[], T]) -> T:
    """decide() run on rank 0 alone, its value (or its refusal, a UserError) handed to every rank: one decision
    taken once, so no rank acts on a file system it read a moment later than another."""
    if not dist.is_initialized():
        return decide()
    outcome: list = [None]
    if ranks().is_main:
        try:
            outcome = [("value", decide())]
        except UserError as error:
            outcome = [("refused", str(error))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "refused":
        refusal = UserError(value)
        refusal.said_by_main = not ranks().is_main  # the same line on every rank: rank 0 alone says it
        raise refusal
    return value


@contextmanager
def lock_on_main(target: str | Path, what: str) -> Iterator[None]:
    """TARGET's writer lock (locks.py) for a command every rank runs: rank 0 takes it for all of them, and a
    refusal (another writer holds it) stops every rank with the same line. One lock per store or folder however
    many ranks write into it: the ranks of one command share out its parts, and a second command is refused."""
    with ExitStack() as held:
        decided_on_main(lambda: held.enter_context(writer_lock(target, what)))
        yield


def balanced_assignment(costs: list[tuple[float, ...]], world: int) -> list[int]:
    """The rank of each item: largest first onto the least loaded rank (LPT), where an item's cost has several
    resources (memory, FLOPs) each measured as its share of the total and a rank's load is its largest share.
    Deterministic: ties go to the lower index, so every rank computes the same assignment."""
    totals = [sum(cost[r] for cost in costs) or 1.0 for r in range(len(costs[0]))] if costs else []
    shares = [tuple(value / total for value, total in zip(cost, totals)) for cost in costs]
    loads = [[0.0] * len(totals) for _ in range(world)]
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-max(shares[i]), i)):
        best = min(range(world), key=lambda r: (max(a + b for a, b in zip(loads[r], shares[index])), r))
        loads[best] = [a + b for a, b in zip(loads[best], shares[index])]
        owner[index] = best
    return owner


def abandon() -> None:
    """Leave the process group without waiting for the other ranks (a rank that stops on an error)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already failing; the error being reported matters more
            pass
