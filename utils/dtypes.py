"""The one table of dtypes: the suite's names (fp32 / bf16 / fp16, as flags spell them), the names
config.json uses, torch's dtypes, and safetensors' codes with their sizes."""

from __future__ import annotations

from utils.errors import SuiteError

# The suite's dtype names, as every --dtype flag spells them.
NAMES = ("fp32", "bf16", "fp16")


CONFIG_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


FROM_CONFIG_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


SAFETENSORS_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


def torch_dtype(code: str):
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[code][0])


def dtype_code(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for code, (n, _) in SAFETENSORS_DTYPES.items():
        if n == name:
            return code
    raise SuiteError(f"dtype {dtype} cannot be stored in safetensors")


def dtype_size(code: str) -> int:
    return SAFETENSORS_DTYPES[code][1]


def torch_dtype_of(name: str):
    """torch's dtype for one of the suite's names (fp32 / bf16 / fp16)."""
    import torch

    return getattr(torch, CONFIG_NAMES[name])


def name_of(dtype) -> str:
    """The suite's name (fp32 / bf16 / fp16) of a torch dtype."""
    name = FROM_CONFIG_NAME.get(str(dtype).replace("torch.", ""))
    if name is None:
        raise SuiteError(f"dtype {dtype} is not one of {', '.join(NAMES)}")
    return name
