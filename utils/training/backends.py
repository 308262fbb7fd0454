"""How a training process holds the model it trains: one interface, one class per way of running.

``SingleProcess`` trains the model as it is; ``DataParallel`` (torchrun) replicates it and sums the
gradients over ranks once per optimizer step; ``FullyShardedDataParallel`` (--fsdp) shards weights,
gradients and optimizer state over ranks with torch's ``fully_shard``; ``DeepSpeed`` (--deepspeed)
hands them to a DeepSpeed ZeRO engine. The training loop calls the same methods whatever the backend:

    model = backend.shard(model)               # before the optimizer exists (FSDP's parameters change)
    runner = backend.prepare(model, optimizer)  # what runs the forward pass
    n = backend.micro_steps(len(micro))         # each step; then for each micro-batch i < n:
    backend.before_micro_batch(last=i == n - 1); ...forward...; backend.backward(loss)
    backend.reduce_gradients(); backend.step()

and saves, restores and swaps weights through ``trainable_state``, ``optimizer_state``,
``save_engine_state``, ``load_state`` and ``put_weights``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from utils.distributed import Dist
from utils.errors import SuiteError
from utils.training.checkpoint import copy_weights, trainable_copy


class SingleProcess:
    """One process: the model trains as it is; nothing is reduced or gathered."""

    # What pipeline.json records as the run's sharding (None: every process holds the whole model).
    sharding: str | None = None
    # Whether every rank must run every forward and backward together (weights or gradients live split over
    # ranks): a rank with fewer micro-batches runs empty ones.
    lockstep: bool = False

    def __init__(self, dist: Dist, max_grad_norm: float):
        self.dist, self.max_grad_norm = dist, max_grad_norm
        self.model = self.optimizer = None
        self.params: list = []

    def shard(self, model):
        """The model as this backend trains it, before any optimizer is made over its parameters."""
        return model

    def prepare(self, model, optimizer):
        """Take the model and its optimizer; returns what runs the forward pass."""
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        return model

    # -- one optimizer step --------------------------------------------------------------------------------

    @property
    def loss_scale(self) -> float:
        return 1.0

    def micro_steps(self, n: int) -> int:
        """How many forward/backward passes this rank runs for its ``n`` micro-batches."""
        return self.dist.most(n) if self.lockstep else n

    def before_micro_batch(self, last: bool) -> None:
        """Called before each micro-batch's forward pass; ``last``: the step's last one."""

    def backward(self, loss) -> None:
        (loss * self.loss_scale).backward()

    def reduce_gradients(self) -> None:
        """Combine the ranks' gradients of this step (nothing to combine in one process)."""

    def step(self) -> None:
        """Clip, step and zero the gradients."""
        import torch

        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ---------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict:
        """The trained parameters as whole CPU tensors. A collective where the model is sharded: every rank
        must call it; rank 0 gets the tensors (the others may get an empty dict)."""
        return trainable_copy(self.model)

    def optimizer_state(self) -> dict:
        """The optimizer state for a checkpoint (a collective like ``trainable_state`` where sharded)."""
        return self.optimizer.state_dict()

    def save_engine_state(self, out: Path, step: int) -> Path | None:
        """State an engine writes itself, every rank (into a folder the checkpoint then takes); None here."""
        return None

    def load_state(self, folder: Path, weights: dict, optim: dict) -> None:
        """Restore checkpoint ``folder``: its whole ``weights`` and optimizer state ``optim``."""
        copy_weights(self.model, weights)
        self.optimizer.load_state_dict(optim)

    def put_weights(self, weights: dict) -> None:
        """Copy whole weights (held by rank 0 at least) into the model."""
        copy_weights(self.model, weights)

    def final_state(self) -> dict | None:
        """The weights save_pretrained must be given (None: it reads them from the model itself)."""
        return None


class DataParallel(SingleProcess):
    """torchrun: the model replicated on every rank, gradients summed over ranks once per optimizer step
    (after accumulation), which is exact whatever the number of micro-batches each rank ran."""

    def reduce_gradients(self) -> None:
        """Sum the gradients over ranks in one flat buffer (a rank without rows this step contributes zeros)."""
        import torch

        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce_(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class FullyShardedDataParallel(SingleProcess):
    """--fsdp: every decoder layer, then the whole model, sharded over ranks (torch's ``fully_shard``)."""

    sharding = "fsdp"
    lockstep = True  # FSDP gathers weights in every forward

    @property
    def loss_scale(self) -> float:
        return self.dist.world_size  # FSDP's gradient reduction averages over ranks: the scale undoes it

    def shard(self, model):
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in names]
        if not layers:
            raise SuiteError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (its "
                             "_no_split_modules is empty); train without --fsdp")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    def before_micro_batch(self, last: bool) -> None:
        self.model.set_requires_gradient_sync(last)  # reduce once, after the step's last micro-batch

    def trainable_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          ignore_frozen_params=True))
        return {k: v for k, v in state.items() if k in trained}  # tied frozen weights can slip in

    def optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state(self, folder: Path, weights: dict, optim: dict | None) -> None:
        self._set_state(weights, optim)

    def put_weights(self, weights: dict) -> None:
        self._set_state(weights if self.dist.main else {}, None)

    def _set_state(self, weights: dict, optim: dict | None) -> None:
        """Put whole (unsharded) weights and optimizer state back: rank 0's whole tensors are broadcast and each
        rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.model, weights, options=options)
        if optim is not None:
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=options)

    def final_state(self) -> dict | None:
        return self.trainable_state()


class DeepSpeed(SingleProcess):
    """--deepspeed: ZeRO through a DeepSpeed engine (stage from the user's config file).

    The loop keeps control of the batch: DeepSpeed is told micro_batch_size with no accumulation of its
    own (``managed_gradient_accumulation`` off: each ``step()`` is the boundary), and the batch-size and
    clipping keys of the user's config are overridden from the flags. The engine reduces, clips, steps and
    zeroes the gradients itself, and saves its own (sharded) weights and optimizer state."""

    lockstep = True

    def __init__(self, dist: Dist, max_grad_norm: float, config_path: str, micro_batch_size: int, bf16: bool):
        super().__init__(dist, max_grad_norm)
        self.config_path, self.micro_batch_size, self.bf16 = config_path, micro_batch_size, bf16
        self.engine, self.zero_stage = None, 0

    @property
    def sharding(self) -> str:
        return f"deepspeed-zero{self.zero_stage}"

    @property
    def loss_scale(self) -> float:
        return self.dist.world_size  # the engine's gradient reduction averages over ranks: the scale undoes it

    def prepare(self, model, optimizer):
        super().prepare(model, optimizer)
        # DeepSpeed logs and builds its ops on stdout, which is this stage's payload.
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed

        config = json.loads(Path(self.config_path).read_text(encoding="utf-8"))
        config.update({"train_micro_batch_size_per_gpu": self.micro_batch_size, "gradient_accumulation_steps": 1,
                       "train_batch_size": self.micro_batch_size * self.dist.world_size,
                       "managed_gradient_accumulation": False, "gradient_clipping": self.max_grad_norm,
                       "bf16": {"enabled": self.bf16}, "fp16": {"enabled": False}})
        config.pop("optimizer", None)  # the suite's AdamW and schedule
        config.pop("scheduler", None)
        with contextlib.redirect_stdout(sys.stderr):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
        return self.engine

    def backward(self, loss) -> None:
        self.engine.backward(loss * self.loss_scale, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()  # clips (gradient_clipping), steps and zeroes the gradients

    def _gathered(self, modifier_rank=None):
        """Under ZeRO-3, a context in which the trainable parameters are whole on every rank."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for p in self.model.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def trainable_state(self) -> dict:
        with self._gathered():
            return trainable_copy(self.model) if self.dist.main or self.zero_stage != 3 else {}

    def optimizer_state(self) -> dict:
        return {}  # in the engine's own files (save_engine_state)

    def save_engine_state(self, out: Path, step: int) -> Path:
        engine_dir = Path(out) / f".deepspeed-{step}"
        self.engine.save_checkpoint(str(engine_dir), tag="ds")
        self.dist.barrier()
        return engine_dir

    def load_state(self, folder: Path, weights: dict, optim: dict) -> None:
        # DeepSpeed's own files (written by this run, hash-checked by the manifest) hold weights and optimizer.
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="ds", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)

    def put_weights(self, weights: dict) -> None:
        with self._gathered(modifier_rank=0):
            if self.dist.main or self.zero_stage != 3:
                copy_weights(self.model, weights)

    def final_state(self) -> dict | None:
        return self.trainable_state()


def backend_for(dist: Dist, *, fsdp: bool, deepspeed: str | None, micro_batch_size: int, max_grad_norm: float,
                bf16: bool) -> SingleProcess:
    """The backend the flags ask for: DeepSpeed with a config file, FSDP, else replicated (one process or many)."""
    if deepspeed:
        return DeepSpeed(dist, max_grad_norm, deepspeed, micro_batch_size, bf16)
    if fsdp:
        return FullyShardedDataParallel(dist, max_grad_norm)
    return DataParallel(dist, max_grad_norm) if dist.active else SingleProcess(dist, max_grad_norm)
