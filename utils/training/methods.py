"""The tuning-method registry: for each --method, how the model is wrapped (peft config) and which
parameters it trains; the checks a method needs of the model (linear layer names, packing) and of a base that is
already quantized (a GPTQ or pre-quantized bitsandbytes folder: ``quantized_base_problems``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Literal

from utils.args import Group
from utils.errors import SuiteError

PROMPT_METHODS = ("prompt", "ptuning")  # peft prepends virtual tokens to the inputs (and logits)
# Quantized folders adapters train on (utils.quant.adapters.TRAINABLE_FORMATS, named here without importing torch),
# and how messages name them.
QUANTIZED_BASES = {"gptq": "GPTQ", "bitsandbytes": "bitsandbytes"}
# The flags that configure bitsandbytes quantization at load time: with an already quantized base they do not apply.
BNB_FLAGS = ("qlora_bits", "qlora_quant_type", "qlora_double_quant")


@dataclass(frozen=True)
class MethodArgs(Group):
    """The tuning method and its own settings: LoRA (and qlora's quantized base), virtual tokens."""

    method: Literal["lora", "qlora", "prefix", "ptuning", "prompt", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    use_rslora: bool = False
    use_dora: bool = False
    qlora_bits: int = 4
    qlora_quant_type: Literal["nf4", "fp4"] = "nf4"
    qlora_double_quant: bool = True
    num_virtual_tokens: int = 16
    prefix_projection: bool = False
    encoder_hidden_size: int = 0

    def __post_init__(self):
        if isinstance(self.lora_target_modules, list):  # frozen groups hold lists as tuples
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    def problems(self) -> list[str]:
        problems = [f"--{name} must be >= 1, got {getattr(self, name)}" for name in ("lora_r", "num_virtual_tokens")
                    if getattr(self, name) < 1]
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.qlora_bits not in (4, 8):
            problems.append(f"--qlora_bits must be 4 or 8, got {self.qlora_bits}")
        return problems

    @property
    def virtual_tokens(self) -> int:
        """Virtual tokens peft prepends to the logits (0 for methods that prepend none to them)."""
        return self.num_virtual_tokens if self.method in PROMPT_METHODS else 0

    def quantization(self, compute_dtype: str) -> dict | None:
        """How load_base_model quantizes the frozen base for qlora (None for every other method). Not used for a
        base that is already quantized (``quantized_base``), which loads as stored."""
        if self.method != "qlora":
            return None
        return {"bits": self.qlora_bits, "quant_type": self.qlora_quant_type, "double_quant": self.qlora_double_quant,
                "compute_dtype": compute_dtype}


def quantized_base(path: str) -> str | None:
    """The quantized format of a base model folder (``utils.quant.checkpoint.quantized_format``: ``"gptq"``,
    ``"bitsandbytes"``, the seeds' ``"chatglm_rowwise"`` / ``"llmzoo_groupwise"``), or None for a floating-point
    one (or no readable folder). config.json is read first, so a plain folder does not import torch."""
    from utils.weights.pretrained import stored_quantization

    if stored_quantization(path) is None:
        return None
    from utils.quant.checkpoint import quantized_format

    return quantized_format(path)


def quantized_base_problems(settings: MethodArgs, fmt: str, path: str) -> list[str]:
    """What ``settings`` cannot do on a base that is already quantized (format ``fmt``, from ``quantized_base``).

    Adapters train on its frozen layers: ``qlora`` (LoRA on the quantized layers, as peft does for AutoGPTQ's
    layers), ``prefix``, ``ptuning`` and ``prompt``. ``lora`` (which means a floating-point base here) and ``full``
    (packed integer weights have no gradient) are refused, naming the alternative; the bitsandbytes settings of
    qlora, which quantize a floating-point base at load time, are refused when given a value other than their
    default (finetune.py says that they do not apply when left at it).
    """
    name = QUANTIZED_BASES.get(fmt)
    if name is None:
        return [f"--base_model {path} is a {fmt} quantized folder; finetune.py trains adapters on "
                f"{' and '.join(QUANTIZED_BASES.values())} folders only: fine-tune the floating-point model"]
    method = settings.method
    if method == "full":
        return [f"--method full: --base_model {path} is quantized ({name}), and its packed weights cannot be "
                "trained; fine-tune the floating-point model (then quantize.py), or train an adapter on this base "
                "(--method qlora, prefix, ptuning or prompt)"]
    if method == "lora":
        return [f"--method lora: --base_model {path} is already quantized ({name}); LoRA on a quantized base is "
                "--method qlora (its quantized layers stay frozen as they are), or give the floating-point model"]
    problems = []
    if method == "qlora":
        defaults = {f.name: f.default for f in fields(MethodArgs)}
        given = [f"--{flag} {getattr(settings, flag)}" for flag in BNB_FLAGS
                 if getattr(settings, flag) != defaults[flag]]
        if given:
            problems.append(f"{', '.join(given)}: bitsandbytes settings for quantizing a floating-point base at load "
                            f"time; --base_model {path} is already quantized ({name}), so they do not apply: drop "
                            "them")
        if settings.use_dora and fmt == "gptq":
            problems.append(f"--use_dora: DoRA rescales the base weight, which the GPTQ layers of {path} hold as "
                            "packed integers; train plain LoRA on a GPTQ base")
    return problems


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
    """Leaf names of the model's linear layers (nn.Linear, GPT-2's Conv1D and a GPTQ base's packed
    ``GPTQLinear``), output head excluded."""
    import torch

    from utils.quant.kernels import GPTQLinear

    head = model.get_output_embeddings()
    names = set()
    for full, module in model.named_modules():
        is_linear = isinstance(module, (torch.nn.Linear, GPTQLinear)) or type(module).__name__ == "Conv1D"
        if is_linear and module is not head:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def lora_config(settings: MethodArgs, model) -> Any:
    from peft import LoraConfig, TaskType

    targets = list(settings.lora_target_modules)
    available = linear_module_names(model)
    if targets in (["all-linear"], ["all_linear"]):
        targets = available
    missing = [t for t in targets if t not in available]
    if missing:
        raise SuiteError(f"--lora_target_modules: the model has no linear layer named {', '.join(missing)}; "
                         f"its linear layers are: {', '.join(available)} (or use all-linear)")
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, target_modules=targets, use_rslora=settings.use_rslora,
                        use_dora=settings.use_dora)
    from utils.quant.adapters import has_gptq_layers, register_gptq_lora

    # peft does not know our GPTQ layer: it is taught through the config (not saved with the adapter).
    return register_gptq_lora(config) if has_gptq_layers(model) else config


def prefix_config(settings: MethodArgs, model) -> Any:
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens,
                              prefix_projection=settings.prefix_projection,
                              encoder_hidden_size=settings.encoder_hidden_size or model.config.hidden_size)


def ptuning_config(settings: MethodArgs, model) -> Any:
    from peft import PromptEncoderConfig, TaskType

    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens,
                               encoder_hidden_size=settings.encoder_hidden_size or model.config.hidden_size)


def prompt_config(settings: MethodArgs, model) -> Any:
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)


# --method -> builder of its peft config (None: every weight is trained)
METHODS: dict[str, Callable[[MethodArgs, Any], Any] | None] = {
    "lora": lora_config,
    "qlora": lora_config,  # on a base quantized at load by bitsandbytes, or on a GPTQ / bitsandbytes folder
    "prefix": prefix_config,
    "ptuning": ptuning_config,
    "prompt": prompt_config,
    "full": None,
}


def prepare_model(model, settings: MethodArgs, gradient_checkpointing: bool = False):
    """Wrap ``model`` for ``settings.method``; returns the model whose trainable parameters are the ones to
    train."""
    builder = METHODS[settings.method]
    if builder is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    from utils.quant.adapters import has_gptq_layers

    if settings.method == "qlora" and not has_gptq_layers(model):
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and makes the (frozen, quantized) inputs carry gradients. A GPTQ base needs neither
        # (peft skips the casts for GPTQ too; its layers pass gradients to their inputs); get_peft_model freezes it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, builder(settings, model))


def trainable_state(model) -> dict:
    """The trained parameters by name (what a checkpoint must hold to resume)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
