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
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

from utils.errors import SuiteError, UsageError
from utils.cli import run

PROMPT_METHODS = ("prompt", "ptuning")  # peft prepends virtual tokens to the inputs (and logits)


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
        method: lora, qlora (LoRA on a bitsandbytes 4/8-bit base), prefix (P-tuning v2), ptuning (prompt
            encoder), prompt (prompt tuning) or full.
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
        qlora_bits: qlora: quantize the frozen base to 4 or 8 bits (bitsandbytes).
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
    args = dict(locals())
    args["lora_target_modules"] = list(lora_target_modules)
    validate_args(**args)
    from utils.training.checkpoint import RunFolder, sigterm_exits
    from utils.distributed import from_env

    dist = from_env("finetune")
    with contextlib.ExitStack() as stack:
        stack.callback(dist.close)
        stack.enter_context(sigterm_exits())  # so that the folder's lock is released on SIGTERM too
        # Before any work: the destination rule, the folder and its lock. Only rank 0 holds them; its
        # refusal reaches every rank.
        dist.on_main(lambda: stack.enter_context(RunFolder(Path(output_dir), overwrite)) and None)
        train(args, dist)


def validate_args(**a) -> None:
    """Refuse bad arguments before any work, with every problem found reported at once."""
    from utils.weights.folders import check_model_dir

    world = int(os.environ.get("WORLD_SIZE", "1"))
    problems = check_model_dir(a["base_model"], a["allow_pickle_weights"])
    problems += data_problems(a)
    problems += method_problems(a)
    problems += batching_problems(a, world)
    problems += parallelism_problems(a, world)
    problems += evaluation_problems(a)
    problems += tracking_problems(a)
    problems += checkpoint_problems(a)
    if problems:
        raise UsageError("\n".join(problems))


def data_problems(a: dict) -> list[str]:
    from utils.data.records import missing_path_message

    problems = []
    if not a["data_path"]:
        problems.append("--data_path: give data files or a prepare_data.py folder")
    for p in a["data_path"]:
        if not Path(p).exists():
            problems.append(missing_path_message("--data_path", p, "file or folder"))
    if len(a["data_path"]) > 1 and any(Path(p).is_dir() for p in a["data_path"]):
        problems.append("--data_path: a prepared folder must be given alone")
    if not a["add_eos_token"]:
        problems.append("--add_eos_token False is not supported: every trained response ends with EOS")
    return problems


def method_problems(a: dict) -> list[str]:
    """The method's own settings: LoRA, virtual tokens, qlora, packing."""
    problems = [f"--{name} must be >= 1, got {a[name]}" for name in ("lora_r", "num_virtual_tokens") if a[name] < 1]
    if not 0 <= a["lora_dropout"] < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {a['lora_dropout']}")
    if a["qlora_bits"] not in (4, 8):
        problems.append(f"--qlora_bits must be 4 or 8, got {a['qlora_bits']}")
    if a["method"] == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # a broken install raises more than ImportError
            problems.append(f"--method qlora needs bitsandbytes ({type(exc).__name__}: {exc})")
    if a["packing"] and a["method"] not in ("lora", "qlora", "full"):
        problems.append(f"--packing works with lora, qlora and full; --method {a['method']} puts virtual tokens "
                        "before each row, which packed examples cannot share")
    return problems


def batching_problems(a: dict, world: int) -> list[str]:
    """Batch sizes over ``world`` processes, run length and the optimizer's schedule."""
    problems = [f"--{name} must be >= 1, got {a[name]}" for name in ("batch_size", "micro_batch_size") if a[name] < 1]
    if a["batch_size"] % max(a["micro_batch_size"] * world, 1):
        problems.append(f"--batch_size {a['batch_size']} must be a multiple of --micro_batch_size "
                        f"{a['micro_batch_size']}" + (f" x {world} processes" if world > 1 else ""))
    if a["max_steps"] < 0 or a["num_epochs"] < 1 and a["max_steps"] == 0:
        problems.append("--max_steps must be >= 0 and --num_epochs >= 1")
    if not 0 <= a["warmup_ratio"] < 1:
        problems.append(f"--warmup_ratio must be in [0, 1), got {a['warmup_ratio']}")
    if a["learning_rate"] <= 0:
        problems.append(f"--learning_rate must be > 0, got {a['learning_rate']}")
    return problems


def parallelism_problems(a: dict, world: int) -> list[str]:
    """FSDP and DeepSpeed over ``world`` processes."""
    problems = []
    if a["fsdp"] and (world < 2 or a["method"] not in ("lora", "full")):
        problems.append("--fsdp needs torchrun with 2 or more processes and --method lora or full")
    if a["deepspeed"] is not None:
        try:
            json.loads(Path(a["deepspeed"]).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"--deepspeed {a['deepspeed']}: not a readable JSON config ({exc})")
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:  # not imported here: it prints to stdout
            problems.append("--deepspeed needs the deepspeed package (pip install deepspeed)")
        if a["fsdp"] or a["method"] == "qlora":
            problems.append("--deepspeed cannot be combined with --fsdp or --method qlora")
    return problems


def evaluation_problems(a: dict) -> list[str]:
    """Early stopping and best-model selection, which need evaluations to compare."""
    problems = []
    if a["early_stopping_patience"] < 0:
        problems.append(f"--early_stopping_patience must be >= 0, got {a['early_stopping_patience']}")
    if (a["early_stopping_patience"] or a["load_best_model_at_end"]) and a["eval_steps"] < 1:
        problems.append("--early_stopping_patience and --load_best_model_at_end need --eval_steps N (evaluations "
                        "to compare)")
    if (a["early_stopping_patience"] or a["load_best_model_at_end"]) and not Path(a["data_path"][0]).is_dir() \
            and a["val_set_size"] <= 0:
        problems.append("--early_stopping_patience and --load_best_model_at_end need a validation split "
                        "(--val_set_size > 0)")
    return problems


def tracking_problems(a: dict) -> list[str]:
    """Weights & Biases and TensorBoard: their flags and packages."""
    problems = []
    if a["wandb_project"] or a["wandb_log_model"] or a["wandb_watch"] not in ("", "false"):
        if not a["wandb_project"]:
            problems.append("--wandb_watch / --wandb_log_model need --wandb_project")
        try:
            import wandb  # noqa: F401
        except ImportError:
            problems.append("--wandb_project needs the wandb package (pip install wandb)")
    if a["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            problems.append("--tensorboard needs the tensorboard package (pip install tensorboard), or pass "
                            "--notensorboard")
    return problems


def checkpoint_problems(a: dict) -> list[str]:
    """Where the run starts from (resume, init_from) and where it writes."""
    problems = []
    rc = a["resume_from_checkpoint"]
    if rc not in (None, "auto") and not Path(rc).is_dir():
        problems.append(f"--resume_from_checkpoint {rc}: no such folder (or use auto)")
    if a["init_from"] is not None:
        if not Path(a["init_from"]).is_dir():
            problems.append(f"--init_from {a['init_from']}: no such folder")
        if rc is not None:
            problems.append("--init_from starts a new run; it cannot be combined with --resume_from_checkpoint")
    if Path(a["output_dir"]).absolute() == Path(a["base_model"]).absolute():
        problems.append("--output_dir must not be the base model folder")
    return problems


# ---------------------------------------------------------------------------------------------------


def prepare(args: dict) -> Path:
    """The prepared dataset folder: the one given, or one made from raw files in OUTPUT_DIR/data."""
    from utils.artifacts import read_meta, tokenizer_fingerprint

    paths = args["data_path"]
    if len(paths) == 1 and Path(paths[0]).is_dir():
        folder = Path(paths[0])
        meta = read_meta(folder)
        if not meta or meta.get("stage") != "prepare_data" or not meta.get("complete"):
            raise SuiteError(f"--data_path {folder}: not a complete prepare_data.py output folder")
        if meta["base_model"]["tokenizer_files"] != tokenizer_fingerprint(args["base_model"]):
            raise SuiteError(f"--data_path {folder} was tokenized with a different tokenizer "
                             f"({meta['base_model']['path']}) than --base_model {args['base_model']}")
        return folder
    import prepare_data

    folder = Path(args["output_dir"]) / "data"
    kwargs = {k: args[k] for k in ("prompt_template_name", "cutoff_len", "val_set_size", "train_on_inputs", "seed",
                                   "trust_remote_code", "overwrite")}
    with contextlib.redirect_stdout(sys.stderr):  # stdout is this stage's payload (its output path)
        prepare_data.main(args["base_model"], list(paths), str(folder), **kwargs)
    return folder


def fingerprint_of(args: dict, data_dir: Path, base: dict) -> str:
    from utils.artifacts import read_meta, sha256_file, sha256_json
    from utils.training.checkpoint import init_weights_file

    ignore = ("output_dir", "resume_from_checkpoint", "overwrite", "data_path", "base_model", "logging_steps",
              "init_from", "tensorboard", "wandb_project", "wandb_run_name", "wandb_watch", "wandb_log_model")
    return sha256_json({
        "stage": "finetune", "args": {k: v for k, v in args.items() if k not in ignore},
        "base": base,
        "data": read_meta(data_dir)["fingerprint"],
        "init_from": sha256_file(init_weights_file(Path(args["init_from"]))) if args["init_from"] else None,
    })


class TrainingData(NamedTuple):
    train: list  # (input_ids, labels) rows
    val: list
    lengths: list[int]  # of the train rows
    pack_len: int  # tokens per packed row


@dataclasses.dataclass
class Training:
    """What the steps of one run share: its settings, model, optimizer and data, and where it has got to."""
    args: dict
    dist: Any
    out: Path
    data: TrainingData
    model: Any
    params: list  # the trainable parameters
    optimizer: Any
    scheduler: Any
    runner: Any  # what runs the forward pass: the model, or the DeepSpeed engine wrapping it
    per_epoch: int
    total_steps: int
    n_virtual: int  # virtual tokens prepended to the logits
    step: int = 0
    state: dict = dataclasses.field(default_factory=lambda: {"best": None, "bad_evals": 0})
    best_weights: Any = None
    tracker: Any = None


def train(args: dict, dist) -> None:
    import torch

    from utils.artifacts import base_fingerprint
    from utils.training.tracking import Tracker

    out = Path(args["output_dir"])
    data_dir = dist.on_main(prepare, args)
    base = base_fingerprint(args["base_model"])
    fingerprint = fingerprint_of(args, data_dir, base)
    if dist.on_main(check_output_dir_for_run, out, fingerprint, args):
        if dist.main:
            print(f"finetune: {out} already holds this finished run; nothing to do", file=sys.stderr)
            print(out.absolute())
        return

    torch.manual_seed(args["seed"])
    data = load_rows(args, data_dir)
    model = build_model(args, dist)
    # Same initial weights on every rank (seeded above); different dropout masks per rank from here.
    torch.manual_seed(args["seed"] + dist.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if dist.main:
        print(f"finetune: method {args['method']}, {n_trainable:,} trainable parameters, "
              f"{len(data.train)} train / {len(data.val)} validation examples", file=sys.stderr)
    run = build_optimizer(args, dist, out, data, model, params)
    resume_or_refuse(run)
    recorded = recorded_args(args, data_dir, dist.main)
    run.tracker = Tracker(out, recorded, run.step, dist.main)
    run.tracker.watch(model)
    stopped_early = run_steps(run)
    final_eval = final_evaluation(run)
    summary = run_summary(run, final_eval, stopped_early, n_trainable)
    finish(run, recorded, data_dir, fingerprint, base, summary)


def load_rows(args: dict, data_dir: Path) -> TrainingData:
    """The prepared train and validation rows, checked against what early stopping needs."""
    from datasets import load_from_disk

    from utils.artifacts import read_meta

    splits = load_from_disk(str(data_dir / "dataset"))
    train_rows = list(zip(splits["train"]["input_ids"], splits["train"]["labels"]))
    val_rows = list(zip(splits["validation"]["input_ids"], splits["validation"]["labels"])) if "validation" in splits else []
    if (args["early_stopping_patience"] or args["load_best_model_at_end"]) and not val_rows:
        raise SuiteError(f"--data_path {data_dir} has no validation split, which --early_stopping_patience and "
                         "--load_best_model_at_end need")
    lengths = [len(ids) for ids, _ in train_rows]
    pack_len = max(read_meta(data_dir)["args"]["cutoff_len"], max(lengths))
    return TrainingData(train_rows, val_rows, lengths, pack_len)


def build_model(args: dict, dist):
    """The base model with the method's trainable parts, sharded under FSDP, from --init_from's weights."""
    from utils.training import checkpoint as ckpt
    from utils.training.methods import check_packing, prepare_model
    from utils.weights.pretrained import load_base_model

    model = load_base_model(args["base_model"], dtype=args["dtype"], trust_remote_code=args["trust_remote_code"],
                            allow_pickle_weights=args["allow_pickle_weights"], device=dist.device,
                            quantization=quantization_of(args))
    if args["gradient_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_model(model, args["method"], args)
    if args["packing"]:
        check_packing(model, dist.device)
    if args["fsdp"]:
        dist.shard(model)
    if args["init_from"]:
        ckpt.init_weights(Path(args["init_from"]), model)
    return model


def build_optimizer(args: dict, dist, out: Path, data: TrainingData, model, params: list) -> Training:
    """The run's schedule, AdamW and its learning-rate schedule (inside a DeepSpeed engine with --deepspeed)."""
    import torch

    from utils.training.batches import steps_per_epoch

    per_epoch = steps_per_epoch(len(data.train), args["batch_size"])
    total_steps = args["max_steps"] or per_epoch * args["num_epochs"]
    warmup = args["warmup_steps"] or int(args["warmup_ratio"] * total_steps)
    optimizer = torch.optim.AdamW(params, lr=args["learning_rate"], weight_decay=args["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args["lr_scheduler"], warmup, total_steps))
    runner = model
    if args["deepspeed"]:
        runner = dist.deepspeed(model, optimizer, args["deepspeed"], args["micro_batch_size"], args["max_grad_norm"],
                                bf16=args["dtype"] == "bf16")
    n_virtual = args["num_virtual_tokens"] if args["method"] in PROMPT_METHODS else 0
    return Training(args, dist, out, data, model, params, optimizer, scheduler, runner, per_epoch, total_steps,
                    n_virtual)


def resume_or_refuse(run: Training) -> None:
    """Continue from the checkpoint --resume_from_checkpoint names; refuse to start over an unfinished run."""
    from utils.training import checkpoint as ckpt

    dist, out = run.dist, run.out
    resume = dist.on_main(ckpt.find_resume, out, run.args["resume_from_checkpoint"])
    if resume is not None:
        run.step, run.state, run.best_weights = ckpt.load_checkpoint(resume, run.model, run.optimizer, run.scheduler, dist)
        if dist.main:
            print(f"finetune: resumed from {resume} at step {run.step}", file=sys.stderr)
    elif dist.on_main(ckpt.checkpoint_dirs, out):
        raise SuiteError(f"--output_dir {out} holds checkpoints of an unfinished run; pass --resume_from_checkpoint "
                         "auto to continue it, or --overwrite to start again")


def run_steps(run: Training) -> bool:
    """The optimizer steps from run.step on; True if early stopping ended them. On SIGTERM / Ctrl-C it saves a
    checkpoint and exits (130 / 143)."""
    from utils.training.batches import epoch_steps
    from utils.training.tracking import StepProgress

    args, dist = run.args, run.dist
    stop = StopFlag()
    progress = StepProgress(run.total_steps, run.step, args["logging_steps"], dist.main)
    stop.progress = progress
    run.model.train()
    t0, tokens_seen, cached_epoch, steps = time.perf_counter(), 0, None, []
    stopped_early = False
    while run.step < run.total_steps:
        epoch, index = divmod(run.step, run.per_epoch)
        if epoch != cached_epoch:
            steps = epoch_steps(run.data.lengths, args["batch_size"], args["seed"], epoch, args["group_by_length"])
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
        if interrupted or (args["save_steps"] and run.step % args["save_steps"] == 0 and not last):
            save_checkpoint(run)
        if interrupted:
            exit_interrupted(run, stop, progress)
        if stopped_early:
            progress.close()
            if dist.main:
                best = run.state["best"]
                print(f"finetune: early stopping at step {run.step}: eval loss has not improved on "
                      f"{best['eval_loss']:.4f} (step {best['step']}) for {run.state['bad_evals']} evaluations",
                      file=sys.stderr)
            break
    progress.close()
    stop.restore()
    return stopped_early


def optimizer_step(run: Training, step_rows: list[int], stop: StopFlag) -> tuple[float, int, int, bool]:
    """One optimizer step over ``step_rows``, over all ranks: (loss, trained tokens over all ranks, this rank's
    real tokens, whether some rank was asked to stop)."""
    import torch

    dist, data = run.dist, run.data
    micro = step_micro_batches(step_rows, data.train, data.lengths, run.args, dist, data.pack_len)
    local_tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
    n_tokens = int(dist.all_reduce_(torch.tensor([local_tokens], dtype=torch.float64))[0])
    loss_sum, real_tokens = accumulate_gradients(run, micro, n_tokens)
    dist.all_reduce_grads(run.params)
    # One collective for the logged loss and for agreeing to stop on a signal at this step.
    totals = dist.all_reduce_(torch.tensor([loss_sum, 1.0 if stop.requested else 0.0], dtype=torch.float64))
    loss_sum, interrupted = float(totals[0]), bool(totals[1] > 0)
    apply_gradients(run)
    run.scheduler.step()
    return loss_sum, n_tokens, real_tokens, interrupted


def accumulate_gradients(run: Training, micro: list[dict], n_tokens: int) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches, the loss a mean over the step's ``n_tokens``:
    (this rank's loss, its real tokens)."""
    dist, model = run.dist, run.model
    # FSDP gathers weights in every forward: all ranks must run as many (empty ones if need be). Its
    # gradient reduction averages over ranks, which the loss scale undoes.
    n_micro = dist.most(len(micro)) if dist.sharded else len(micro)
    scale = dist.world_size if dist.sharded else 1
    loss_sum, real_tokens = 0.0, 0
    for i in range(n_micro):
        m = micro[i] if i < len(micro) else empty_batch()
        if dist.fsdp:
            model.set_requires_gradient_sync(i == n_micro - 1)
        loss = token_loss_sum(run.runner, m, run.n_virtual, dist.device) / max(n_tokens, 1)
        if dist.engine is not None:
            dist.engine.backward(loss * scale, scale_wrt_gas=False)
        else:
            (loss * scale).backward()
        loss_sum += loss.item()
        real_tokens += m["real_tokens"]
    return loss_sum, real_tokens


def apply_gradients(run: Training) -> None:
    """Clip, step and zero the gradients (the DeepSpeed engine does all three itself)."""
    import torch

    if run.dist.engine is not None:
        run.dist.engine.step()  # clips (gradient_clipping), steps and zeroes the gradients
    else:
        if run.args["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(run.params, run.args["max_grad_norm"])
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)


def evaluate_if_due(run: Training) -> bool:
    """Evaluate every --eval_steps (not at the last step: the end evaluates); True if early stopping is due."""
    args, data = run.args, run.data
    if not (data.val and args["eval_steps"] and run.step % args["eval_steps"] == 0 and run.step < run.total_steps):
        return False
    result = evaluate(run.model, data.val, args, run.n_virtual, run.dist)
    run.tracker.log({"step": run.step, **result})
    run.best_weights, stopped_early = track_best(result, run.step, run.state, run.best_weights, run.model, args,
                                                 run.dist)
    run.model.train()
    return stopped_early


def save_checkpoint(run: Training) -> None:
    """A resumable checkpoint of this step, written by rank 0 from every rank's state."""
    from utils.training import checkpoint as ckpt

    dist, out = run.dist, run.out
    engine_dir = None
    if dist.engine is not None:  # DeepSpeed writes its own sharded optimizer state, every rank
        engine_dir = out / f".deepspeed-{run.step}"
        dist.engine.save_checkpoint(str(engine_dir), tag="ds")
        dist.barrier()
    weights, optim = dist.trainable_state(run.model), dist.optimizer_state(run.model, run.optimizer)
    dist.on_main(ckpt.save_checkpoint, out, run.step, weights, optim, run.scheduler, run.args["save_total_limit"],
                 run.state, run.best_weights, ckpt.gather_rng(dist), engine_dir)
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


def final_evaluation(run: Training) -> dict:
    """The end-of-run evaluation ({} without a validation split), of the best weights with
    --load_best_model_at_end; logged and reported."""
    args, dist, model, val_rows, step = run.args, run.dist, run.model, run.data.val, run.step
    final_eval = evaluate(model, val_rows, args, run.n_virtual, dist) if val_rows else {}
    if args["load_best_model_at_end"] and final_eval:
        # The last weights compete too (the loop does not evaluate at the last step).
        best = run.state["best"]
        if best is None or final_eval["eval_loss"] < best["eval_loss"] or best["step"] == step:
            run.state["best"] = {"step": step, "eval_loss": final_eval["eval_loss"]}
        elif dist.broadcast(run.best_weights is not None):
            dist.put_weights(model, run.best_weights)
            final_eval = evaluate(model, val_rows, args, run.n_virtual, dist)
            if dist.main:
                print(f"finetune: keeping the best weights, from step {best['step']} (eval loss "
                      f"{best['eval_loss']:.4f})", file=sys.stderr)
    if final_eval:
        run.tracker.log({"step": step, "final": True, **final_eval})
        if dist.main:
            print(f"finetune: eval loss {final_eval['eval_loss']:.4f}, token accuracy "
                  f"{final_eval['eval_token_accuracy']:.4f}", file=sys.stderr)
    return final_eval


def run_summary(run: Training, final_eval: dict, stopped_early: bool, n_trainable: int) -> dict:
    """What pipeline.json records of how the run went."""
    dist = run.dist
    summary = {"final_eval": final_eval, "steps": run.step, "stopped_early": stopped_early, "best": run.state["best"],
               "trainable_parameters": n_trainable, "world_size": dist.world_size,
               "sharding": "fsdp" if dist.fsdp else f"deepspeed-zero{dist.zero_stage}" if dist.engine else None}
    if quantization_of(run.args):
        layers = sum(type(m).__module__.startswith("bitsandbytes") for m in run.model.modules())
        summary["quantization"] = {**quantization_of(run.args), "quantized_layers": layers}
    return summary


def finish(run: Training, recorded: dict, data_dir: Path, fingerprint: str, base: dict, summary: dict) -> None:
    """Write the final adapter (or model), the loss curve and pipeline.json; print the output folder."""
    from utils.training import checkpoint as ckpt

    dist, out = run.dist, run.out
    gathered = dist.trainable_state(run.model) if dist.sharded else None
    plot = run.tracker.plot()  # before save_final: pipeline.json lists its hash with the other files
    dist.on_main(ckpt.save_final, out, run.model, recorded, data_dir, fingerprint, base, summary, gathered)
    run.tracker.finish(out if dist.main else None)
    if dist.main:
        if plot is not None:
            print(f"finetune: loss curve {plot.absolute()}", file=sys.stderr)
        print(out.absolute())


def empty_batch() -> dict:
    """A micro-batch with nothing to learn (loss 0): a rank's turn in a collective it has no rows for."""
    import torch

    return {"input_ids": torch.zeros((1, 2), dtype=torch.long), "attention_mask": torch.ones((1, 2), dtype=torch.long),
            "labels": torch.full((1, 2), -100, dtype=torch.long), "real_tokens": 0}


# Data-stage flags: applied when finetune prepares raw files itself; a prepared folder keeps its own values.
DATA_STAGE_ARGS = ("prompt_template_name", "cutoff_len", "val_set_size", "train_on_inputs")


def recorded_args(args: dict, data_dir: Path, report: bool = True) -> dict:
    """The arguments as this run used them, for pipeline.json: the data-stage values come from the data
    folder's own pipeline.json (with a prepared --data_path, finetune's flags for them do not apply). A value
    given here that differs from both the default and the folder's is reported, as it has no effect."""
    import inspect

    from utils.artifacts import read_meta

    prepared = read_meta(data_dir)["args"]
    defaults = inspect.signature(main).parameters
    used = dict(args)
    for key in DATA_STAGE_ARGS:
        if key not in prepared:
            continue
        if report and args[key] != prepared[key] and args[key] != defaults[key].default:
            print(f"finetune: --{key} {args[key]} does not apply to the prepared --data_path {data_dir} (prepared "
                  f"with {prepared[key]}); recording {prepared[key]}", file=sys.stderr)
        used[key] = prepared[key]
    return used


def quantization_of(args: dict) -> dict | None:
    if args["method"] != "qlora":
        return None
    return {"bits": args["qlora_bits"], "quant_type": args["qlora_quant_type"],
            "double_quant": args["qlora_double_quant"], "compute_dtype": args["dtype"]}


def step_micro_batches(step_rows: list[int], rows, lengths, args: dict, dist, pack_len: int) -> list[dict]:
    """This rank's micro-batches of one optimizer step: its share of the step's rows, sorted by length,
    then padded in groups of micro_batch_size or packed into rows of pack_len tokens."""
    from utils.training.batches import collate, collate_packed, micro_batches, pack, rank_rows

    mine = rank_rows(step_rows, lengths, dist.rank, dist.world_size)
    mb = args["micro_batch_size"]
    if args["packing"]:
        bins = pack(mine, lengths, pack_len)
        return [collate_packed([[rows[i] for i in b] for b in bins[j:j + mb]], 0) for j in range(0, len(bins), mb)]
    batches = []
    for group in micro_batches(mine, mb):
        batch = collate([rows[i] for i in group], 0)
        batch["real_tokens"] = sum(lengths[i] for i in group)
        batches.append(batch)
    return batches


def track_best(result: dict, step: int, state: dict, best_weights, model, args: dict, dist):
    """Update the best evaluation; returns (best weights to keep, whether to stop early)."""
    best = state["best"]
    if best is None or result["eval_loss"] < best["eval_loss"]:
        state["best"] = {"step": step, "eval_loss": result["eval_loss"]}
        state["bad_evals"] = 0
        if args["load_best_model_at_end"]:
            best_weights = dist.trainable_state(model)
    else:
        state["bad_evals"] += 1
    patience = args["early_stopping_patience"]
    return best_weights, bool(patience and state["bad_evals"] >= patience)


def check_output_dir_for_run(out: Path, fingerprint: str, args: dict) -> bool:
    """True if ``out`` already holds this finished run. A different finished run needs --overwrite, which
    removes that run's own files (those its pipeline.json lists, checkpoints, metrics) and nothing else."""
    from utils.training import checkpoint as ckpt
    from utils.artifacts import check_output_dir, read_meta, remove_recorded

    if check_output_dir(out, "finetune", fingerprint, args["overwrite"], resumable=ckpt.unfinished_run):
        return True
    meta = read_meta(out)
    finished = bool(meta and meta.get("complete"))
    # --overwrite on an unfinished run starts it again, unless it is being resumed.
    if finished or args["overwrite"] and args["resume_from_checkpoint"] is None:
        remove_recorded(out, meta)  # e.g. a single model.safetensors transformers would load before new shards
        ckpt.clear_run(out)
        ckpt.mark_unfinished(out)
    return False


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)

    return f


def next_token_targets(model, batch, n_virtual: int, device="cpu", trained_only: bool = False):
    """(logits, labels) aligned for next-token prediction, virtual-token positions dropped.

    With ``trained_only`` the output head runs only at positions whose next token is trained (a
    forward pre-hook on the head selects them): with a 32k-150k vocabulary the full logits are most of
    a step's memory, and prompt positions never need them.
    """
    import torch

    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"].to(device)
    head = model.get_output_embeddings() if trained_only and n_virtual == 0 else None
    keep = labels[:, 1:] != -100
    selected = []
    if head is not None:
        positions = torch.zeros_like(labels, dtype=torch.bool)
        positions[:, :-1] = keep

        def select(module, args):
            hidden = args[0]
            if hidden.shape[:2] != positions.shape:  # an unusual head call: leave it alone
                return None
            selected.append(True)
            return (hidden[positions][None], *args[1:])

        handle = head.register_forward_pre_hook(select)
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            handle.remove()
        if selected:
            return logits[0].float(), labels[:, 1:][keep]
    else:
        logits = model(**inputs, use_cache=False).logits
    logits = logits[:, n_virtual:, :][:, :-1].float()
    return logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)


def token_loss_sum(model, batch, n_virtual: int, device="cpu"):
    """Summed next-token cross-entropy over trained positions (so accumulation is token-exact)."""
    import torch.nn.functional as F

    logits, labels = next_token_targets(model, batch, n_virtual, device, trained_only=True)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def evaluate(model, rows, args, n_virtual: int, dist=None) -> dict:
    """Token-mean loss and next-token accuracy on the validation split (sharded over ranks)."""
    import torch
    import torch.nn.functional as F

    from utils.training.batches import collate

    rank, world, device = (dist.rank, dist.world_size, dist.device) if dist else (0, 1, "cpu")
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i][0]), i))[rank::world]
        mb = args["micro_batch_size"]
        batches = [collate([rows[j] for j in order[i:i + mb]], 0) for i in range(0, len(order), mb)]
        if dist is not None and dist.fsdp:  # every rank must join every forward
            batches += [empty_batch()] * (dist.most(len(batches)) - len(batches))
        for batch in batches:
            logits, labels = next_token_targets(model, batch, n_virtual, device)
            mask = labels != -100
            loss_sum += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            count += int(mask.sum())
    if dist is not None:
        loss_sum, correct, count = dist.all_reduce_(torch.tensor([loss_sum, correct, count], dtype=torch.float64)).tolist()
        correct, count = int(correct), int(count)
    return {"eval_loss": round(loss_sum / max(count, 1), 6), "eval_token_accuracy": round(correct / max(count, 1), 6),
            "eval_tokens": count}


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
