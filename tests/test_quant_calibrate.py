"""GPTQ over a whole model (utils/quant/calibrate.py) on the real stories260K: blocks and linear layers found from
the model, layers the caller keeps left untouched and reported, and the quantized model's perplexity on held-out
stories (utils.evaluation.perplexity, the eval stage's function) loses less with GPTQ than with RTN on the same grid."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA, STORIES
from utils.evaluation.perplexity import perplexity
from utils.quant.calibrate import block_linears, decoder_blocks, quantize_model
from utils.quant.gptq import GPTQSettings


def stories() -> list[str]:
    path = DATA / "tinystories" / "valid_sample.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)


def calibration_samples(tok, texts, seqlen: int = 256) -> list[torch.Tensor]:
    return [torch.tensor(tok(t)["input_ids"][:seqlen]) for t in texts]


def test_blocks_and_layers_are_found_from_the_model():
    model, _ = load()
    prefix, blocks = decoder_blocks(model)
    assert prefix == "model.layers" and len(blocks) == model.config.num_hidden_layers
    assert sorted(block_linears(blocks[0])) == sorted(
        f"{a}.{b}" for a, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                    ("mlp", ("gate_proj", "up_proj", "down_proj"))) for b in names)


@pytest.mark.slow
def test_gptq_loses_less_perplexity_than_rtn_and_kept_layers_stay_as_they_were():
    """Slow: the claim itself, on the real model: two calibrations (GPTQ and RTN) and three perplexity runs
    on held-out stories; fewer stories would make the perplexity difference noise."""
    texts = stories()
    calib, held_out = texts[:32], texts[100:140]
    model, tok = load()
    before = perplexity(model, tok, held_out, progress=False)["ppl"]
    mlp_before = model.model.layers[0].mlp.down_proj.weight.clone()

    def keep(name, layer):
        return "172 inputs or outputs: the GPTQ layout cannot pack it" if ".mlp." in name else None

    ppl = {}
    for method in ("gptq", "rtn"):
        model, _ = load()
        settings = GPTQSettings(bits=4, group_size=32, act_order=True)
        done = quantize_model(model, calibration_samples(tok, calib), settings, method=method, keep=keep,
                              progress=False)
        attention = [r for r in done.report if r.kept is None]
        assert len(attention) == 4 * model.config.num_hidden_layers and len(done.layers) == len(attention)
        assert all(".self_attn." in r.name for r in attention)
        assert {r.kept for r in done.report if ".mlp." in r.name} == {keep("x.mlp.y", None)}
        assert torch.equal(model.model.layers[0].mlp.down_proj.weight, mlp_before)
        if method == "gptq":
            assert all(0 < r.relative_error < 0.5 for r in attention)
        ppl[method] = perplexity(model, tok, held_out, progress=False)["ppl"]
    gptq, rtn = ppl["gptq"] - before, ppl["rtn"] - before
    assert 0 < rtn and gptq < 0.8 * rtn, (before, ppl)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_every_layer_is_quantized_in_place(true_sequential):
    model, tok = load()
    original = {n: p.clone() for n, p in model.named_parameters()}
    done = quantize_model(model, calibration_samples(tok, stories()[:4], 32), GPTQSettings(bits=8, group_size=-1),
                          true_sequential=true_sequential, progress=False)
    assert len(done.layers) == 7 * model.config.num_hidden_layers and done.tokens == 4 * 32
    for name, q in done.layers.items():
        w = dict(model.named_parameters())[f"{name}.weight"]
        assert torch.equal(w, q.dequantize().to(w.dtype)) and not torch.equal(w, original[f"{name}.weight"])
        assert (w - original[f"{name}.weight"]).abs().max() < 0.02 * original[f"{name}.weight"].abs().max()
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_a_non_finite_weight_is_named():
    model, tok = load()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj: the weight holds NaN"):
        quantize_model(model, calibration_samples(tok, stories()[:2], 16), GPTQSettings(bits=8), progress=False)


def test_batched_calibration_gives_the_codes_of_one_sample_at_a_time():
    """Equal-length samples run together (``batch_tokens``), ragged ones in their own batches; the Hessians are
    sums over tokens and each batch gets its own position embeddings, so the codes equal those of one sample per
    forward (a mask or position mix-up between rows would change them). The Hessian passes also stop at the last
    layer of each step, which must not change what the layers see."""
    from utils.quant.calibrate import batches

    model, tok = load()
    texts = stories()[:24]
    samples = calibration_samples(tok, texts, seqlen=256)
    assert len({len(s) for s in samples}) > 1  # some stories are shorter: ragged lengths are exercised
    groups = batches(samples, batch_tokens=256 * 4)
    assert sum(g.shape[0] for g in groups) == len(samples) and max(g.shape[0] for g in groups) == 4
    assert all(g.numel() <= 256 * 4 or g.shape[0] == 1 for g in groups)
    settings = GPTQSettings(bits=4, group_size=32, act_order=True)
    keep = lambda name, m: None if m.in_features % 32 == 0 else "shape"  # noqa: E731
    done = {}
    for batch_tokens in (1, 256 * 4):
        m, _ = load()
        done[batch_tokens] = quantize_model(m, samples, settings, keep=keep, progress=False,
                                            batch_tokens=batch_tokens)
    one, batched = done[1], done[256 * 4]
    assert one.layers.keys() == batched.layers.keys() and one.layers
    # Codes are not compared: float sums in another order move a scale by an ulp, and with act-order a column
    # order; how many codes that flips depends on the thread count. What batching must keep exactly is each
    # sample's activations: the first block's outputs, batched, equal those of one sample at a time (a row,
    # position or mask mix-up would change them), and every layer's reconstruction error is as good.
    from utils.quant.calibrate import _catch_inputs, _run_block

    fresh, _ = load()
    _, blocks = decoder_blocks(fresh)
    with torch.no_grad():  # both orders group the samples by length (``batches``), so rows line up one to one
        alone = [o[0] for o in _run_block(blocks[0], _catch_inputs(fresh, blocks, samples, 1))]
        together = [row for o in _run_block(blocks[0], _catch_inputs(fresh, blocks, samples, 256 * 4)) for row in o]
    assert len(together) == len(alone) == len(samples) and len(alone) > 20
    assert sorted(len(t) for t in together) == sorted(len(s) for s in samples)
    for k, (a, b) in enumerate(zip(alone, together)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5), k
    for a, b in zip(one.report, batched.report):
        assert a.name == b.name and (a.relative_error is None) == (b.relative_error is None)
        if a.relative_error is not None:
            assert abs(a.relative_error - b.relative_error) < 0.02 * a.relative_error, a.name


@pytest.mark.parametrize("true_sequential", [True, False])
def test_attention_is_skipped_once_o_proj_is_quantized_and_nothing_changes(monkeypatch, true_sequential):
    """Once a block's o_proj is quantized, later passes over the block take self_attn's output from o_proj on its
    cached inputs instead of recomputing attention (``_Shortcut``). Every weight and error must stay bit for bit
    what the full recomputation gives, and attention must run once per batch and block (plus the check of the
    first batch), not once per later pass. Without true-sequential the cached inputs come from the float q/k/v,
    so the check must refuse them and fall back to the full forward (same weights again)."""
    import utils.quant.calibrate as calibrate

    model, tok = load()
    samples = calibration_samples(tok, stories()[:6], 24)
    settings = GPTQSettings(bits=4, group_size=32, act_order=True)
    keep = lambda name, m: None if m.in_features % 32 == 0 and m.out_features % 32 == 0 else "shape"  # noqa: E731

    def run(shortcuts: bool):
        m, _ = load()
        with monkeypatch.context() as patch:
            if not shortcuts:
                patch.setattr(calibrate, "_shortcut_parents", lambda block, order: {})
            done = quantize_model(m, samples, settings, keep=keep, progress=False, batch_tokens=24,
                                  true_sequential=true_sequential)
        return m, done

    (plain, plain_done), (fast, fast_done) = run(False), run(True)
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r.relative_error for r in plain_done.report] == [r.relative_error for r in fast_done.report]
    blocks, batches = model.config.num_hidden_layers, len(samples)
    sdpa = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa.append(1) or original(*a, **k))
    run(True)
    if true_sequential:  # the o_proj step, then the output pass's first batch (the check); block 0's order run
        assert len(sdpa) == blocks * (batches + 1) + 1, len(sdpa)
    else:  # the one step, then the whole output pass (the check failed: the cache was taken before q/k/v changed)
        assert len(sdpa) == blocks * 2 * batches + 1, len(sdpa)
