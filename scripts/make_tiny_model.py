"""Build a small randomly initialised Llama locally, for experiments of your own (nothing is downloaded).

A random model learns nothing worth showing in a few minutes: the demo (scripts/pipeline.sh) starts
from the pretrained stories260K instead.

The tokenizer is copied from ``--tokenizer`` (a local folder, e.g. stories260K's); the architecture
comes from the flags. Written atomically with a ``pipeline.json``; re-running with the same
arguments is a no-op.

Example:
    python scripts/make_tiny_model.py --output_dir runs/tiny --tokenizer ../shared/models/stories260K/hf
"""

from __future__ import annotations

import sys
from pathlib import Path

# Scripts outside the repository root put it on the path (run as `python scripts/NAME.py` from anywhere).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.artifacts import Output, sha256_json, tokenizer_fingerprint  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import SuiteError  # noqa: E402


def main(
    output_dir: str,
    tokenizer: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 192,
    max_position_embeddings: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Create a tiny Llama model folder (config, safetensors weights, tokenizer).

    Args:
        output_dir: Folder to write.
        tokenizer: Local folder holding the tokenizer to copy.
        hidden_size: Model width.
        num_layers: Decoder layers.
        num_heads: Attention heads (must divide hidden_size).
        num_kv_heads: Key/value heads (must divide num_heads).
        intermediate_size: MLP width.
        max_position_embeddings: Context length.
        seed: Seed of the random initialisation.
        overwrite: Replace an output_dir holding a different model.
    """
    args = dict(locals())
    problems = []
    if not Path(tokenizer).is_dir():
        problems.append(f"--tokenizer {tokenizer}: no such folder")
    if hidden_size % num_heads:
        problems.append(f"--num_heads {num_heads} must divide --hidden_size {hidden_size}")
    if num_heads % num_kv_heads:
        problems.append(f"--num_kv_heads {num_kv_heads} must divide --num_heads {num_heads}")
    if problems:
        raise SuiteError("\n".join(problems))

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Output(output_dir, "make_tiny_model", overwrite)
    fingerprint = sha256_json({k: v for k, v in args.items() if k not in ("output_dir", "tokenizer", "overwrite")}
                              | {"tokenizer": tokenizer_fingerprint(tokenizer)})
    if out.up_to_date(fingerprint):
        print(f"make_tiny_model: {output_dir} already holds this model; nothing to do", file=sys.stderr)
        print(Path(output_dir).absolute())
        return
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    with out.produce(fingerprint, args=args, parameters=n_params) as st:
        model.save_pretrained(str(st.dir), safe_serialization=True)
        tok.save_pretrained(str(st.dir))
    print(f"make_tiny_model: {n_params:,} parameters -> {output_dir}", file=sys.stderr)
    print(Path(output_dir).absolute())


if __name__ == "__main__":
    run(main)
