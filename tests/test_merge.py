"""The LoRA merge maths of utils/weights/merge.py, variant by variant, against peft's own merge_and_unload: a
tiny module per variant (no model, no stage), a trained-looking (non-zero) adapter saved by peft, read back by
``load_adapter`` and merged with ``merge_weight`` / ``merge_bias``."""

from __future__ import annotations

import pytest

import peft
import torch

from utils.errors import SuiteError
from utils.weights.merge import load_adapter, merge_bias, merge_weight  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = torch.nn.Embedding(40, 12)
        self.up = torch.nn.Linear(12, 20, bias=True)
        self.down = torch.nn.Linear(20, 12, bias=False)
        self.conv = Conv1D(16, 12)  # GPT-2's layer: weight stored [in, out]

    def forward(self, ids):
        return self.conv(self.down(self.up(self.emb(ids))))


VARIANTS = {
    "lora": dict(target_modules=["up", "down"]),
    "rslora": dict(target_modules=["up", "down"], use_rslora=True),
    "dora": dict(target_modules=["up", "down"], use_dora=True),
    "patterns": dict(target_modules=["up", "down"], rank_pattern={"down": 2}, alpha_pattern={"up": 3.0}),
    "embedding": dict(target_modules=["emb", "up"]),
    "conv1d": dict(target_modules=["conv"], fan_in_fan_out=True),
    "lora_bias": dict(target_modules=["up"], lora_bias=True),
}


def trained_adapter(tmp_path, variant):
    torch.manual_seed(0)
    base = Tiny()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **VARIANTS[variant])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # as if trained: every LoRA tensor non-zero (a fresh lora_B is zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(tmp_path / variant))
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return tmp_path / variant, reference, merged


# peft warns that a 1-D lora_B.bias looks like an ungathered shard; for lora_bias it is the real shape.
@pytest.mark.filterwarnings("ignore:Adapter .default.")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_equals_peft_merge_and_unload(tmp_path, variant):
    folder, reference, merged = trained_adapter(tmp_path, variant)
    adapter = load_adapter(folder)
    assert adapter.targets, "the adapter was read as empty"
    checked = 0
    for name, base_weight in reference.items():
        target = adapter.targets.get(name)
        if target is not None:
            got = merge_weight(target, base_weight.clone(), adapter.fan_in_fan_out)
        elif name.endswith(".bias") and name[:-5] + ".weight" in adapter.targets:
            got = merge_bias(adapter.targets[name[:-5] + ".weight"], base_weight.clone())
            got = base_weight if got is None else got
        else:
            got = base_weight
        assert not torch.equal(merged[name], reference[name]) or target is None, f"{name}: peft changed nothing"
        torch.testing.assert_close(got, merged[name], rtol=1e-5, atol=1e-5, msg=f"{variant}: {name}")
        checked += target is not None
    assert checked == len(adapter.targets)


def test_rslora_and_patterns_change_the_scaling(tmp_path):
    scalings = {}
    for variant in ("lora", "rslora", "patterns"):
        folder, _, _ = trained_adapter(tmp_path, variant)
        scalings[variant] = {n: t.scaling for n, t in load_adapter(folder).targets.items()}
    assert scalings["lora"] == {"up.weight": 2.0, "down.weight": 2.0}  # alpha / r = 8 / 4
    assert scalings["rslora"] == {"up.weight": 4.0, "down.weight": 4.0}  # alpha / sqrt(r)
    assert scalings["patterns"] == {"up.weight": 0.75, "down.weight": 4.0}  # 3 / 4 and 8 / 2


def test_an_adapter_for_another_shape_is_refused(tmp_path):
    folder, reference, _ = trained_adapter(tmp_path, "lora")
    target = load_adapter(folder).targets["up.weight"]
    with pytest.raises(SuiteError, match="does not fit the base weight"):
        merge_weight(target, torch.zeros(21, 12), False)


def test_an_all_zero_adapter_is_refused(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, target_modules=["up"]))  # lora_B starts at zero
    model.save_pretrained(str(tmp_path / "fresh"))
    with pytest.raises(SuiteError, match="every lora_B is zero"):
        load_adapter(tmp_path / "fresh")

