"""Data-parallel training under ``torchrun``: process group set-up and the few collectives we need.

A single process (no ``WORLD_SIZE`` in the environment, or 1) uses the same code with every
collective a no-op, so the training loop has one path. Gradients are all-reduced once per optimizer
step (after accumulation), which is exact whatever the number of micro-batches each rank ran.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.errors import SuiteError


@dataclass
class Dist:
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
    fsdp: bool = False
    engine: object = None  # the DeepSpeed engine under --deepspeed
    zero_stage: int = 0

    @property
    def sharded(self) -> bool:
        """Weights or gradients live split over ranks: every rank must join every forward/backward."""
        return self.fsdp or self.engine is not None

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

    def shard(self, model):
        """FSDP (torch's fully_shard): every decoder layer, then the whole model, sharded over ranks."""
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise SuiteError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (its "
                             "_no_split_modules is empty); train without --fsdp")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        self.fsdp = True
        return model

    def deepspeed(self, model, optimizer, config_path: str, micro_batch_size: int, max_grad_norm: float,
                  bf16: bool = False):
        """Wrap ``model`` and ``optimizer`` in a DeepSpeed engine (ZeRO stage from the config file).

        The loop keeps control of the batch: DeepSpeed is told micro_batch_size with no accumulation of
        its own (``managed_gradient_accumulation`` off: each ``step()`` is the boundary), and the
        batch-size and clipping keys of the user's config are overridden from the flags."""
        import contextlib
        import json

        # DeepSpeed logs and builds its ops on stdout, which is this stage's payload.
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed

        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
        config.update({"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
                       "train_batch_size": micro_batch_size * self.world_size,
                       "managed_gradient_accumulation": False, "gradient_clipping": max_grad_norm,
                       "bf16": {"enabled": bf16}, "fp16": {"enabled": False}})
        config.pop("optimizer", None)  # the suite's AdamW and schedule
        config.pop("scheduler", None)
        with contextlib.redirect_stdout(sys.stderr):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        return self.engine

    def _gathered(self, model, modifier_rank=None):
        """Under ZeRO-3, a context in which the trainable parameters are whole on every rank."""
        import contextlib

        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def put_weights(self, model, weights: dict) -> None:
        """Copy whole weights (held by rank 0 at least) into the model, whatever its sharding."""
        from utils.training.checkpoint import copy_weights

        if self.fsdp:
            self.load_state(model, None, weights if self.main else {}, None)
            return
        with self._gathered(model, modifier_rank=0):
            if self.main or self.zero_stage != 3:
                copy_weights(model, weights)

    def trainable_state(self, model) -> dict:
        """The trained parameters as whole CPU tensors. Under FSDP this is a collective: every rank must
        call it; rank 0 gets the tensors, the others an empty dict."""
        if not self.fsdp:
            from utils.training.checkpoint import trainable_copy

            with self._gathered(model):
                return trainable_copy(model) if self.main or self.zero_stage != 3 else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))
        return {k: v for k, v in state.items() if k in trained}  # tied frozen weights can slip in

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer state (collective under FSDP, like trainable_state; DeepSpeed saves its own)."""
        if self.engine is not None:
            return {}
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))

    def load_state(self, model, optimizer, weights: dict, optim: dict | None) -> None:
        """Put whole (unsharded) weights and optimizer state back into a sharded model."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # Rank 0's whole tensors are broadcast and each rank keeps its shard.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        if model is not None:
            set_model_state_dict(model, weights, options=options)
        if optim is not None:
            set_optimizer_state_dict(model, optimizer, optim, options=options)

    def all_reduce_grads(self, params) -> None:
        """Sum the gradients of ``params`` over ranks, in one flat buffer (a rank without rows this step
        contributes zeros)."""
        if not self.active or self.sharded:  # FSDP and DeepSpeed reduce gradients themselves
            return
        import torch

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def close(self) -> None:
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
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
