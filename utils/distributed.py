"""Data-parallel training under ``torchrun``: process group set-up and the few collectives we need.

A single process (no ``WORLD_SIZE`` in the environment, or 1) uses the same code with every
collective a no-op, so the training loop has one path. How the model itself is spread over the
processes (replicated, FSDP, DeepSpeed) is ``utils.training.backends``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from utils.errors import SuiteError


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 outside torchrun) and its collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops for one process) -------------------------------------------------

    def all_reduce_(self, tensor, op: str = "sum"):
        """Sum (or max) ``tensor`` over ranks in place (and return it)."""
        if self.active:
            import torch.distributed as td

            td.all_reduce(tensor, op=td.ReduceOp.SUM if op == "sum" else td.ReduceOp.MAX)
        return tensor

    def most(self, n: int) -> int:
        """The largest ``n`` over ranks."""
        if not self.active:
            return n
        import torch

        return int(self.all_reduce_(torch.tensor([n]), op="max")[0])

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn, *args, **kwargs):
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank, so a failure on
        rank 0 stops the others with the same message instead of leaving them waiting forever."""
        if not self.active:
            return fn(*args, **kwargs)
        result, error, own = None, None, None
        if self.main:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # every rank must hear of it, or the others wait forever
                own = exc
                error = str(exc) if isinstance(exc, SuiteError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
        result, error = self.broadcast((result if own is None else None, error))
        if own is not None:
            raise own
        if error is not None:
            raise SuiteError(error)
        return result

    def close(self, clean: bool = True) -> None:
        """Destroy the process group. ``clean`` (every rank got here without an error): first wait for all
        ranks, so that none tears down its side while another still has a collective in flight (gloo then
        aborts the process: "terminate called without an active exception")."""
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                if clean:
                    td.barrier()
                td.destroy_process_group()


def from_env(stage: str) -> Dist:
    """The process's place in a ``torchrun`` job (one process when not launched by torchrun); ``stage`` names
    who reports the process group."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if world > 1:
        import torch.distributed as td

        if cuda:
            torch.cuda.set_device(local)
        if not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo")
        if rank == 0:
            print(f"{stage}: data parallel over {world} processes ({'nccl' if cuda else 'gloo'})", file=sys.stderr)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)
