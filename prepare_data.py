"""Data stage: instruction and conversation files to a tokenized, correctly masked training set.

Reads alpaca, ShareGPT/Phoenix, OpenAI ``messages``, MOSS and ChatGLM prompt/response(/history) data
(JSON or JSONL, several files may be mixed), renders every example with a prompt or conversation
template, tokenizes it once with the base model's tokenizer and labels each token from the template's
spans. Writes a folder that ``finetune.py`` reads by path:

    OUTPUT_DIR/dataset/{train,validation}   tokenized rows (input_ids, labels, length, source, line)
    OUTPUT_DIR/template.json                the full template used
    OUTPUT_DIR/tokenizer/                   the tokenizer used
    OUTPUT_DIR/data_report.json             row outcomes, bad rows by category with file:line,
                                            length histogram, trained-token ratio per source
    OUTPUT_DIR/pipeline.json                resolved arguments, input hashes, fingerprint (written last)

Examples:
    python prepare_data.py --base_model ../shared/models/stories260K/hf \\
        --data_path ../shared/data/alpaca/gsm8k_train.json --output_dir runs/gsm8k --inspect 2
    python prepare_data.py --base_model MODEL --data_path AdvertiseGen/train.json --output_dir runs/adgen \\
        --prompt_column content --response_column summary
    python prepare_data.py --base_model MODEL --data_path moss.jsonl --output_dir runs/moss --mask_mode moss
"""

from __future__ import annotations

import os
from typing import Literal

from utils.cli import run
from utils.data.prepare import PrepareArgs, fingerprint, prepare_dataset

__all__ = ["Args", "PrepareArgs", "fingerprint", "main", "prepare_dataset"]

Args = PrepareArgs


def main(
    base_model: str,
    data_path: list[str],
    output_dir: str,
    *,
    prompt_template_name: str = "auto",
    data_format: Literal["auto", "alpaca", "sharegpt", "openai", "moss", "pair"] = "auto",
    prompt_column: str = "prompt",
    response_column: str = "response",
    history_column: str = "history",
    cutoff_len: int = 256,
    on_overlength: Literal["truncate", "drop", "error"] = "truncate",
    train_on_inputs: bool = False,
    mask_mode: Literal["assistant", "moss"] = "assistant",
    val_set_size: float = 0.05,
    seed: int = 42,
    strict: bool = False,
    max_bad_fraction: float = 0.01,
    log_bad_rows: bool = False,
    inspect: int = 0,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> None:
    """Tokenize and mask instruction / conversation data for fine-tuning.

    Args:
        base_model: Local model folder whose tokenizer is used (nothing is downloaded).
        data_path: One or more JSON / JSONL files (``--data_path a.json b.jsonl``); formats may be mixed.
        output_dir: Folder to write; re-running with the same inputs is a no-op.
        prompt_template_name: Built-in template (alpaca, alpaca_legacy, alpaca_short, vigogne, vicuna_v1.1,
            phoenix, moss, chatglm, llama2, chatml, tokenizer) or a path to a template JSON. With ``auto``,
            alpaca for alpaca data, moss for MOSS, chatglm for prompt/response pairs, and for ShareGPT /
            OpenAI conversations the tokenizer's chat_template if it has one, else vicuna_v1.1.
        data_format: Record format of every file; ``auto`` detects it per file from its records.
        prompt_column: ``pair`` format: the prompt field (ADGEN: ``content``).
        response_column: ``pair`` format: the response field (ADGEN: ``summary``).
        history_column: ``pair`` format: field holding earlier ``[query, response]`` pairs, if present.
        cutoff_len: Maximum tokens per example.
        on_overlength: What to do with longer examples: ``truncate`` (at the last whole assistant turn
            that fits, else mid-response; never to zero trained tokens), ``drop`` (counted) or ``error``.
        train_on_inputs: Put loss on every token, prompts included (alpaca-lora's flag; default: only
            responses are trained).
        mask_mode: ``assistant``: loss on assistant turns only. ``moss``: MOSS's recipe, everything
            except the meta instruction and tool-result bodies.
        val_set_size: Validation examples: a count (>= 1), a fraction (< 1), or 0 for none.
        seed: Seed of the train / validation split.
        strict: Stop at the first malformed row (with its file and line) instead of skipping it.
        max_bad_fraction: Fail before writing if more than this fraction of rows are malformed.
        log_bad_rows: Also print the content of malformed rows (off by default: data may be private).
        inspect: Print this many prepared examples with trained and masked tokens told apart.
        trust_remote_code: Allow the tokenizer's custom code from base_model to run.
        overwrite: Replace an output_dir that holds a different prepared dataset.
    """
    args = PrepareArgs.from_flags(dict(locals()))
    prepare_dataset(args)
    print(os.path.abspath(output_dir))  # stdout is the payload: the prepared folder's path


if __name__ == "__main__":
    run(main)
