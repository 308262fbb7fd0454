"""Score a prepared data folder's validation split with a model: the loss finetune.py reports, before training.

finetune.py evaluates the tuned model on the validation split at the end of a run (``final`` record of
its metrics.jsonl). This script runs the same evaluation function on the same rows with an untrained
model, so the two losses compare like with like: the demo's "validation loss before -> after".

Writes OUTPUT_FILE (JSON: eval_loss, eval_token_accuracy, eval_tokens, and what was scored: the model's
config and weight hashes and the prepared data's fingerprint), atomically; re-running with the same model
and data is a no-op. The output file's path goes to stdout, the scores to stderr.

Example:
    python scripts/score_validation.py --model ../shared/models/stories260K/hf --data_path runs/demo/data \\
        --output_file runs/demo/base_eval.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.artifacts import base_fingerprint, sha256_json, write_json  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import SuiteError, UsageError  # noqa: E402
from utils.training.evaluate import evaluate  # noqa: E402
from utils.training.prepared import check_prepared, prepared_rows  # noqa: E402
from utils.weights.folders import check_model_dir  # noqa: E402
from utils.weights.pretrained import load_base_model  # noqa: E402

STAGE = "score_validation"


def main(
    model: str,
    data_path: str,
    output_file: str,
    *,
    micro_batch_size: int = 8,
    overwrite: bool = False,
) -> None:
    """Score the validation split of a prepare_data.py folder with a model (no training).

    Args:
        model: Local model folder (safetensors weights) whose tokenizer prepared ``data_path``.
        data_path: A prepare_data.py output folder with a validation split.
        output_file: JSON file to write.
        micro_batch_size: Rows per forward pass (the scores do not depend on it beyond float rounding).
        overwrite: Replace an output_file that holds other scores or was not written by this script.
    """
    problems = check_model_dir(model, flag="--model")
    if not Path(data_path).is_dir():
        problems.append(f"--data_path {data_path}: no such folder (give a prepare_data.py output folder)")
    if micro_batch_size < 1:
        problems.append(f"--micro_batch_size must be >= 1, got {micro_batch_size}")
    if Path(output_file).is_dir():
        problems.append(f"--output_file {output_file} is a folder; give a file name")
    if problems:
        raise UsageError("\n".join(problems))

    # finetune.py's own check: a complete prepared folder, tokenized with this model's tokenizer.
    data_dir = Path(data_path)
    prepared = check_prepared(data_dir, model)
    scored = {"model": base_fingerprint(model), "data": prepared.fingerprint}
    fingerprint = sha256_json(scored)
    out = Path(output_file)
    previous = read_existing(out)
    if previous is not None and previous.get("fingerprint") == fingerprint:
        print(f"{STAGE}: {out} already holds these scores (eval loss {previous['eval_loss']:.4f}); nothing to do",
              file=sys.stderr)
        print(out.absolute())
        return
    if out.exists() and not overwrite:
        what = "other scores" if previous is not None else "a file this script did not write"
        raise SuiteError(f"--output_file {out} holds {what}; pass --overwrite to replace it")

    rows = prepared_rows(data_dir, "validation").get("validation")
    if not rows:
        raise SuiteError(f"--data_path {data_dir} has no validation split (prepare it with --val_set_size > 0)")
    scores = evaluate(load_base_model(model), rows, micro_batch_size, n_virtual=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"stage": STAGE, "fingerprint": fingerprint, **scores, "validation_rows": len(rows),
                     "model_path": model, "data_path": str(data_dir), **scored})
    print(f"{STAGE}: {model} on {len(rows)} validation rows of {data_dir}: eval loss {scores['eval_loss']:.4f}, "
          f"token accuracy {scores['eval_token_accuracy']:.4f}", file=sys.stderr)
    print(out.absolute())


def read_existing(path: Path) -> dict | None:
    """The scores an earlier run of this script wrote to ``path``, or None (missing, or not ours)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("stage") == STAGE else None


if __name__ == "__main__":
    run(main)
