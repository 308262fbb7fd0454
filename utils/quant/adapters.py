"""Adapters on a quantized base: LoRA on the frozen ``GPTQLinear`` layers of a GPTQ folder (what ``finetune.py
--method qlora`` trains there), the base loaded for training, and an adapter applied to it for inference.

peft 0.21.2 wraps AutoGPTQ's / GPTQModel's ``QuantLinear`` (``tuners/lora/gptq.py``: ``dispatch_gptq`` matches
``gptqmodel``'s ``BaseQuantLinear`` only, and only when gptqmodel is installed), not our ``GPTQLinear``, and its
default dispatcher takes ``nn.Linear`` alone: ``get_peft_model`` would stop with "Target module ... is not
supported". Its supported way to teach it another layer type is ``LoraConfig._register_custom_module({layer type:
LoRA layer type})``: ``LoraModel._create_new_module`` (``tuners/lora/model.py``) tries those mappings before every
built-in dispatcher. ``GPTQLoraLinear`` is that LoRA layer, written as peft's own ``GPTQLoraLinear``: the packed
layer runs unchanged and ``lora_B(lora_A(dropout(x))) * scaling`` is added to its output.

The mapping is an attribute of the config object, not a dataclass field, so ``adapter_config.json`` never holds
it: an adapter trained here is a plain peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.<layer>.lora_A.weight`` as on any base) that applies to the floating-point model the GPTQ
folder was made from as well. Loading it back onto a GPTQ base needs the same registration, which
``attach_adapter`` does before ``PeftModel.from_pretrained``.

The LoRA matrices stay float32 whatever ``--dtype`` the rest of the model has: peft moves an adapter to its base
layer's dtype only when that is a floating-point one, and ``qweight`` is int32 (peft's GPTQ layer does the same).
The input is cast to their dtype and the sum back to the base layer's output dtype.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor

from utils.errors import SuiteError
from utils.quant import checkpoint
from utils.quant.kernels import GPTQLinear

#: Quantized folders (``checkpoint.quantized_format``) that finetune.py trains adapters on: GPTQ layers have a
#: backward for their input (``kernels.GPTQLinear``); a pre-quantized bitsandbytes folder loads as the same layers
#: ``--method qlora`` makes from a floating-point base. The seeds' row-wise / group-wise formats are inference-only.
TRAINABLE_FORMATS = (checkpoint.GPTQ, checkpoint.BITSANDBYTES)
#: The ``init_lora_weights`` values that need no floating-point base weight (PiSSA, OLoRA, LoftQ, ... read it).
_PLAIN_INITS = (True, False, "gaussian")


class GPTQLoraLinear(torch.nn.Module, LoraLayer):
    """LoRA on a frozen ``GPTQLinear``: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` for each active adapter.

    Built by peft (through ``register_gptq_lora``) with the signature of its LoRA layers. Plain LoRA and rsLoRA
    scaling only: DoRA and the other variants rescale or read the base weight, which is packed integers here.
    Merging is refused for the same reason (``merge``).

    Args:
        base_layer: the ``GPTQLinear`` (or a peft layer wrapping one).
        adapter_name: the adapter's name.
        config: the ``LoraConfig``.
        r, lora_alpha: rank and scaling numerator (peft passes the per-layer values of rank / alpha patterns).
        **kwargs: what peft passes to every LoRA layer (``target_name``: the layer's full name, for messages).
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        super().__init__()
        with warnings.catch_warnings():  # peft warns of a layer type it does not list; this class is its support
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            LoraLayer.__init__(self, base_layer)
        self.target_name = kwargs.get("target_name") or type(self.get_base_layer()).__name__
        if config.init_lora_weights not in _PLAIN_INITS:
            raise ValueError(f"{self.target_name}: init_lora_weights={config.init_lora_weights!r} reads the base "
                             "weight, which a GPTQ layer holds as packed integers; use the default initialisation")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        """None (plain LoRA); a variant (DoRA, VeLoRA, aLoRA, ...) is refused, naming the layer."""
        try:
            return super().resolve_lora_variant(config=config, **kwargs)  # {(): None}: any variant raises
        except ValueError:
            raise ValueError(f"{self.target_name}: LoRA variants (DoRA and the like) are not supported on a GPTQ "
                             "layer: they rescale or read the base weight, which is packed integers here; train "
                             "plain LoRA (no --use_dora)") from None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"{self.target_name}: per-row adapter_names are not supported on a GPTQ layer")
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(out_dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The adapter's update of the layer's weight, ``scaling * B @ A`` [out, in] in float32 (what a merge would
        add to the dequantized weight: ``quantize.py --requantize`` re-quantizes that sum)."""
        a = self.lora_A[adapter].weight.detach().to(torch.float32)
        b = self.lora_B[adapter].weight.detach().to(torch.float32)
        return (b @ a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(f"{self.target_name}: a LoRA adapter cannot be merged into a GPTQ layer (its weight is "
                         "packed integer codes). Merge it into the floating-point base instead (export_hf.py), or "
                         "dequantize, add the update and quantize again (quantize.py --requantize)")

    def unmerge(self) -> None:
        raise ValueError(f"{self.target_name}: nothing to unmerge: a LoRA adapter is never merged into a GPTQ layer")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def has_gptq_layers(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds any ``GPTQLinear`` (wrapped by peft or not)."""
    return any(isinstance(m, GPTQLinear) for m in model.modules())


def register_gptq_lora(config: LoraConfig) -> LoraConfig:
    """``config`` taught to wrap ``GPTQLinear`` layers with ``GPTQLoraLinear`` (peft's custom-module API); returns
    it. Refuses DoRA here, before peft builds anything, with the flag to drop."""
    if config.use_dora:
        raise SuiteError("--use_dora: DoRA rescales the base weight, which a GPTQ layer holds as packed integers; "
                         "train plain LoRA on a GPTQ base")
    config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    return config


def attach_adapter(model: torch.nn.Module, adapter_dir: str | Path, *, is_trainable: bool = False,
                   adapter_name: str = "default") -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter_dir)`` that also works when ``model`` has GPTQ layers.

    A LoRA adapter's config is read first and taught ``GPTQLoraLinear`` (``register_gptq_lora``) when the model
    has GPTQ layers; prefix, prompt and p-tuning adapters wrap no layer and load as they are. The shared loader
    (``utils.inference.loading.load_model``) calls this in place of ``PeftModel.from_pretrained``.

    Raises:
        SuiteError: a DoRA adapter on a GPTQ base.
        ValueError, RuntimeError, KeyError: what peft raises for an adapter that does not fit the model.
    """
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if isinstance(config, LoraConfig) and has_gptq_layers(model):
        register_gptq_lora(config)
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config)


def load_quantized_base(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        trust_remote_code: bool = False, backend: str | None = None) -> Any:
    """A quantized folder as the frozen base of an adapter run (``TRAINABLE_FORMATS``).

    GPTQ through ``checkpoint.load_gptq_model`` (each layer's kernel chosen for ``device``, or ``backend``), a
    pre-quantized bitsandbytes folder through ``checkpoint.load_quantized_model`` (its own quantization config,
    the CPU layout guard). ``model.name_or_path`` is the folder, so a saved adapter's ``base_model_name_or_path``
    names it.

    Raises:
        SuiteError: a quantized format adapters cannot be trained on, or a folder that does not load (named).
    """
    fmt = checkpoint.quantized_format(path)
    if fmt not in TRAINABLE_FORMATS:
        raise SuiteError(f"--base_model {path}: adapters train on GPTQ and bitsandbytes quantized folders only, not "
                         f"{fmt or 'this folder'}; fine-tune the floating-point model instead")
    try:
        if fmt == checkpoint.GPTQ:
            model = checkpoint.load_gptq_model(path, device, dtype, trust_remote_code, backend)
        else:
            model = checkpoint.load_quantized_model(path, device, dtype, trust_remote_code, backend)
    except ValueError as exc:
        raise SuiteError(f"--base_model {exc}" if str(exc).startswith(str(path)) else
                         f"--base_model {path}: cannot be loaded: {exc}") from None
    model.name_or_path = model.config._name_or_path = str(path)
    model.quant_label = checkpoint.quantization_label(path)
    return model


def quantized_base_summary(model: torch.nn.Module) -> dict:
    """What finetune.py's ``pipeline.json`` records of a quantized base: its label (``gptq-4bit``), settings, how
    many layers are quantized and how they ran, and how many of them carry LoRA."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    settings = dict(getattr(base, "quant_settings", None) or {})
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    if not layers:  # bitsandbytes: its own layer classes
        layers = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")]
    wrapped = sum(isinstance(m, LoraLayer) and m.get_base_layer() in layers for m in model.modules()) \
        if layers else 0
    return {"base": getattr(base, "quant_label", None), **{k: v for k, v in settings.items() if k != "dynamic"},
            "quantized_layers": len(layers), "lora_layers": wrapped, "backend": getattr(base, "quant_backend", None)}


def layer_shapes(folder: str | Path) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of every 2-D weight a model folder stores (linear layers,
    embeddings), read from the safetensors headers only: ``name.weight`` as stored, and a GPTQ-packed
    ``name.qweight`` unpacked from its shape (``[in * bits / 32, out]``, bits from the folder's config, per layer
    where GPTQModel ``dynamic`` rules override them).

    What the shared loader's check of a LoRA adapter against its base needs on a GPTQ base, where the quantized
    layers store no ``.weight``.
    """
    from safetensors import safe_open

    settings = checkpoint.gptq_settings(folder) if checkpoint.is_gptq_folder(folder) else None
    shapes: dict[str, tuple[int, int]] = {}
    for file in checkpoint.weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name, _, kind = key.rpartition(".")
                shape = tuple(f.get_slice(key).get_shape())
                if kind == "weight" and len(shape) == 2:
                    shapes[name] = (shape[0], shape[1])
                elif kind == "qweight" and settings is not None and len(shape) == 2:
                    bits, _ = checkpoint.layer_settings(name, settings)
                    shapes[name] = (shape[1], shape[0] * 32 // bits)
    return shapes

