"""Fine-tuning stage: LoRA (rsLoRA, DoRA), P-tuning v2 prefix, p-tuning, prompt tuning or full SFT.

Reads raw data files (prepared on the fly into OUTPUT_DIR/data with prepare_data.py) or a
prepare_data.py output folder, trains with a plain PyTorch loop (token-exact loss over gradient
accumulation, length-grouped batches), and writes a folder every later stage reads by path:

    OUTPUT_DIR/adapter_config.json + adapter_model.safetensors   (PEFT format; full SFT: the model)
    OUTPUT_DIR/tokenizer files, template.json, data_report.json, metrics.jsonl
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
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal

from utils.cli import SuiteError, UsageError, run

PROMPT_METHODS = ("prompt", "ptuning")  # peft prepends virtual tokens to the inputs (and logits)


def main(
    base_model: str,
    data_path: list[str],
    output_dir: str = "./lora-alpaca",
    *,
    method: Literal["lora", "prefix", "ptuning", "prompt", "full"] = "lora",
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
    group_by_length: bool = True,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] = ("all-linear",),
    use_rslora: bool = False,
    use_dora: bool = False,
    num_virtual_tokens: int = 16,
    prefix_projection: bool = False,
    encoder_hidden_size: int = 0,
    dtype: Literal["fp32", "bf16"] = "fp32",
    eval_steps: int = 0,
    save_steps: int = 200,
    save_total_limit: int = 3,
    logging_steps: int = 10,
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
        method: lora, prefix (P-tuning v2), ptuning (prompt encoder), prompt (prompt tuning) or full.
        batch_size: Effective batch (rows per optimizer step) = micro_batch_size x accumulation steps.
        micro_batch_size: Rows per forward pass.
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
        group_by_length: Batch rows of similar length together (less padding, faster).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Linear layers to adapt, by leaf name (e.g. q_proj v_proj), or all-linear.
        use_rslora: Rank-stabilised LoRA scaling (alpha / sqrt(r)).
        use_dora: Weight-decomposed LoRA (DoRA).
        num_virtual_tokens: Virtual tokens for prefix, ptuning and prompt.
        prefix_projection: P-tuning v2 with an MLP reparameterisation of the prefix.
        encoder_hidden_size: Hidden size of the prefix / prompt encoder MLP (0: the model's hidden size).
        dtype: Training precision: fp32 or bf16 (fp16 has no fast path on CPU).
        eval_steps: Evaluate on the validation split every N steps (0: only at the end).
        save_steps: Write a resumable checkpoint every N steps (0: only at the end / on interrupt).
        save_total_limit: Keep at most this many checkpoints.
        logging_steps: Print the loss every N steps.
        resume_from_checkpoint: ``auto`` (the newest complete checkpoint in output_dir) or a checkpoint folder.
        init_from: Start a new run (new data, epochs or schedule) from the trained weights of an earlier
            finetune output folder or checkpoint, with a fresh optimizer. Unlike resume, nothing else is restored.
        seed: Seed for data order, initialisation and dropout.
        trust_remote_code: Allow custom model code from base_model to run.
        allow_pickle_weights: Accept pytorch_model.bin weights (loaded with weights_only=True).
        overwrite: Replace an output_dir that holds a different run.
    """
    args = dict(locals())
    args["lora_target_modules"] = list(lora_target_modules)
    validate_args(**args)
    from utils.checkpoint import RunLock

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        train(args)


def validate_args(**a) -> None:
    from utils.model import check_model_dir

    problems = check_model_dir(a["base_model"], a["allow_pickle_weights"])
    if not a["data_path"]:
        problems.append("--data_path: give data files or a prepare_data.py folder")
    for p in a["data_path"]:
        if not Path(p).exists():
            problems.append(f"--data_path {p}: not found")
    if len(a["data_path"]) > 1 and any(Path(p).is_dir() for p in a["data_path"]):
        problems.append("--data_path: a prepared folder must be given alone")
    for name in ("batch_size", "micro_batch_size", "lora_r", "num_virtual_tokens"):
        if a[name] < 1:
            problems.append(f"--{name} must be >= 1, got {a[name]}")
    if a["batch_size"] % max(a["micro_batch_size"], 1):
        problems.append(f"--batch_size {a['batch_size']} must be a multiple of --micro_batch_size {a['micro_batch_size']}")
    if a["max_steps"] < 0 or a["num_epochs"] < 1 and a["max_steps"] == 0:
        problems.append("--max_steps must be >= 0 and --num_epochs >= 1")
    if not a["add_eos_token"]:
        problems.append("--add_eos_token False is not supported: every trained response ends with EOS")
    if not 0 <= a["warmup_ratio"] < 1:
        problems.append(f"--warmup_ratio must be in [0, 1), got {a['warmup_ratio']}")
    if not 0 <= a["lora_dropout"] < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {a['lora_dropout']}")
    if a["learning_rate"] <= 0:
        problems.append(f"--learning_rate must be > 0, got {a['learning_rate']}")
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
    if problems:
        raise UsageError("\n".join(problems))


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


def fingerprint_of(args: dict, data_dir: Path) -> str:
    from utils.artifacts import read_meta, sha256_file, sha256_json
    from utils.checkpoint import init_weights_file

    base = Path(args["base_model"])
    weights = {f.name: [f.stat().st_size, sha256_file(f) if f.stat().st_size < 1 << 28 else None]
               for f in sorted(base.glob("*.safetensors"))}
    ignore = ("output_dir", "resume_from_checkpoint", "overwrite", "data_path", "base_model", "logging_steps",
              "init_from")
    return sha256_json({
        "stage": "finetune", "args": {k: v for k, v in args.items() if k not in ignore},
        "base": {"config": sha256_file(base / "config.json"), "weights": weights},
        "data": read_meta(data_dir)["fingerprint"],
        "init_from": sha256_file(init_weights_file(Path(args["init_from"]))) if args["init_from"] else None,
    })


def train(args: dict) -> None:
    import torch
    from datasets import load_from_disk

    from utils import checkpoint as ckpt
    from utils.batches import collate, epoch_batches, steps_per_epoch
    from utils.model import load_base_model, prepare_model

    out = Path(args["output_dir"])
    data_dir = prepare(args)
    fingerprint = fingerprint_of(args, data_dir)
    if check_output_dir_for_run(out, fingerprint, args):
        print(f"finetune: {out} already holds this finished run; nothing to do", file=sys.stderr)
        print(out.absolute())
        return

    torch.manual_seed(args["seed"])
    splits = load_from_disk(str(data_dir / "dataset"))
    train_rows = list(zip(splits["train"]["input_ids"], splits["train"]["labels"]))
    val_rows = list(zip(splits["validation"]["input_ids"], splits["validation"]["labels"])) if "validation" in splits else []
    lengths = [len(ids) for ids, _ in train_rows]

    model = load_base_model(args["base_model"], dtype=args["dtype"], trust_remote_code=args["trust_remote_code"],
                            allow_pickle_weights=args["allow_pickle_weights"])
    model = prepare_model(model, args["method"], args)
    if args["init_from"]:
        ckpt.init_weights(Path(args["init_from"]), model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    print(f"finetune: method {args['method']}, {n_trainable:,} trainable parameters, "
          f"{len(train_rows)} train / {len(val_rows)} validation examples", file=sys.stderr)

    accum = args["batch_size"] // args["micro_batch_size"]
    n_batches = math.ceil(len(train_rows) / args["micro_batch_size"])
    per_epoch = steps_per_epoch(n_batches, accum)
    total_steps = args["max_steps"] or per_epoch * args["num_epochs"]
    warmup = args["warmup_steps"] or int(args["warmup_ratio"] * total_steps)
    optimizer = torch.optim.AdamW(params, lr=args["learning_rate"], weight_decay=args["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args["lr_scheduler"], warmup, total_steps))

    step = 0
    resume = ckpt.find_resume(out, args["resume_from_checkpoint"])
    if resume is not None:
        step = ckpt.load(resume, model, optimizer, scheduler)
        print(f"finetune: resumed from {resume} at step {step}", file=sys.stderr)
    elif ckpt.checkpoint_dirs(out):
        raise SuiteError(f"--output_dir {out} holds checkpoints of an unfinished run; pass --resume_from_checkpoint "
                         "auto to continue it, or --overwrite to start again")
    ckpt.truncate_metrics(out / "metrics.jsonl", step)

    stop = StopFlag()
    n_virtual = args["num_virtual_tokens"] if args["method"] in PROMPT_METHODS else 0
    pad_id = 0
    model.train()
    t0, tokens_seen = time.perf_counter(), 0
    while step < total_steps:
        epoch, group = divmod(step, per_epoch)
        batches = epoch_batches(lengths, args["micro_batch_size"], args["seed"], epoch, args["group_by_length"])
        micro = [collate([train_rows[i] for i in b], pad_id) for b in batches[group * accum:(group + 1) * accum]]
        n_tokens = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro)
        loss_sum = 0.0
        for m in micro:
            loss = token_loss_sum(model, m, n_virtual) / max(n_tokens, 1)
            loss.backward()
            loss_sum += loss.item()
            tokens_seen += int(m["attention_mask"].sum())
        if args["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, args["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "epoch": epoch, "loss": round(loss_sum, 6), "lr": scheduler.get_last_lr()[0],
                  "trained_tokens": n_tokens}
        ckpt.append_metrics(out / "metrics.jsonl", record)
        if args["logging_steps"] and step % args["logging_steps"] == 0:
            rate = tokens_seen / (time.perf_counter() - t0)
            print(f"finetune: step {step}/{total_steps} loss {loss_sum:.4f} lr {record['lr']:.2e} "
                  f"({rate:,.0f} tokens/s)", file=sys.stderr)
        if val_rows and args["eval_steps"] and step % args["eval_steps"] == 0 and step < total_steps:
            ckpt.append_metrics(out / "metrics.jsonl", {"step": step, **evaluate(model, val_rows, args, n_virtual)})
            model.train()
        interrupted = stop.requested
        if interrupted or (args["save_steps"] and step % args["save_steps"] == 0 and step < total_steps):
            ckpt.save(out, step, model, optimizer, scheduler, args["save_total_limit"])
        if interrupted:
            print(f"finetune: interrupted ({stop.requested}); checkpoint at step {step} saved. Resume with "
                  "--resume_from_checkpoint auto", file=sys.stderr)
            sys.exit(130 if stop.requested == "SIGINT" else 143)
    stop.restore()

    final_eval = evaluate(model, val_rows, args, n_virtual) if val_rows else {}
    if final_eval:
        ckpt.append_metrics(out / "metrics.jsonl", {"step": step, **final_eval})
        print(f"finetune: eval loss {final_eval['eval_loss']:.4f}, token accuracy "
              f"{final_eval['eval_token_accuracy']:.4f}", file=sys.stderr)
    ckpt.save_final(out, model, args, data_dir, fingerprint, final_eval, n_trainable)
    print(out.absolute())


def check_output_dir_for_run(out: Path, fingerprint: str, args: dict) -> bool:
    """True if ``out`` already holds this finished run. A different finished run needs --overwrite."""
    from utils.artifacts import META_FILE, read_meta

    meta = read_meta(out)
    if meta is None:
        return False
    if meta.get("stage") != "finetune":
        raise SuiteError(f"--output_dir {out} holds a {meta.get('stage', 'different')} output, not a fine-tune; "
                         "choose another folder (it is never replaced)")
    if meta.get("fingerprint") == fingerprint and meta.get("complete"):
        return True
    if not args["overwrite"]:
        raise SuiteError(f"--output_dir {out} holds a different finished run; pass --overwrite to replace it")
    (out / META_FILE).unlink()
    from utils import checkpoint as ckpt

    ckpt.clear_run(out)
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


def next_token_targets(model, batch, n_virtual: int):
    """(logits, labels) aligned for next-token prediction, virtual-token positions dropped."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, n_virtual:, :][:, :-1].float()
    return logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1)


def token_loss_sum(model, batch, n_virtual: int):
    """Summed next-token cross-entropy over trained positions (so accumulation is token-exact)."""
    import torch.nn.functional as F

    logits, labels = next_token_targets(model, batch, n_virtual)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def evaluate(model, rows, args, n_virtual: int) -> dict:
    """Token-mean loss and next-token accuracy on the validation split."""
    import torch
    import torch.nn.functional as F

    from utils.batches import collate

    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        for i in range(0, len(order), args["micro_batch_size"]):
            batch = collate([rows[j] for j in order[i:i + args["micro_batch_size"]]], 0)
            logits, labels = next_token_targets(model, batch, n_virtual)
            mask = labels != -100
            loss_sum += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            count += int(mask.sum())
    return {"eval_loss": round(loss_sum / max(count, 1), 6), "eval_token_accuracy": round(correct / max(count, 1), 6),
            "eval_tokens": count}


class StopFlag:
    """SIGTERM / Ctrl-C request a checkpoint at the next step boundary instead of killing the run."""

    def __init__(self):
        self.requested: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"finetune: {self.requested} received; saving a checkpoint at the end of this step", file=sys.stderr)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(main)
