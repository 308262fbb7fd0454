"""Shared fixtures: real tokenizer and data from ../shared, and tokenizers built locally.

Nothing here downloads anything. ``SHARED`` is the ``shared`` folder beside the repository (CI
clones the repository with it alongside).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K" / "hf"

sys.path.insert(0, str(REPO))

# Under pytest-xdist each worker gets its share of the cores as torch / OpenMP threads, so do the scripts the tests
# start (they inherit the variable). With torch's default (every core in every worker) two workers on two cores
# oversubscribe them and OpenMP's spinning threads wait on each other: a training test measured 15 s alone took
# 100 s beside another worker. A value the user set is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    os.environ.setdefault("MKL_NUM_THREADS", str(_share))

REAL_SETS = {
    "alpaca": DATA / "alpaca" / "gsm8k_train.json",
    "moss": DATA / "moss" / "moss_sft_sample.jsonl",
    "pair": DATA / "chatglm" / "data_sample.jsonl",
    "sharegpt": DATA / "llmzoo" / "phoenix_sharegpt.json",
}

CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def stories_tokenizer():
    """The real stories260K tokenizer: SentencePiece-style, adds BOS, EOS is ``</s>``, 512 pieces."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)


def _corpus() -> list[str]:
    texts = []
    with open(DATA / "tinystories" / "valid_sample.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["text"] for line in f][:200]
    with open(DATA / "chatglm" / "data_sample.jsonl", encoding="utf-8") as f:
        texts += [json.loads(line)["prompt"] + json.loads(line)["response"] for line in f]
    return texts


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained here (GPT-2 style: no BOS, EOS ``<|endoftext|>``), with ChatML
    special tokens and a ChatML ``chat_template``. Saved as a model folder (tokenizer files only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = CHATML_JINJA
    out = tmp_path_factory.mktemp("bpe_tok")
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="session")
def stories_chat_tokenizer_dir(tmp_path_factory) -> Path:
    """stories260K's tokenizer with a ChatML chat_template added (a BOS-adding tokenizer for the
    ``tokenizer`` template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    tok.chat_template = "{{ bos_token }}" + CHATML_JINJA
    out = tmp_path_factory.mktemp("stories_chat")
    tok.save_pretrained(str(out))
    return out


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prepare_gsm8k(root: Path, rows: list[dict], *flags: str) -> Path:
    """Write ``rows`` (alpaca-format GSM8K) under ``root`` and run prepare_data.py on them with stories260K's
    tokenizer; returns the prepared folder."""
    import prepare_data
    from utils.cli import run

    src = root / "gsm8k.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    out = root / "prepared"
    run(prepare_data.main, ["--base_model", str(STORIES), "--data_path", str(src), "--output_dir", str(out), *flags])
    return out


def gsm8k_rows(n: int) -> list[dict]:
    return json.loads(Path(REAL_SETS["alpaca"]).read_text(encoding="utf-8"))[:n]


def interrupt_finetune(cmd: list[str], out: Path, steps: int, signum: int, env: dict,
                       wait: float = 180) -> tuple[int, str]:
    """Start finetune.py ``cmd`` as a subprocess, send ``signum`` once ``out/metrics.jsonl`` holds ``steps``
    lines (as a user pressing Ctrl-C or a scheduler sending SIGTERM mid-run), and return (exit code, stderr)."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + wait
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < steps):
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def pytest_configure(config):
    # The two tiers: `make test-fast` runs what is not marked (the inner loop); `make test` and CI run everything.
    config.addinivalue_line("markers", "slow: a test that trains, runs the demo or resumes a killed run (its "
                                       "docstring says why it cannot be smaller); left out of make test-fast")
    config.addinivalue_line("markers", "multiprocess: starts several processes (torchrun, gloo); left out of "
                                       "make test-fast")


# -- shared builders: tiny models, prepared GSM8K slices, finetune runs ------------------------------------------


def tiny_config(kind: str, *, vocab: int, width: int = 32, intermediate: int | None = None,
                positions: int | None = None, **over):
    """A 2-layer config of architecture ``kind`` (llama, qwen2, gpt2, glm): 4 heads (2 key/value heads where the
    architecture has them), MLP ``intermediate`` wide (2 x width unless given)."""
    from transformers import GlmConfig, GPT2Config, LlamaConfig, Qwen2Config

    if kind == "gpt2":
        pos = {} if positions is None else {"n_positions": positions}
        return GPT2Config(n_embd=width, n_layer=2, n_head=4, vocab_size=vocab, **pos, **over)
    pos = {} if positions is None else {"max_position_embeddings": positions}
    extra = {"head_dim": width // 4} if kind == "glm" else {}
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "glm": GlmConfig}[kind]
    return cls(hidden_size=width, intermediate_size=intermediate or 2 * width, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, **pos, **extra, **over)


def tiny_model(kind: str, folder: Path, tokenizer_dir: Path = STORIES, *, seed: int = 0, shard: str | None = None,
               token_ids: bool = False, **config) -> Path:
    """A tiny randomly initialised model (``tiny_config``) saved in ``folder`` with the tokenizer beside it, its
    vocabulary the tokenizer's. ``token_ids``: take eos / pad (and GPT-2's bos) from the tokenizer;
    ``shard``: save sharded at that size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if token_ids:
        config = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                  **({"bos_token_id": tok.eos_token_id} if kind == "gpt2" else {}), **config}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab=len(tok), **config))
    model.save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(str(folder))
    return folder


def peft_adapters(base: Path, root: Path, virtual: int = 5) -> dict[str, Path]:
    """LoRA (non-zero: a fresh LoRA is zero), prefix and prompt-tuning adapters on ``base``, their trainable
    weights perturbed at random, saved by PEFT's own ``save_pretrained`` under ``root/{lora,prefix,prompt}``."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for name, config in [("lora", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")),
                         ("prefix", PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual)),
                         ("prompt", PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual))]:
        torch.manual_seed(3)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True), config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


# The shapes of the conversion tests' models (sharded at 60KB, so every export handles several shards).
EXPORT_SHAPE = dict(shard="60KB", width=64, intermediate=96, positions=128)


@pytest.fixture(scope="session")
def gsm8k_prepared(tmp_path_factory):
    """``make(n, *prepare_data flags)``: the first ``n`` GSM8K rows prepared with stories260K's tokenizer, once per
    session for each (n, flags) (tests only read it)."""
    made: dict = {}

    def make(n: int, *flags: str) -> Path:
        if (n, flags) not in made:
            made[n, flags] = prepare_gsm8k(tmp_path_factory.mktemp("gsm8k"), gsm8k_rows(n), *flags)
        return made[n, flags]

    return make


def run_finetune(out: Path, data: Path, *flags: str, base: Path = STORIES) -> Path:
    """finetune.py in this process, as its command line would run it; returns ``out``."""
    import finetune
    from utils.cli import run

    run(finetune.main, ["--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), *flags])
    return out
