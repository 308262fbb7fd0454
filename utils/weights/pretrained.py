"""Loading a local pretrained model folder into transformers, safely (safetensors unless allowed,
custom code only by flag, never the Hub), optionally quantized through bitsandbytes (QLoRA)."""

from __future__ import annotations

from utils.dtypes import torch_dtype_of
from utils.errors import SuiteError
from utils.weights.folders import needs_remote_code


def load_base_model(path: str, *, dtype: str = "fp32", trust_remote_code: bool = False,
                    allow_pickle_weights: bool = False, device: str = "cpu", quantization: dict | None = None):
    """Load a local causal LM. ``quantization`` ({bits, quant_type, double_quant, compute_dtype}) loads the
    frozen base through bitsandbytes (QLoRA)."""
    from transformers import AutoModelForCausalLM

    if needs_remote_code(path) and not trust_remote_code:
        raise SuiteError(f"--base_model {path} needs custom code (auto_map in config.json); pass "
                         "--trust_remote_code if you trust it")
    torch_dtype = torch_dtype_of(dtype)
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


def bnb_config(quantization: dict, compute_dtype):
    """The transformers config of ``quantization`` ({bits, quant_type, double_quant}; see load_base_model)."""
    from transformers import BitsAndBytesConfig

    if quantization["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization["quant_type"],
                              bnb_4bit_use_double_quant=quantization["double_quant"],
                              bnb_4bit_compute_dtype=compute_dtype)
