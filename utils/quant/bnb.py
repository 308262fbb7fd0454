"""Pre-quantized bitsandbytes folders (``quantize.py --method bnb_nf4|bnb_fp4|bnb_int8``) that load on the CPU.

``write_bnb`` quantizes a floating-point model folder exactly as ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`` does at load time (it *is* that call, on the CPU) and saves the
result with ``save_pretrained``: per quantized linear layer ``name`` the safetensors hold

* 4-bit (nf4 / fp4, QLoRA): ``name.weight`` uint8 [out * in / 2, 1] (two codes a byte), ``name.weight.absmax``
  (one scale per block of 64 weights: float32, or uint8 codes with double quantization, whose own
  ``weight.nested_absmax`` float32 per 256 blocks and ``weight.nested_quant_map`` [256] travel along),
  ``name.weight.quant_map`` [16] and ``name.weight.quant_state.bitsandbytes__nf4|fp4`` (the rest of the quant
  state as a JSON blob);
* int8 (LLM.int8()): ``name.weight`` int8 [out, in], ``name.SCB`` float32 [out] (the row absmax) and
  ``name.weight_format``;

and ``config.json`` carries ``quantization_config`` (``quant_method: "bitsandbytes"``, ``llm_int8_skip_modules``
naming every linear layer kept in floating point), so transformers re-creates the same layers from it alone.

``load_bnb_folder`` is how such a folder loads: ``AutoModelForCausalLM.from_pretrained(folder, device_map={"":
device})`` (no quantization_config: the folder's own is read; the explicit placement because transformers 5.23's
bitsandbytes quantizers otherwise move the model to the first CUDA device whenever one exists), then
``keep_bnb_cpu_layout`` for 4-bit. bitsandbytes 0.50.2 runs 4-bit layers on a CPU with AVX512-BF16 through a
packed kernel that asserts ``N must be divisible by block_n`` on an output width that is not a multiple of 32
(stories260K's 172-wide ``gate/up_proj``; its ``down_proj``, 172 inputs, is not a whole number of 64-blocks
either); the guard keeps those layers on the generic path, and ``cpu_generic_layers`` names them.

Traps (bitsandbytes 0.50.2, CPU with AVX512-BF16):

* The packed kernel converts a layer's storage in place on its first forward pass in eval mode without gradients
  (codes repacked, block scales turned into bfloat16, double quantization undone), and converting back — which
  ``save_pretrained`` does — rounds the scales through bfloat16 and re-quantizes double-quantized ones with a new
  offset: lossy, with or without double quantization. So a model is saved before any forward pass, never after
  (``write_bnb`` does); a folder saved after one no longer equals quantizing on load. For the same reason a
  layer's ``quant_state`` (``nested``, ``absmax``) is only what was stored until the first forward pass.
* The packed kernel computes in bfloat16 whatever ``compute_dtype`` says; the layers on the generic path compute
  in ``compute_dtype``.
* int8: the first forward pass moves a layer's ``weight.SCB`` to ``layer.state.SCB`` (``save_pretrained`` still
  finds it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from utils.weights.pretrained import keep_bnb_cpu_layout

KINDS = ("nf4", "fp4", "int8")
# Why a linear layer stays in floating point (report values).
KEPT_HEAD = "output head: never quantized"
KEPT_OUTSIDE = "outside the decoder blocks"
KEPT_UNSELECTED = "not among the selected modules"
KEPT_BY_MODEL = "kept in floating point by the model itself (its _keep_in_fp32_modules)"


class BnbError(ValueError):
    """A bitsandbytes run that cannot be done as asked: named by flag, layer or file."""


def bnb_quantization_config(kind: str, *, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                            skip_modules: list[str] | None = None):
    """The ``BitsAndBytesConfig`` of ``kind`` ("nf4" / "fp4": 4-bit, optionally double-quantized; "int8":
    LLM.int8() with its default outlier threshold 6.0). ``skip_modules`` becomes ``llm_int8_skip_modules`` (for
    both widths, despite the name): full module names kept in floating point. When it is given, transformers adds
    none of its own (the output head, tied weights), so it must name those too.

    Raises:
        BnbError: an unknown kind.
    """
    from transformers import BitsAndBytesConfig

    if kind not in KINDS:
        raise BnbError(f"bitsandbytes kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def require_bitsandbytes() -> None:
    """Raises BnbError (with the import's own message) when bitsandbytes cannot be imported."""
    import importlib

    try:
        importlib.import_module("bitsandbytes")
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        raise BnbError(f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc}); "
                       "pip install 'bitsandbytes>=0.49' (its CPU backend)") from None


def _placement(device: str | torch.device) -> dict:
    """from_pretrained's device_map for one device ("cuda" means the first GPU)."""
    target = str(device)
    return {"": 0 if target == "cuda" else target}


def _is_convertible(module) -> bool:
    """What transformers' ``replace_with_bnb_linear`` swaps for a bitsandbytes layer: exactly ``nn.Linear`` (not a
    subclass) or GPT-2's Conv1D."""
    return type(module) is torch.nn.Linear or type(module).__name__ == "Conv1D"


def _is_bnb_layer(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def plan_layers(model, modules: set[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(layers to quantize, {layer kept in floating point: why}) over every linear layer transformers could
    convert. ``model`` may live on the meta device. Quantized by default: every linear layer of the decoder blocks;
    never: the output head (and any layer tied to an embedding).

    Raises:
        BnbError: a name in ``modules`` that is not a convertible linear layer of the decoder blocks.
    """
    from utils.quant.calibrate import decoder_blocks

    convertible = {name for name, m in model.named_modules() if _is_convertible(m)}
    head = model.get_output_embeddings()
    heads = {name for name, m in model.named_modules() if head is not None and m is head}
    heads |= {key.removesuffix(".weight") for pair in getattr(model, "all_tied_weights_keys", {}).items()
              for key in pair}
    prefix, blocks = decoder_blocks(model)
    inside = {f"{prefix}.{b}.{n}" for b, block in enumerate(blocks) for n, m in block.named_modules()
              if _is_convertible(m)} - heads  # GPT-2's Conv1D included, as transformers converts it
    if modules is not None:
        wrong = sorted(set(modules) - inside)
        if wrong:
            what = "is not a linear layer" if len(wrong) == 1 else "are not linear layers"
            raise BnbError(f"modules: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} {what} of the "
                           f"decoder blocks ({prefix}.N.*) that bitsandbytes can quantize"
                           + ("; the output head is never quantized" if set(wrong) & heads else ""))
    chosen = sorted(inside if modules is None else set(modules))
    if not chosen:
        raise BnbError(f"{type(model).__name__}: no linear layer in its decoder blocks ({prefix}.N.*) that "
                       "bitsandbytes can quantize" if modules is None else "modules: none given")
    kept = {name: KEPT_HEAD if name in heads else KEPT_OUTSIDE if name not in inside else KEPT_UNSELECTED
            for name in sorted(convertible - set(chosen))}
    return chosen, kept


def _meta_model(folder: str | Path, trust_remote_code: bool):
    """The folder's model built from its config on the meta device: names and shapes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def quantize_on_load(fp_folder: str | Path, kind: str, *, double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.float32, modules: set[str] | None = None,
                     device: str = "cpu", dtype: str | torch.dtype = "auto", trust_remote_code: bool = False):
    """``fp_folder``'s model quantized by transformers while it loads (what ``--load_4bit`` does), with the skip
    list of ``plan_layers``; returns (model, quantized layer names, {kept layer: why}). The model has not run: see
    the module's docstring for why that matters before ``save_pretrained``.

    Raises:
        BnbError: bitsandbytes missing, a folder without safetensors, a bad ``modules`` name, or layers that came
            out other than planned.
    """
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    folder = Path(fp_folder)
    if not any(folder.glob("*.safetensors")):
        raise BnbError(f"{folder}: no safetensors weights (write the floating-point model with "
                       "save_pretrained(safe_serialization=True))")
    chosen, kept = plan_layers(_meta_model(folder, trust_remote_code), modules)
    config = bnb_quantization_config(kind, double_quant=double_quant, compute_dtype=compute_dtype,
                                     skip_modules=sorted(kept))
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=config, dtype=dtype, device_map=_placement(device),
        local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code)
    model.eval()
    done = {name for name, m in model.named_modules() if _is_bnb_layer(m)}
    missing = [name for name in chosen if name not in done]
    if missing and modules is not None:
        raise BnbError(f"modules: transformers kept {', '.join(missing[:5])} in floating point; they cannot be "
                       "quantized by bitsandbytes on this model")
    kept.update({name: KEPT_BY_MODEL for name in missing})
    extra = sorted(done - set(chosen))
    if extra:  # llm_int8_skip_modules matched differently than planned: a transformers change
        raise BnbError(f"transformers quantized {', '.join(extra[:5])}, which llm_int8_skip_modules names")
    return model, sorted(done), dict(sorted(kept.items()))


def cpu_generic_layers(model) -> list[str]:
    """The 4-bit layers that ``keep_bnb_cpu_layout`` keeps off bitsandbytes' packed CPU kernel, whatever this CPU
    is, found by asking the guard itself (not by a run failing): each layer is marked as eligible for the packed
    path, the guard runs, the ones it turned off are noted, and every layer's own flag is put back."""
    import bitsandbytes as bnb

    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    saved = {name: getattr(m, "support_avx512bf16_for_cpu", False) for name, m in layers.items()}
    try:
        for m in layers.values():
            m.support_avx512bf16_for_cpu = True
        keep_bnb_cpu_layout(model)
        return sorted(name for name, m in layers.items() if not m.support_avx512bf16_for_cpu)
    finally:
        for name, m in layers.items():
            m.support_avx512bf16_for_cpu = saved[name]


def _dequantized(module) -> torch.Tensor:
    """A bitsandbytes layer's weight as float32 [out, in] (before any forward pass: unpacked storage)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    if isinstance(module, bnb.nn.Linear4bit):
        return bf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    # LLM.int8(): symmetric per output row, weight = code * SCB / 127 (SCB moves to .state on a first forward)
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    return module.weight.data.float() * (scb.float()[:, None] / 127.0)


def weight_errors(model, fp_folder: str | Path, names: list[str]) -> dict[str, float]:
    """‖W − Ŵ‖ / ‖W‖ (Frobenius) of each quantized layer against ``fp_folder``'s weight, read one tensor at a
    time. A weight error, not the output error on calibration inputs: bitsandbytes quantizes without data."""
    from utils.weights.shards import ModelWeights

    weights = ModelWeights(str(fp_folder))
    errors = {}
    for name in names:
        if f"{name}.weight" not in weights:
            raise BnbError(f"{fp_folder}: no tensor {name}.weight, though the model has layer {name}")
        module = model.get_submodule(name)
        w, q = weights.get(f"{name}.weight").float(), _dequantized(module).cpu()
        if getattr(getattr(module, "source_cls", None), "__name__", "") == "Conv1D":  # stored [in, out]
            w = w.T
        errors[name] = float((w - q).norm() / w.norm().clamp_min(1e-30))
    return errors


def _stored(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in ``folder``'s top-level safetensors, by name (from the headers alone)."""
    from utils.weights.shards import read_header

    sizes: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        entries, _ = read_header(path)
        sizes.update({name: e.nbytes for name, e in entries.items()})
    return sizes


def write_bnb(fp_folder: str | Path, out_folder: str | Path, kind: str, *, double_quant: bool = True,
              compute_dtype: torch.dtype = torch.float32, modules: set[str] | None = None,
              max_shard_size: str | int = "2GB", dtype: str | torch.dtype = "auto",
              trust_remote_code: bool = False) -> dict:
    """Quantize ``fp_folder`` with bitsandbytes on the CPU and save it pre-quantized into ``out_folder``.

    Args:
        fp_folder: a Hugging Face model folder with safetensors weights (the merged model).
        out_folder: where ``save_pretrained`` writes (created if need be; may hold other files, e.g. the
            scratch copy of the input; it must not be ``fp_folder``).
        kind: "nf4" / "fp4" (4-bit) or "int8" (LLM.int8()).
        double_quant: 4-bit: quantize the block scales too (about 0.37 fewer bits per weight).
        compute_dtype: 4-bit: the dtype the layers compute in (stored in the config).
        modules: full names of the decoder-block linear layers to quantize (None: all of them); every other
            linear layer is kept in floating point through ``llm_int8_skip_modules``. The output head and the
            embeddings are never quantized.
        max_shard_size: ``save_pretrained``'s shard size.
        dtype: of the tensors kept in floating point ("auto": as ``fp_folder`` stores them).

    Returns:
        The report: ``quant_type``, ``bits``, ``double_quant`` / ``compute_dtype`` (4-bit), ``layers_quantized``
        and ``layers_kept`` (counts), ``quantized`` (names), ``kept`` ({name: why}), ``cpu_generic_path`` (the
        4-bit layers ``keep_bnb_cpu_layout`` keeps off the packed CPU kernel when the folder loads),
        ``layers`` (per linear layer: name, [out, in], weight relative error or None, why kept or None, whether on
        the generic CPU path), ``bits_per_weight`` (every stored byte of the quantized layers' weights, scales and
        quantization maps included, per weight), ``size_on_disk_bytes`` (the safetensors written) and ``files``.

    Raises:
        BnbError: see ``quantize_on_load``; also ``out_folder`` equal to ``fp_folder``.
    """
    src, out = Path(fp_folder), Path(out_folder)
    if out.resolve() == src.resolve():
        raise BnbError(f"{out}: the output folder is the input folder; write elsewhere")
    model, quantized, kept = quantize_on_load(src, kind, double_quant=double_quant, compute_dtype=compute_dtype,
                                              modules=modules, dtype=dtype, trust_remote_code=trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    # Saved first: a forward pass before this would change what is saved (the module docstring's trap).
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    generic = cpu_generic_layers(model) if kind != "int8" else []
    errors = weight_errors(model, src, quantized)
    shapes = {name: [m.out_features, m.in_features] if hasattr(m, "out_features") else list(m.weight.shape)[::-1]
              for name, m in model.named_modules() if name in set(quantized) | set(kept)}  # (else: Conv1D [in, out])
    sizes = _stored(out)
    quantized_set = set(quantized)
    stored = sum(size for key, size in sizes.items() if _owner(key, quantized_set))
    weights = sum(math.prod(shapes[name]) for name in quantized)
    files = sorted(f.name for f in out.iterdir() if f.is_file() and (f.suffix == ".safetensors" or f.name in (
        "config.json", "generation_config.json", "model.safetensors.index.json")))
    return {
        "quant_type": kind, "bits": 8 if kind == "int8" else 4,
        **({"double_quant": double_quant, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
           if kind != "int8" else {}),
        "layers_quantized": len(quantized), "layers_kept": len(kept), "quantized": quantized, "kept": kept,
        "cpu_generic_path": generic,
        "layers": [{"name": name, "shape": shapes[name], "weight_relative_error": errors.get(name),
                    "kept": kept.get(name), "cpu_generic_path": name in generic}
                   for name in sorted(quantized_set | set(kept))],
        "bits_per_weight": 8 * stored / weights if weights else None,
        "size_on_disk_bytes": sum((out / f).stat().st_size for f in files if f.endswith(".safetensors")),
        "files": files,
    }


def _owner(key: str, layers: set[str]) -> bool:
    """Whether stored tensor ``key`` is part of a quantized layer's weight: ``L.weight``, ``L.weight.<quant state>``
    (4-bit) or ``L.SCB`` / ``L.weight_format`` (int8) — not its bias."""
    if key.endswith((".weight", ".SCB", ".weight_format")):
        return key.rsplit(".", 1)[0] in layers
    head, sep, _ = key.rpartition(".weight.")
    return bool(sep) and head in layers


def load_bnb_folder(folder: str | Path, device: str = "cpu", dtype: str | torch.dtype = torch.float32,
                    trust_remote_code: bool = False) -> Any:
    """A folder ``write_bnb`` (or any ``save_pretrained`` of a bitsandbytes model) wrote, loaded for inference.

    What transformers 5.23 needs: ``AutoModelForCausalLM.from_pretrained(folder, device_map={"": device})`` and
    nothing else. The folder's ``quantization_config`` is read from ``config.json`` (pass none: a second one is
    merged with a warning); its ``llm_int8_skip_modules`` decides which layers stay floating point. The explicit
    ``device_map`` matters: without it the bitsandbytes quantizers pick the first CUDA device whenever one exists.
    Then 4-bit layers whose widths the packed CPU kernel cannot take are kept on the generic path
    (``keep_bnb_cpu_layout``; see ``cpu_generic_layers``). int8 needs no guard.

    Args:
        folder: the pre-quantized folder.
        device: "cpu", "cuda" (the first GPU) or "cuda:N".
        dtype: of the tensors kept in floating point (embeddings, norms, the output head).
    """
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map=_placement(device), local_files_only=True, use_safetensors=True,
        trust_remote_code=trust_remote_code)
    if getattr(model, "is_loaded_in_4bit", False):
        keep_bnb_cpu_layout(model)
    return model.eval()
