"""Loading base models safely, finding their linear layers, and the tuning-method registry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from utils.cli import SuiteError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# A Hub id as people paste it: "owner/name", no path prefix, no extension.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.fullmatch(path)) and not path.startswith(".") and not path.endswith((".json", ".jsonl"))


def missing_folder(path: str, flag: str) -> str:
    """The message for a model folder that does not exist; a Hub id is told that nothing is ever downloaded."""
    if looks_like_hub_id(path):
        return (f"{flag} {path}: no such folder. It looks like a Hugging Face Hub id, but this suite never downloads "
                f"anything: download it yourself (e.g. hf download {path} --local-dir DIR) and pass "
                "the local folder")
    return f"{flag} {path}: no such folder (models are never downloaded)"


def safetensors_problem(file: str | Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone (None when it is whole): missing, unreadable,
    not safetensors, or shorter than its header says (a copy or download that was cut off)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, 100 * 2**20):
                return f"{file.name} is not a safetensors file (or is truncated: {size} bytes)"
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        return f"{file.name} is missing"
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return f"{file.name} has a damaged header (not a safetensors file, or truncated)"
    if not isinstance(header, dict):
        return f"{file.name} has a damaged header (not a safetensors file)"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return (f"{file.name} is truncated: {size:,} bytes, its header needs {need:,} (an interrupted copy or "
                "download?)")
    return None


def tokenizer_problems(path: str, flag: str = "--base_model") -> list[str]:
    """A folder without tokenizer files (as export_state_dict.py writes for a llama2.c file imported without
    --tokenizer): the same message as prepare_data.py, before anything heavy is loaded."""
    p = Path(path)
    vocab = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
    if any((p / f).is_file() for f in vocab) or any(p.glob("*.tiktoken")):
        return []
    cfg = p / "tokenizer_config.json"
    if cfg.is_file():
        try:
            if "auto_map" in json.loads(cfg.read_text(encoding="utf-8")):
                return []  # custom tokenizer code brings its own vocabulary files (checked when it loads)
        except (OSError, ValueError):
            return [f"{flag} {path}: tokenizer_config.json is not valid JSON"]
    return [f"{flag} {path}: no tokenizer files (tokenizer.json / tokenizer_config.json); copy them from the model "
            "it came from (export_state_dict.py imports them with --tokenizer DIR)"]


def check_model_dir(path: str, allow_pickle: bool = False, flag: str = "--base_model") -> list[str]:
    """Problems with a local model folder (empty list if it is usable): missing folder, config.json or weights,
    and safetensors files that are damaged or shorter than their headers say (checked from the headers alone)."""
    p = Path(path)
    if not p.is_dir():
        return [missing_folder(path, flag)]
    if not (p / "config.json").is_file():
        return [f"{flag} {path}: no config.json (not a model folder)"]
    try:
        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"{flag} {path}: config.json is not valid JSON"]
    index = p / SAFE_WEIGHTS[1]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{flag} {path}: {SAFE_WEIGHTS[1]} is damaged (no readable weight_map)"]
        bad = [why for why in (safetensors_problem(p / s) for s in shards) if why]
        return [f"{flag} {path}: {why}" for why in bad]
    if (p / SAFE_WEIGHTS[0]).is_file():
        why = safetensors_problem(p / SAFE_WEIGHTS[0])
        return [f"{flag} {path}: {why}"] if why else []
    if any((p / f).is_file() for f in PICKLE_WEIGHTS):
        if allow_pickle:
            return []
        return [f"{flag} {path}: only pickle weights (pytorch_model.bin); pass --allow_pickle_weights to load "
                "them with torch.load(weights_only=True), or convert to safetensors"]
    return [f"{flag} {path}: no weights (model.safetensors)"]


def needs_remote_code(path: str) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "auto_map" in config


def load_base_model(path: str, *, dtype: str = "fp32", trust_remote_code: bool = False,
                    allow_pickle_weights: bool = False, device: str = "cpu", quantization: dict | None = None):
    """Load a local causal LM. ``quantization`` ({bits, quant_type, double_quant, compute_dtype}) loads the
    frozen base through bitsandbytes (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    if needs_remote_code(path) and not trust_remote_code:
        raise SuiteError(f"--base_model {path} needs custom code (auto_map in config.json); pass "
                         "--trust_remote_code if you trust it")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    kwargs = {}
    if quantization is not None:
        kwargs = {"quantization_config": bnb_config(quantization, torch_dtype), "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True,
        use_safetensors=not allow_pickle_weights, **kwargs,
    )
    if quantization is None and device != "cpu":
        model.to(device)
    if quantization is not None:
        keep_bnb_cpu_layout(model)
    return model


# bitsandbytes' CPU kernel for 4-bit inference (used when the CPU has AVX512-BF16, in eval mode without
# gradients) repacks weights in blocks of this many output rows and whole quantization blocks per input row,
# and asserts on any other shape.
BNB_CPU_BLOCK_N = 32


def keep_bnb_cpu_layout(model) -> int:
    """Keep 4-bit layers whose shape bitsandbytes' packed CPU inference path cannot take (output width not a
    multiple of ``BNB_CPU_BLOCK_N``, or input width not a multiple of the quantization block) off it: it would
    fail on the first evaluation ("N must be divisible by block_n", e.g. stories260K's 172-wide MLP). They
    compute through the generic 4-bit path instead. Returns how many layers that is."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearFP4", "LinearNF4"):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", None) or \
            getattr(module.weight, "blocksize", 64)
        if module.out_features % BNB_CPU_BLOCK_N or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def bnb_config(q: dict, compute_dtype):
    from transformers import BitsAndBytesConfig

    if q["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q["quant_type"],
                              bnb_4bit_use_double_quant=q["double_quant"], bnb_4bit_compute_dtype=compute_dtype)


def check_packing(model, device: str = "cpu") -> None:
    """Refuse --packing for an architecture whose attention would leak across packed examples: two
    short random sequences must give the same logits packed into one row as run separately."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, vocab, (n,), generator=gen) for n in (5, 7))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=x[None].to(device), use_cache=False).logits[0].float() for x in (a, b)]
        positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
        packed = model(input_ids=torch.cat([a, b])[None].to(device), position_ids=positions,
                       use_cache=False).logits[0].float()
    model.train(was_training)
    scale = max(float(torch.cat(alone).abs().max()), 1.0)
    err = float(torch.cat([(packed[:5] - alone[0]).abs().flatten(), (packed[5:] - alone[1]).abs().flatten()]).max())
    if not err <= 1e-3 * scale:
        raise SuiteError(f"--packing: this model's architecture ({type(model).__name__}) lets packed examples attend "
                         f"to each other (logit difference {err:.3g}); train without --packing")


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's linear layers (nn.Linear and GPT-2's Conv1D), output head excluded."""
    import torch

    head = model.get_output_embeddings()
    names = set()
    for full, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if is_linear and module is not head:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(a: dict, model) -> Any:
    from peft import LoraConfig, TaskType

    targets = a["lora_target_modules"]
    available = linear_module_names(model)
    if targets in (["all-linear"], ["all_linear"]):
        targets = available
    missing = [t for t in targets if t not in available]
    if missing:
        raise SuiteError(f"--lora_target_modules: the model has no linear layer named {', '.join(missing)}; "
                         f"its linear layers are: {', '.join(available)} (or use all-linear)")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=a["lora_r"], lora_alpha=a["lora_alpha"],
                      lora_dropout=a["lora_dropout"], target_modules=targets, use_rslora=a["use_rslora"],
                      use_dora=a["use_dora"])


def prefix_config(a: dict, model) -> Any:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=a["num_virtual_tokens"],
                              prefix_projection=a["prefix_projection"],
                              encoder_hidden_size=a["encoder_hidden_size"] or model.config.hidden_size)


def ptuning_config(a: dict, model) -> Any:
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=a["num_virtual_tokens"],
                               encoder_hidden_size=a["encoder_hidden_size"] or model.config.hidden_size)


def prompt_config(a: dict, model) -> Any:
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=a["num_virtual_tokens"])


# --method -> builder of its peft config (None: every weight is trained)
METHODS: dict[str, Callable[[dict, Any], Any] | None] = {
    "lora": lora_config,
    "qlora": lora_config,  # on a base loaded through bitsandbytes (load_base_model's quantization)
    "prefix": prefix_config,
    "ptuning": ptuning_config,
    "prompt": prompt_config,
    "full": None,
}


def prepare_model(model, method: str, args: dict):
    """Wrap ``model`` for ``method``; returns the model whose trainable parameters are the ones to train."""
    builder = METHODS[method]
    if builder is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and makes the (frozen, quantized) inputs carry gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.get("gradient_checkpointing",
                                                                                           False))
    return get_peft_model(model, builder(args, model))


def trainable_state(model) -> dict:
    """The trained parameters by name (what a checkpoint must hold to resume)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
