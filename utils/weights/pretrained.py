"""Loading a local pretrained model folder into transformers, safely (safetensors unless allowed,
custom code only by flag, never the Hub), optionally quantized through bitsandbytes (QLoRA), or already quantized
by bitsandbytes (a pre-quantized folder). The suite's other quantized folders (GPTQ, the seeds' row-wise and
group-wise formats) are not transformers' to load: ``load_base_model`` refuses them, naming the loaders that read
them (``utils.quant.adapters.load_quantized_base`` for training, the shared inference loader otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

from utils.dtypes import torch_dtype_of
from utils.errors import SuiteError
from utils.weights.folders import needs_remote_code

#: ``quant_method`` values of quantized folders that only the suite's own loaders read
#: (``utils.quant.checkpoint.QUANTIZED_FORMATS`` but bitsandbytes, which transformers reads itself).
SUITE_QUANTIZED = ("gptq", "chatglm_rowwise", "llmzoo_groupwise")


def stored_quantization(path: str) -> str | None:
    """The ``quant_method`` of a folder's ``config.json`` ``quantization_config`` (lower case), ``"gptq"`` for an
    AutoGPTQ folder that has only a ``quantize_config.json``, or None (not quantized, or no readable config)."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict):
        return str(quant.get("quant_method", "")).lower() or None
    return "gptq" if (folder / "quantize_config.json").is_file() else None


def load_base_model(path: str, *, dtype: str = "fp32", trust_remote_code: bool = False,
                    allow_pickle_weights: bool = False, device: str = "cpu", quantization: dict | None = None):
    """Load a local causal LM. ``quantization`` ({bits, quant_type, double_quant, compute_dtype}) loads the
    frozen base through bitsandbytes (QLoRA). A folder already quantized by bitsandbytes loads as stored (its own
    quantization config; ``quantization`` must then be None).

    Raises:
        SuiteError: custom code without ``trust_remote_code``; a GPTQ or seed-quantized folder
            (``SUITE_QUANTIZED``); ``quantization`` for a folder already quantized by bitsandbytes.
    """
    from transformers import AutoModelForCausalLM

    if needs_remote_code(path) and not trust_remote_code:
        raise SuiteError(f"--base_model {path} needs custom code (auto_map in config.json); pass "
                         "--trust_remote_code if you trust it")
    stored = stored_quantization(path)
    if stored in SUITE_QUANTIZED:
        raise SuiteError(f"--base_model {path} is a {stored} quantized folder, which transformers does not load by "
                         "itself: it loads through utils.quant.adapters.load_quantized_base (training; finetune.py "
                         "does this) or utils.inference.loading (inference)")
    if stored == "bitsandbytes" and quantization is not None:
        raise SuiteError(f"--base_model {path} is already quantized by bitsandbytes; it loads with its own "
                         "quantization, not a second one")
    torch_dtype = torch_dtype_of(dtype)
    kwargs = {}
    if quantization is not None:
        kwargs = {"quantization_config": bnb_config(quantization, torch_dtype), "device_map": {"": device}}
    elif stored == "bitsandbytes":
        # Placed explicitly: without a device_map transformers' bitsandbytes quantizers pick the first CUDA device.
        kwargs = {"device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True,
        use_safetensors=not allow_pickle_weights, **kwargs,
    )
    if not kwargs and device != "cpu":
        model.to(device)
    if kwargs:
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


def bnb_config(quantization: dict, compute_dtype):
    """The transformers config of ``quantization`` ({bits, quant_type, double_quant}; see load_base_model)."""
    from transformers import BitsAndBytesConfig

    if quantization["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization["quant_type"],
                              bnb_4bit_use_double_quant=quantization["double_quant"],
                              bnb_4bit_compute_dtype=compute_dtype)
