"""Fine-tuning stage: LoRA (rsLoRA, DoRA), P-tuning v2 prefix, p-tuning, prompt tuning or full SFT.

Reads raw data files (prepared on the fly into OUTPUT_DIR/data with prepare_data.py) or a
prepare_data.py output folder, trains with a plain PyTorch loop (token-exact loss over gradient
accumulation, length-grouped batches), and writes a folder every later stage reads by path:

    OUTPUT_DIR/adapter_config.json + adapter_model.safetensors   (PEFT format; full SFT: the model)
    OUTPUT_DIR/tokenizer files, template.json, data_report.json, metrics.jsonl, loss.png (train / eval loss)
    OUTPUT_DIR/checkpoint-N/        resumable checkpoints, each written atomically with a manifest
    OUTPUT_DIR/pipeline.json        resolved arguments, base model fingerprint, data, file hashes (last)

Examples:
    python finetune.py --base_model MODEL --data_path ../shared/data/alpaca/gsm8k_train.json \\
        --output_dir runs/lora --max_steps 100
    python finetune.py --base_model MODEL --data_path runs/prepared --output_dir runs/prefix --method prefix
    python finetune.py ... --resume_from_checkpoint auto      # continue an interrupted run
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import Output, base_fingerprint, read_output, remove_recorded, sha256_file, sha256_json
from utils.cli import run
from utils.data.prepare import PrepareArgs, prepare_dataset
from utils.data.records import missing_path_message
from utils.distributed import from_env
from utils.errors import SuiteError, UsageError
from utils.training import checkpoint as ckpt
from utils.training.backends import backend_for
from utils.training.evaluate import evaluate, token_loss_sum
from utils.training.methods import (QUANTIZED_BASES, MethodArgs, check_packing, prepare_model, quantized_base,
                                    quantized_base_problems)
from utils.training.prepared import check_prepared, prepared_rows
from utils.training.schedule import lr_lambda
from utils.training.tracking import StepProgress, Tracker, TrackingArgs
from utils.weights.folders import check_model_dir
from utils.weights.pretrained import load_base_model

STAGE = "finetune"

# -- the flags, by concern ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArgs(Group):
    """The base model and how it is loaded and run."""

    base_model: str = unfingerprinted(why="a path: the base counts by its config and weight hashes (inputs)")
    dtype: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = unfingerprinted(False, why="a permission: it only allows a model that is otherwise "
                                                         "refused; the model counts by its hashes")
    allow_pickle_weights: bool = unfingerprinted(False, why="a permission: it only allows weights that are "
                                                            "otherwise refused")


@dataclass(frozen=True)
class DataArgs(Group):
    """The training data, and how raw files are prepared (a prepared folder keeps its own values)."""

    data_path: tuple[str, ...] = unfingerprinted(why="paths: the data counts by the prepared folder's "
                                                     "fingerprint (inputs)")
    cutoff_len: int = 256
    val_set_size: float = 0.05
    prompt_template_name: str = "auto"
    train_on_inputs: bool = False
    add_eos_token: bool = True

    def __post_init__(self):
        if isinstance(self.data_path, list):  # frozen groups hold lists as tuples
            object.__setattr__(self, "data_path", tuple(self.data_path))

    def problems(self) -> list[str]:
        problems = [] if self.data_path else ["--data_path: give data files or a prepare_data.py folder"]
        if not self.add_eos_token:
            problems.append("--add_eos_token False is not supported: every trained response ends with EOS")
        return problems


# With a prepared --data_path these do not apply: pipeline.json records the folder's own values.
DATA_STAGE_FLAGS = ("prompt_template_name", "cutoff_len", "val_set_size", "train_on_inputs")


@dataclass(frozen=True)
class BatchArgs(Group):
    """Which rows each optimizer step takes and how they are cut into forward passes."""

    batch_size: int = 128
    micro_batch_size: int = 4
    group_by_length: bool = False
    packing: bool = False

    def problems(self) -> list[str]:
        return [f"--{name} must be >= 1, got {getattr(self, name)}" for name in ("batch_size", "micro_batch_size")
                if getattr(self, name) < 1]


@dataclass(frozen=True)
class OptimArgs(Group):
    """Run length, AdamW, its learning-rate schedule and the seed."""

    num_epochs: int = 3
    max_steps: int = 0
    learning_rate: float = 3e-4
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42

    def problems(self) -> list[str]:
        problems = []
        if self.max_steps < 0 or self.num_epochs < 1 and self.max_steps == 0:
            problems.append("--max_steps must be >= 0 and --num_epochs >= 1")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            problems.append(f"--learning_rate must be > 0, got {self.learning_rate}")
        return problems


@dataclass(frozen=True)
class ParallelArgs(Group):
    """How the model is spread over torchrun's processes (see utils.training.backends)."""

    fsdp: bool = False
    deepspeed: str | None = None


@dataclass(frozen=True)
class EvalArgs(Group):
    """Evaluation on the validation split, early stopping and keep-best."""

    eval_steps: int = field(default=0, metadata={"why": "counted: with early stopping or keep-best it decides "
                                                        "which weights are written, and its evaluations are in "
                                                        "metrics.jsonl and loss.png"})
    early_stopping_patience: int = 0
    load_best_model_at_end: bool = False

    @property
    def compares(self) -> bool:
        """Whether evaluations are compared (early stopping or keep-best), which needs a validation split."""
        return bool(self.early_stopping_patience or self.load_best_model_at_end)

    def problems(self) -> list[str]:
        problems = []
        if self.early_stopping_patience < 0:
            problems.append(f"--early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.compares and self.eval_steps < 1:
            problems.append("--early_stopping_patience and --load_best_model_at_end need --eval_steps N (evaluations "
                            "to compare)")
        return problems


_CHECKPOINTS_ONLY = "checkpoints only: resumable state beside the output; the trained weights do not change"


@dataclass(frozen=True)
class CheckpointArgs(Group):
    """Resumable checkpoints, and where the run starts from (a checkpoint, or an earlier run's weights)."""

    save_steps: int = unfingerprinted(200, why=_CHECKPOINTS_ONLY)
    save_total_limit: int = unfingerprinted(3, why=_CHECKPOINTS_ONLY)
    resume_from_checkpoint: str | None = unfingerprinted(None, why="a resumed run writes the same bytes as an "
                                                                   "uninterrupted one")
    init_from: str | None = unfingerprinted(None, why="a path: the weights it starts from count by their hash "
                                                      "(inputs)")

    def problems(self) -> list[str]:
        if self.init_from is not None and self.resume_from_checkpoint is not None:
            return ["--init_from starts a new run; it cannot be combined with --resume_from_checkpoint"]
        return []


@dataclass(frozen=True)
class OutputArgs(Group):
    """Where the run is written, and how its final files are split."""

    output_dir: str = unfingerprinted("./lora-alpaca", why="where the output is written, not what it holds")
    overwrite: bool = unfingerprinted(False, why="a permission: it only allows replacing what is otherwise refused")
    max_shard_size: str = "2GB"


@dataclass(frozen=True)
class FinetuneArgs(StageArgs):
    """finetune.py's flags."""

    STAGE = STAGE
    model: ModelArgs
    data: DataArgs
    method: MethodArgs
    batching: BatchArgs
    optim: OptimArgs
    parallel: ParallelArgs
    evaluation: EvalArgs
    checkpoints: CheckpointArgs
    output: OutputArgs
    tracking: TrackingArgs = field(metadata={"fingerprint": False, "why": "where metrics are also sent and how "
                                             "progress is shown: the files pipeline.json lists do not change"})


Args = FinetuneArgs


def fingerprint(args: FinetuneArgs, inputs: dict) -> str:
    """The output's fingerprint: the flags that determine it and ``inputs`` (see ``input_hashes``)."""
    return sha256_json({"stage": STAGE, "args": args.fingerprint_values(), "inputs": inputs})



def main(
    base_model: str,
    data_path: list[str],
    output_dir: str = "./lora-alpaca",
    *,
    method: Literal["lora", "qlora", "prefix", "ptuning", "prompt", "full"] = "lora",
    batch_size: int = 128,
    micro_batch_size: int = 4,
    num_epochs: int = 3,
    max_steps: int = 0,
    learning_rate: float = 3e-4,
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine",
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    cutoff_len: int = 256,
    val_set_size: float = 0.05,
    prompt_template_name: str = "auto",
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    group_by_length: bool = False,
    packing: bool = False,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] = ("all-linear",),
    use_rslora: bool = False,
    use_dora: bool = False,
    qlora_bits: int = 4,
    qlora_quant_type: Literal["nf4", "fp4"] = "nf4",
    qlora_double_quant: bool = True,
    num_virtual_tokens: int = 16,
    prefix_projection: bool = False,
    encoder_hidden_size: int = 0,
    dtype: Literal["fp32", "bf16"] = "fp32",
    gradient_checkpointing: bool = False,
    fsdp: bool = False,
    deepspeed: str | None = None,
    eval_steps: int = 0,
    early_stopping_patience: int = 0,
    load_best_model_at_end: bool = False,
    save_steps: int = 200,
    save_total_limit: int = 3,
    max_shard_size: str = "2GB",
    logging_steps: int = 10,
    tensorboard: bool = True,
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: Literal["", "false", "gradients", "all"] = "",
    wandb_log_model: bool = False,
    resume_from_checkpoint: str | None = None,
    init_from: str | None = None,
    seed: int = 42,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    overwrite: bool = False,
) -> None:
    """Fine-tune a causal LM on instruction or conversation data.

    Args:
        base_model: Local Hugging Face model folder (safetensors weights; nothing is downloaded).
        data_path: Data files (JSON/JSONL; any format prepare_data.py reads) or one prepare_data.py output folder.
        output_dir: Where the adapter (or model), checkpoints and metadata go.
        method: lora, qlora (LoRA on a bitsandbytes 4/8-bit base, or on the frozen layers of a base that is
            already quantized: a GPTQ folder from quantize.py or another GPTQ checkpoint, or a pre-quantized
            bitsandbytes folder), prefix (P-tuning v2), ptuning (prompt encoder), prompt (prompt tuning) or full.
            On an already quantized base: qlora, prefix, ptuning and prompt; lora and full are refused.
        batch_size: Effective batch: rows per optimizer step, over all processes (micro_batch_size x
            accumulation x processes).
        micro_batch_size: Rows (packed rows with --packing) per forward pass.
        num_epochs: Passes over the training split (ignored when max_steps > 0).
        max_steps: Optimizer steps to run; 0 means num_epochs.
        learning_rate: Peak learning rate (AdamW).
        lr_scheduler: Decay after warmup: cosine, linear or constant.
        warmup_ratio: Warmup as a fraction of all steps (ignored if warmup_steps > 0).
        warmup_steps: Warmup steps.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping norm (0 disables).
        cutoff_len: Maximum tokens per example (raw data only; a prepared folder keeps its own).
        val_set_size: Validation examples for raw data: a count, a fraction < 1, or 0 for none.
        prompt_template_name: Template for raw data (see prepare_data.py); ``auto`` picks by data format.
        train_on_inputs: Train on prompt tokens too (raw data only).
        add_eos_token: End every trained response with EOS. Always on here (accepted so alpaca-lora commands
            keep working); False is refused, since a model never taught to stop does not stop.
        group_by_length: Put rows of similar length in the same optimizer step (as Hugging Face's sampler).
            Within a step, rows are always sorted by length before being cut into micro-batches.
        packing: Pack several examples into each row of up to cutoff_len tokens; each example attends only
            to itself (block-diagonal causal mask), so the loss equals the unpacked loss (lora, qlora, full).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Linear layers to adapt, by leaf name (e.g. q_proj v_proj), or all-linear.
        use_rslora: Rank-stabilised LoRA scaling (alpha / sqrt(r)).
        use_dora: Weight-decomposed LoRA (DoRA).
        qlora_bits: qlora: quantize the frozen base to 4 or 8 bits (bitsandbytes; not with an already quantized
            base, whose own quantization is used).
        qlora_quant_type: qlora 4-bit data type: nf4 or fp4.
        qlora_double_quant: qlora 4-bit: also quantize the quantization constants.
        num_virtual_tokens: Virtual tokens for prefix, ptuning and prompt.
        prefix_projection: P-tuning v2 with an MLP reparameterisation of the prefix.
        encoder_hidden_size: Hidden size of the prefix / prompt encoder MLP (0: the model's hidden size).
        dtype: Training precision: fp32 or bf16 (fp16 has no fast path on CPU).
        gradient_checkpointing: Recompute activations in the backward pass (less memory, more time).
        fsdp: Under torchrun, shard weights, gradients and optimizer state over the processes (torch FSDP)
            instead of replicating them (lora and full).
        deepspeed: A DeepSpeed JSON config (e.g. examples/deepspeed_zero2.json or _zero3.json): ZeRO through
            DeepSpeed, under torchrun or the deepspeed launcher. Batch size, accumulation and clipping come
            from the flags above, the optimizer and schedule from this script.
        eval_steps: Evaluate on the validation split every N steps (0: only at the end).
        early_stopping_patience: Stop after this many evaluations without a lower eval loss (0: never).
        load_best_model_at_end: Write the weights of the evaluation with the lowest eval loss, not the last.
        save_steps: Write a resumable checkpoint every N steps (0: only at the end / on interrupt).
        save_total_limit: Keep at most this many checkpoints.
        max_shard_size: full: largest safetensors shard of the saved model (e.g. 500MB, 2GB).
        logging_steps: Without a terminal (CI logs, cron), print the loss every N steps (0: never); on a
            terminal a progress bar shows it.
        tensorboard: Also write the metrics as TensorBoard events in OUTPUT_DIR/tensorboard.
        wandb_project: Log to this Weights & Biases project (needs the wandb package).
        wandb_run_name: Weights & Biases run name.
        wandb_watch: Weights & Biases model watching: gradients or all.
        wandb_log_model: Upload the final output folder to Weights & Biases as an artifact.
        resume_from_checkpoint: ``auto`` (the newest complete checkpoint in output_dir) or a checkpoint folder.
        init_from: Start a new run (new data, epochs or schedule) from the trained weights of an earlier
            finetune output folder or checkpoint, with a fresh optimizer. Unlike resume, nothing else is restored.
        seed: Seed for data order, initialisation and dropout.
        trust_remote_code: Allow custom model code from base_model to run.
        allow_pickle_weights: Accept pytorch_model.bin weights (loaded with weights_only=True).
        overwrite: Replace a different finished run in output_dir (only its own files: those its pipeline.json
            lists, checkpoints, metrics), or write into a folder holding files this suite did not write
            (they are kept).
    """
    args = FinetuneArgs.from_flags(dict(locals()))
    validate_args(args)
    dist = from_env(STAGE)
    with contextlib.ExitStack() as stack:
        stack.push(lambda kind, exc, tb: dist.close(clean=kind is None))  # a barrier first, on success only
        stack.enter_context(ckpt.sigterm_exits())  # so that the folder's lock is released on SIGTERM too
        # Before any work: the destination rule, the folder and its lock. Only rank 0 holds them; its
        # refusal reaches every rank.
        folder = ckpt.RunFolder(Path(args.output.output_dir), args.output.overwrite)
        dist.on_main(lambda: stack.enter_context(folder) and None)
        train(args, dist)


# -- validation ----------------------------------------------------------------------------------------------


def validate_args(args: FinetuneArgs) -> None:
    """Refuse bad arguments before any work, with every problem found reported at once: each group's own,
    and the checks of files, installed packages and processes beside the group they concern."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    problems = base_model_problems(args) + args.model.problems()
    problems += data_path_problems(args.data) + args.data.problems()
    problems += args.method.problems() + method_problems(args)
    problems += args.batching.problems() + batch_world_problems(args.batching, world) + args.optim.problems()
    problems += args.parallel.problems() + parallelism_problems(args, world)
    problems += args.evaluation.problems() + validation_split_problems(args)
    problems += args.tracking.problems() + tracking_package_problems(args.tracking)
    problems += start_problems(args.checkpoints) + args.checkpoints.problems()
    problems += args.output.problems() + output_problems(args)
    if problems:
        raise UsageError("\n".join(problems))


def base_model_problems(args: FinetuneArgs) -> list[str]:
    """The base model folder: a floating-point model folder, or a quantized folder (GPTQ, pre-quantized
    bitsandbytes) checked as the shared loader checks it, with what the method can do on it."""
    path = args.model.base_model
    fmt = quantized_base(path)
    if fmt is None:
        return check_model_dir(path, args.model.allow_pickle_weights)
    from utils.quant.checkpoint import quantized_folder_problems

    return quantized_folder_problems(path, "--base_model") + quantized_base_problems(args.method, fmt, path)


def data_path_problems(data: DataArgs) -> list[str]:
    problems = [missing_path_message("--data_path", p, "file or folder") for p in data.data_path
                if not Path(p).exists()]
    if len(data.data_path) > 1 and any(Path(p).is_dir() for p in data.data_path):
        problems.append("--data_path: a prepared folder must be given alone")
    return problems


def method_problems(args: FinetuneArgs) -> list[str]:
    """What the method needs besides its own settings: bitsandbytes for qlora, rows without virtual tokens
    for packing."""
    problems, method = [], args.method.method
    if method == "qlora" and quantized_base(args.model.base_model) is None:  # a quantized folder: checked with it
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # a broken install raises more than ImportError
            problems.append(f"--method qlora needs bitsandbytes ({type(exc).__name__}: {exc})")
    if args.batching.packing and method not in ("lora", "qlora", "full"):
        problems.append(f"--packing works with lora, qlora and full; --method {method} puts virtual tokens "
                        "before each row, which packed examples cannot share")
    return problems


def batch_world_problems(batching: BatchArgs, world: int) -> list[str]:
    """The effective batch must split evenly over ``world`` processes' micro-batches."""
    if batching.batch_size % max(batching.micro_batch_size * world, 1):
        return [f"--batch_size {batching.batch_size} must be a multiple of --micro_batch_size "
                f"{batching.micro_batch_size}" + (f" x {world} processes" if world > 1 else "")]
    return []


def parallelism_problems(args: FinetuneArgs, world: int) -> list[str]:
    """FSDP and DeepSpeed over ``world`` processes."""
    problems, parallel = [], args.parallel
    if parallel.fsdp and (world < 2 or args.method.method not in ("lora", "full")):
        problems.append("--fsdp needs torchrun with 2 or more processes and --method lora or full")
    if parallel.deepspeed is not None:
        try:
            json.loads(Path(parallel.deepspeed).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"--deepspeed {parallel.deepspeed}: not a readable JSON config ({exc})")
        if importlib.util.find_spec("deepspeed") is None:  # not imported here: it prints to stdout
            problems.append("--deepspeed needs the deepspeed package (pip install deepspeed)")
        if parallel.fsdp or args.method.method == "qlora":
            problems.append("--deepspeed cannot be combined with --fsdp or --method qlora")
    fmt = quantized_base(args.model.base_model)
    if fmt is not None and (parallel.fsdp or parallel.deepspeed is not None):
        problems.append(f"--{'fsdp' if parallel.fsdp else 'deepspeed'}: --base_model {args.model.base_model} is "
                        f"quantized ({QUANTIZED_BASES.get(fmt, fmt)}), and its packed layers cannot be sharded; train "
                        "without it (each process holds the whole quantized base)")
    return problems


def validation_split_problems(args: FinetuneArgs) -> list[str]:
    """Early stopping and keep-best compare evaluations: raw data must be given a validation split."""
    if args.evaluation.compares and not Path(args.data.data_path[0]).is_dir() and args.data.val_set_size <= 0:
        return ["--early_stopping_patience and --load_best_model_at_end need a validation split "
                "(--val_set_size > 0)"]
    return []


def tracking_package_problems(tracking: TrackingArgs) -> list[str]:
    """Weights & Biases and TensorBoard need their packages."""
    problems = []
    if tracking.wants_wandb:
        try:
            importlib.import_module("wandb")
        except ImportError:
            problems.append("--wandb_project needs the wandb package (pip install wandb)")
    if tracking.tensorboard:
        try:
            importlib.import_module("tensorboard")
        except ImportError:
            problems.append("--tensorboard needs the tensorboard package (pip install tensorboard), or pass "
                            "--notensorboard")
    return problems


def start_problems(checkpoints: CheckpointArgs) -> list[str]:
    """The folders a run starts from (resume, init_from) exist."""
    problems = []
    rc = checkpoints.resume_from_checkpoint
    if rc not in (None, "auto") and not Path(rc).is_dir():
        problems.append(f"--resume_from_checkpoint {rc}: no such folder (or use auto)")
    if checkpoints.init_from is not None and not Path(checkpoints.init_from).is_dir():
        problems.append(f"--init_from {checkpoints.init_from}: no such folder")
    return problems


def output_problems(args: FinetuneArgs) -> list[str]:
    if Path(args.output.output_dir).absolute() == Path(args.model.base_model).absolute():
        return ["--output_dir must not be the base model folder"]
    return []


# -- the run: inputs, build, fit, finish ---------------------------------------------------------------------


def train(args: FinetuneArgs, dist) -> None:
    """Prepare the data, then build, fit and finish the run (nothing to do if the folder holds this finished
    run)."""
    out = Path(args.output.output_dir)
    data_dir = dist.on_main(prepare, args)
    inputs = input_hashes(args, data_dir)
    fp = fingerprint(args, inputs)
    if dist.on_main(check_output_dir_for_run, out, fp, args.output.overwrite,
                    args.checkpoints.resume_from_checkpoint is not None):
        if dist.main:
            print(f"finetune: {out} already holds this finished run; nothing to do", file=sys.stderr)
            print(out.absolute())
        return
    run = build(args, dist, out, data_dir)
    stopped_early = fit(run)
    finish(run, data_dir, fp, inputs["base"], stopped_early)


def prepare(args: FinetuneArgs) -> Path:
    """The prepared dataset folder: the one given, or one made from raw files in OUTPUT_DIR/data."""
    paths = args.data.data_path
    if len(paths) == 1 and Path(paths[0]).is_dir():
        check_prepared(paths[0], args.model.base_model)
        return Path(paths[0])
    folder = Path(args.output.output_dir) / "data"
    flags = {"base_model": args.model.base_model, "data_path": list(paths), "output_dir": str(folder),
             **{k: getattr(args.data, k) for k in DATA_STAGE_FLAGS}, "seed": args.optim.seed,
             "trust_remote_code": args.model.trust_remote_code, "overwrite": args.output.overwrite}
    with contextlib.redirect_stdout(sys.stderr):  # stdout is this stage's payload (its output path)
        prepare_dataset(PrepareArgs.from_flags(flags))
    return folder


def input_hashes(args: FinetuneArgs, data_dir: Path) -> dict:
    """What identifies the run's inputs: the base model, the prepared data, the weights --init_from starts from."""
    init_from = args.checkpoints.init_from
    return {
        "base": base_fingerprint(args.model.base_model),
        "data": read_output(data_dir).fingerprint,
        "init_from": sha256_file(ckpt.init_weights_file(Path(init_from))) if init_from else None,
    }


def check_output_dir_for_run(out: Path, fp: str, overwrite: bool, resuming: bool) -> bool:
    """True if ``out`` already holds this finished run. A different finished run needs --overwrite, which
    removes that run's own files (those its pipeline.json lists, checkpoints, metrics) and nothing else.
    (The folder is written in place, so that a run can resume: rank 0 already holds its claim and lock,
    ``utils.training.checkpoint.RunFolder``.)"""
    if Output(out, STAGE, overwrite, resumable=ckpt.unfinished_run).up_to_date(fp):
        return True
    info = read_output(out)
    # --overwrite on an unfinished run starts it again, unless it is being resumed.
    if info is not None and info.complete or overwrite and not resuming:
        remove_recorded(out, info.raw if info else None)  # e.g. a single model.safetensors before new shards
        ckpt.clear_run(out)
        ckpt.mark_unfinished(out)
    return False


class TrainingData(NamedTuple):
    train: list  # (input_ids, labels) rows
    val: list
    lengths: list[int]  # of the train rows
    pack_len: int  # tokens per packed row


@dataclasses.dataclass
class Training:
    """What the steps of one run share: its settings, model, optimizer and data, and where it has got to."""
    args: FinetuneArgs
    dist: Any
    backend: Any  # how the model is held over the processes (utils.training.backends)
    out: Path
    data: TrainingData
    model: Any
    optimizer: Any
    scheduler: Any
    runner: Any  # what runs the forward pass: the model, or the DeepSpeed engine wrapping it
    per_epoch: int
    total_steps: int
    n_trainable: int
    step: int = 0
    state: dict = dataclasses.field(default_factory=lambda: {"best": None, "bad_evals": 0})
    best_weights: Any = None
    tracker: Any = None
    recorded: dict = dataclasses.field(default_factory=dict)  # the arguments as pipeline.json records them

    @property
    def n_virtual(self) -> int:
        return self.args.method.virtual_tokens  # virtual tokens prepended to the logits


def build(args: FinetuneArgs, dist, out: Path, data_dir: Path) -> Training:
    """Everything the optimizer steps need: the rows, the model on its backend, AdamW and its schedule, where
    a resumed run had got to, and the metric sinks."""
    import torch

    from utils.training.batches import steps_per_epoch

    torch.manual_seed(args.optim.seed)
    data = load_rows(args, data_dir)
    backend = backend_for(dist, fsdp=args.parallel.fsdp, deepspeed=args.parallel.deepspeed,
                          micro_batch_size=args.batching.micro_batch_size, max_grad_norm=args.optim.max_grad_norm,
                          bf16=args.model.dtype == "bf16")
    model = build_model(args, dist, backend)
    # Same initial weights on every rank (seeded above); different dropout masks per rank from here.
    torch.manual_seed(args.optim.seed + dist.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if dist.main:
        print(f"finetune: method {args.method.method}, {n_trainable:,} trainable parameters, "
              f"{len(data.train)} train / {len(data.val)} validation examples", file=sys.stderr)
    per_epoch = steps_per_epoch(len(data.train), args.batching.batch_size)
    total_steps = args.optim.max_steps or per_epoch * args.optim.num_epochs
    optimizer, scheduler = make_optimizer(args.optim, params, total_steps)
    runner = backend.prepare(model, optimizer)
    run = Training(args, dist, backend, out, data, model, optimizer, scheduler, runner, per_epoch, total_steps,
                   n_trainable)
    resume_or_refuse(run)
    run.recorded = recorded_args(args, read_output(data_dir).args, data_dir, dist.main)
    run.tracker = Tracker(out, args.tracking, run.recorded, run.step, dist.main)
    run.tracker.watch(model)
    return run


def load_rows(args: FinetuneArgs, data_dir: Path) -> TrainingData:
    """The prepared train and validation rows, checked against what early stopping needs."""
    rows = prepared_rows(data_dir, "train", "validation")
    train_rows, val_rows = rows["train"], rows.get("validation", [])
    if args.evaluation.compares and not val_rows:
        raise SuiteError(f"--data_path {data_dir} has no validation split, which --early_stopping_patience and "
                         "--load_best_model_at_end need")
    lengths = [len(ids) for ids, _ in train_rows]
    pack_len = max(read_output(data_dir).args["cutoff_len"], max(lengths))
    return TrainingData(train_rows, val_rows, lengths, pack_len)


def build_model(args: FinetuneArgs, dist, backend):
    """The base model with the method's trainable parts, sharded by the backend, from --init_from's weights."""
    if quantized_base(args.model.base_model) is not None:
        model = load_quantized(args, dist)
    else:
        model = load_base_model(args.model.base_model, dtype=args.model.dtype,
                                trust_remote_code=args.model.trust_remote_code,
                                allow_pickle_weights=args.model.allow_pickle_weights, device=dist.device,
                                quantization=args.method.quantization(args.model.dtype))
    if args.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_model(model, args.method, args.model.gradient_checkpointing)
    if args.batching.packing:
        check_packing(model, dist.device)
    model = backend.shard(model)
    if args.checkpoints.init_from:
        ckpt.init_weights(Path(args.checkpoints.init_from), model)
    return model


def load_quantized(args: FinetuneArgs, dist):
    """An already quantized --base_model (GPTQ, pre-quantized bitsandbytes), frozen as stored; says so, and that
    qlora's bitsandbytes settings (left at their defaults: others are refused) do not apply to it."""
    from utils.dtypes import torch_dtype_of
    from utils.quant.adapters import load_quantized_base

    model = load_quantized_base(args.model.base_model, dtype=torch_dtype_of(args.model.dtype), device=dist.device,
                                trust_remote_code=args.model.trust_remote_code)
    if dist.main:
        unused = (" (--qlora_bits, --qlora_quant_type and --qlora_double_quant do not apply: the base keeps its own "
                  "quantization)") if args.method.method == "qlora" else ""
        print(f"finetune: --base_model {args.model.base_model} is already quantized ({model.quant_label}); its "
              f"layers stay frozen and run on {model.quant_backend}{unused}", file=sys.stderr)
    return model


def make_optimizer(optim: OptimArgs, params: list, total_steps: int):
    """AdamW over ``params`` and its learning-rate schedule over ``total_steps``."""
    import torch

    warmup = optim.warmup_steps or int(optim.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.lr_scheduler, warmup, total_steps))
    return optimizer, scheduler


def resume_or_refuse(run: Training) -> None:
    """Continue from the checkpoint --resume_from_checkpoint names; refuse to start over an unfinished run."""
    dist, out = run.dist, run.out
    resume = dist.on_main(ckpt.find_resume, out, run.args.checkpoints.resume_from_checkpoint)
    if resume is not None:
        run.step, run.state, run.best_weights = ckpt.load_checkpoint(resume, run.model, run.scheduler, run.backend)
        if dist.main:
            print(f"finetune: resumed from {resume} at step {run.step}", file=sys.stderr)
    elif dist.on_main(ckpt.checkpoint_dirs, out):
        raise SuiteError(f"--output_dir {out} holds checkpoints of an unfinished run; pass --resume_from_checkpoint "
                         "auto to continue it, or --overwrite to start again")


def recorded_args(args: FinetuneArgs, prepared: dict, data_dir: Path, report: bool = True) -> dict:
    """The arguments as this run used them, for pipeline.json: the data-stage values come from the data
    folder's own pipeline.json (``prepared``, its args: with a prepared --data_path, finetune's flags for them do
    not apply). A value given here that differs from both the default and the folder's is reported, as it has
    no effect."""
    defaults = {f.name: f.default for f in dataclasses.fields(DataArgs)}
    used = {}
    for key in DATA_STAGE_FLAGS:
        if key not in prepared:
            continue
        given = getattr(args.data, key)
        if report and given != prepared[key] and given != defaults[key]:
            print(f"finetune: --{key} {given} does not apply to the prepared --data_path {data_dir} (prepared "
                  f"with {prepared[key]}); recording {prepared[key]}", file=sys.stderr)
        used[key] = prepared[key]
    flags = dataclasses.replace(args, data=dataclasses.replace(args.data, **used)).flags()
    return {name: flags[name] for name in inspect.signature(main).parameters}  # in the order of the flags


# -- fit: the optimizer steps --------------------------------------------------------------------------------


def fit(run: Training) -> bool:
    """The optimizer steps from run.step on; True if early stopping ended them. On SIGTERM / Ctrl-C it saves a
    checkpoint and exits (130 / 143)."""
    from utils.training.batches import epoch_steps

    args, dist = run.args, run.dist
    stop = StopFlag()
    progress = StepProgress(run.total_steps, run.step, args.tracking.logging_steps, dist.main)
    stop.progress = progress
    run.model.train()
    t0, tokens_seen, cached_epoch, steps = time.perf_counter(), 0, None, []
    stopped_early = False
    while run.step < run.total_steps:
        epoch, index = divmod(run.step, run.per_epoch)
        if epoch != cached_epoch:
            steps = epoch_steps(run.data.lengths, args.batching.batch_size, args.optim.seed, epoch,
                                args.batching.group_by_length)
            cached_epoch = epoch
        loss_sum, n_tokens, real_tokens, interrupted = optimizer_step(run, steps[index], stop)
        tokens_seen += real_tokens
        run.step += 1
        record = {"step": run.step, "epoch": epoch, "loss": round(loss_sum, 6), "lr": run.scheduler.get_last_lr()[0],
                  "trained_tokens": n_tokens}
        run.tracker.log(record)
        progress.update(run.step, loss_sum, record["lr"], tokens_seen * dist.world_size / (time.perf_counter() - t0))
        stopped_early = evaluate_if_due(run)
        last = run.step >= run.total_steps or stopped_early
        if interrupted or (args.checkpoints.save_steps and run.step % args.checkpoints.save_steps == 0 and not last):
            save_checkpoint(run)
        if interrupted:
            exit_interrupted(run, stop, progress)
        if stopped_early:
            progress.close()
            report_early_stop(run)
            break
    progress.close()
    stop.restore()
    return stopped_early


def optimizer_step(run: Training, step_rows: list[int], stop: StopFlag) -> tuple[float, int, int, bool]:
    """One optimizer step over ``step_rows``, over all ranks: (loss, trained tokens over all ranks, this rank's
    real tokens, whether some rank was asked to stop)."""
    import torch

    dist = run.dist
    micro = step_micro_batches(step_rows, run.data, run.args.batching, dist)
    local_tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    n_tokens = int(dist.all_reduce_(torch.tensor([local_tokens], dtype=torch.float64))[0])
    loss_sum, real_tokens = accumulate_gradients(run, micro, n_tokens)
    run.backend.reduce_gradients()
    # One collective for the logged loss and for agreeing to stop on a signal at this step.
    totals = dist.all_reduce_(torch.tensor([loss_sum, 1.0 if stop.requested else 0.0], dtype=torch.float64))
    loss_sum, interrupted = float(totals[0]), bool(totals[1] > 0)
    run.backend.step()
    run.scheduler.step()
    return loss_sum, n_tokens, real_tokens, interrupted


def step_micro_batches(step_rows: list[int], data: TrainingData, batching: BatchArgs, dist) -> list[dict]:
    """This rank's micro-batches of one optimizer step: its share of the step's rows, sorted by length,
    then padded in groups of micro_batch_size or packed into rows of data.pack_len tokens."""
    from utils.training.batches import collate, collate_packed, micro_batches, pack, rank_rows

    rows, lengths = data.train, data.lengths
    mine = rank_rows(step_rows, lengths, dist.rank, dist.world_size)
    mb = batching.micro_batch_size
    if batching.packing:
        bins = pack(mine, lengths, data.pack_len)
        return [collate_packed([[rows[i] for i in b] for b in bins[j:j + mb]], 0) for j in range(0, len(bins), mb)]
    batches = []
    for group in micro_batches(mine, mb):
        batch = collate([rows[i] for i in group], 0)
        batch["real_tokens"] = sum(lengths[i] for i in group)
        batches.append(batch)
    return batches


def accumulate_gradients(run: Training, micro: list[dict], n_tokens: int) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches, the loss a mean over the step's ``n_tokens``:
    (this rank's loss, its real tokens). Where the backend needs every rank in every pass, a rank with fewer
    micro-batches runs empty ones."""
    from utils.training.batches import empty_batch

    backend = run.backend
    n_micro = backend.micro_steps(len(micro))
    loss_sum, real_tokens = 0.0, 0
    for i in range(n_micro):
        m = micro[i] if i < len(micro) else empty_batch()
        backend.before_micro_batch(last=i == n_micro - 1)
        loss = token_loss_sum(run.runner, m, run.n_virtual, run.dist.device) / max(n_tokens, 1)
        backend.backward(loss)
        loss_sum += loss.item()
        real_tokens += m["real_tokens"]
    return loss_sum, real_tokens


def evaluate_run(run: Training) -> dict:
    """Evaluate the model as it is now on the validation split, over all ranks."""
    return evaluate(run.model, run.data.val, run.args.batching.micro_batch_size, run.n_virtual, run.dist,
                    run.backend.lockstep)


def evaluate_if_due(run: Training) -> bool:
    """Evaluate every --eval_steps (not at the last step: the end evaluates); True if early stopping is due."""
    every = run.args.evaluation.eval_steps
    if not (run.data.val and every and run.step % every == 0 and run.step < run.total_steps):
        return False
    result = evaluate_run(run)
    run.tracker.log({"step": run.step, **result})
    stopped_early = track_best(run, result)
    run.model.train()
    return stopped_early


def track_best(run: Training, result: dict) -> bool:
    """Update the best evaluation (and, with --load_best_model_at_end, its weights); True if early stopping is
    due."""
    best, evaluation = run.state["best"], run.args.evaluation
    if best is None or result["eval_loss"] < best["eval_loss"]:
        run.state["best"] = {"step": run.step, "eval_loss": result["eval_loss"]}
        run.state["bad_evals"] = 0
        if evaluation.load_best_model_at_end:
            run.best_weights = run.backend.trainable_state()
    else:
        run.state["bad_evals"] += 1
    patience = evaluation.early_stopping_patience
    return bool(patience and run.state["bad_evals"] >= patience)


def report_early_stop(run: Training) -> None:
    if run.dist.main:
        best = run.state["best"]
        print(f"finetune: early stopping at step {run.step}: eval loss has not improved on "
              f"{best['eval_loss']:.4f} (step {best['step']}) for {run.state['bad_evals']} evaluations",
              file=sys.stderr)


def save_checkpoint(run: Training) -> None:
    """A resumable checkpoint of this step, written by rank 0 from every rank's state."""
    dist, out, backend = run.dist, run.out, run.backend
    engine_dir = backend.save_engine_state(out, run.step)  # e.g. DeepSpeed's sharded optimizer state, every rank
    weights, optim = backend.trainable_state(), backend.optimizer_state()
    dist.on_main(ckpt.save_checkpoint, out, run.step, weights, optim, run.scheduler,
                 run.args.checkpoints.save_total_limit, run.state, run.best_weights, ckpt.gather_rng(dist), engine_dir)
    run.tracker.plot()  # beside metrics.jsonl, outside the checkpoint (its manifest is unchanged)
    dist.barrier()


def exit_interrupted(run: Training, stop: StopFlag, progress) -> None:
    """After the interrupt's checkpoint: exit 130 on Ctrl-C, 143 on SIGTERM (or another rank's signal)."""
    progress.close()
    if run.dist.main:
        print(f"finetune: interrupted ({stop.requested or 'by another rank'}); checkpoint at step {run.step} "
              "saved. Resume with --resume_from_checkpoint auto", file=sys.stderr)
    run.tracker.close()
    sys.exit(130 if stop.requested == "SIGINT" else 143)


# -- finish: the final evaluation and files ------------------------------------------------------------------


def finish(run: Training, data_dir: Path, fp: str, base: dict, stopped_early: bool) -> None:
    """Evaluate the final (or best) weights, then write the adapter (or model), the loss curve and pipeline.json;
    print the output folder."""
    dist, out, args = run.dist, run.out, run.args
    summary = run_summary(run, final_evaluation(run), stopped_early)
    gathered = run.backend.final_state()  # a collective where the model is sharded
    plot = run.tracker.plot()  # before save_final: pipeline.json lists its hash with the other files
    dist.on_main(ckpt.save_final, out, run.model, data_dir, method=args.method.method,
                 max_shard_size=args.output.max_shard_size, fingerprint=fp, recorded_args=run.recorded,
                 base_model=args.model.base_model, base=base, summary=summary, state_dict=gathered)
    run.tracker.finish(out if dist.main else None)
    if dist.main:
        if plot is not None:
            print(f"finetune: loss curve {plot.absolute()}", file=sys.stderr)
        print(out.absolute())


def final_evaluation(run: Training) -> dict:
    """The end-of-run evaluation ({} without a validation split), of the best weights with
    --load_best_model_at_end; logged and reported."""
    dist, step = run.dist, run.step
    final_eval = evaluate_run(run) if run.data.val else {}
    if run.args.evaluation.load_best_model_at_end and final_eval:
        # The last weights compete too (the loop does not evaluate at the last step).
        best = run.state["best"]
        if best is None or final_eval["eval_loss"] < best["eval_loss"] or best["step"] == step:
            run.state["best"] = {"step": step, "eval_loss": final_eval["eval_loss"]}
        elif dist.broadcast(run.best_weights is not None):
            run.backend.put_weights(run.best_weights)
            final_eval = evaluate_run(run)
            if dist.main:
                print(f"finetune: keeping the best weights, from step {best['step']} (eval loss "
                      f"{best['eval_loss']:.4f})", file=sys.stderr)
    if final_eval:
        run.tracker.log({"step": step, "final": True, **final_eval})
        if dist.main:
            print(f"finetune: eval loss {final_eval['eval_loss']:.4f}, token accuracy "
                  f"{final_eval['eval_token_accuracy']:.4f}", file=sys.stderr)
    return final_eval


def run_summary(run: Training, final_eval: dict, stopped_early: bool) -> dict:
    """What pipeline.json records of how the run went."""
    summary = {"final_eval": final_eval, "steps": run.step, "stopped_early": stopped_early, "best": run.state["best"],
               "trainable_parameters": run.n_trainable, "world_size": run.dist.world_size,
               "sharding": run.backend.sharding}
    if quantized_base(run.args.model.base_model) is not None:
        from utils.quant.adapters import quantized_base_summary

        summary["quantization"] = quantized_base_summary(run.model)  # "base": its label, e.g. gptq-4bit
        return summary
    quantization = run.args.method.quantization(run.args.model.dtype)
    if quantization:
        layers = sum(type(m).__module__.startswith("bitsandbytes") for m in run.model.modules())
        summary["quantization"] = {**quantization, "quantized_layers": layers}
    return summary


# -- pieces ---------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM / Ctrl-C request a checkpoint at the next step boundary instead of killing the run."""

    def __init__(self):
        self.requested: str | None = None
        self.progress = None  # a StepProgress: messages go around its bar
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        message = f"finetune: {self.requested} received; saving a checkpoint at the end of this step"
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, file=sys.stderr)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(main)
