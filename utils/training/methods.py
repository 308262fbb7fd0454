"""The tuning-method registry: for each --method, how the model is wrapped (peft config) and which
parameters it trains; and the checks a method needs of the model (linear layer names, packing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from utils.args import Group
from utils.errors import SuiteError

PROMPT_METHODS = ("prompt", "ptuning")  # peft prepends virtual tokens to the inputs (and logits)


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
        """How load_base_model quantizes the frozen base for qlora (None for every other method)."""
        if self.method != "qlora":
            return None
        return {"bits": self.qlora_bits, "quant_type": self.qlora_quant_type, "double_quant": self.qlora_double_quant,
                "compute_dtype": compute_dtype}


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
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout, target_modules=targets, use_rslora=settings.use_rslora,
                      use_dora=settings.use_dora)


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
    "qlora": lora_config,  # on a base loaded through bitsandbytes (load_base_model's quantization)
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

    if settings.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and makes the (frozen, quantized) inputs carry gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, builder(settings, model))


def trainable_state(model) -> dict:
    """The trained parameters by name (what a checkpoint must hold to resume)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
