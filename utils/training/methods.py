"""The tuning-method registry: for each --method, how the model is wrapped (peft config) and which
parameters it trains; and the checks a method needs of the model (linear layer names, packing)."""

from __future__ import annotations

from typing import Any, Callable

from utils.errors import SuiteError


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
