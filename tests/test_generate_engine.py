"""The decoding engine (utils/inference/generation.py, utils/inference/runners.py): equality with Hugging Face generate on the real
stories260K model, batching, stop strings, streaming of multi-byte text, logits processing."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import STORIES
from utils.inference.generation import (Detokenizer, Engine, Settings, StopText, filter_top_k_top_p_, penalize_repetition_, sanitize_)

PROMPTS = [
    "Once upon a time",
    "Lily and Tom went to the park. They",
    "The cat",
    "One day, a little boy named Tim found a big box in his room. He opened it and",
    "Sue had a red ball.",
    "Ben",
]


@pytest.fixture(scope="session")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True).eval()
    return model, tok


def hf_greedy(model, ids: list[int], n: int, eos: int = 2) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    seq = out[0, len(ids):].tolist()
    return seq[:seq.index(eos)] if eos in seq else seq


@pytest.fixture(scope="session")
def reference(stories):
    model, tok = stories
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    return ids, [hf_greedy(model, r, 48) for r in ids]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hf"])
def test_greedy_matches_hf_generate_at_batch_1_and_in_mixed_batches(stories, reference, fast):
    model, tok = stories
    ids, ref = reference
    engine = Engine(model, tok, fast=fast)
    assert engine.runner.name == ("fast" if fast else "hf")
    for batch_size in (1, 4, 6):
        out = engine.generate(ids, Settings(max_new_tokens=48), batch_size=batch_size)
        assert [c.token_ids for c in out] == ref, batch_size
        for c, r in zip(out, ref):
            assert c.text == tok.decode(r, skip_special_tokens=True)
            assert c.finish_reason == ("eos" if len(r) < 48 else "length")
    # The fast path re-lays out the weights in place; the model itself still gives the same answers.
    assert hf_greedy(model, ids[1], 48) == ref[1]


@pytest.mark.parametrize("kind", ["qwen2", "llama-untied-bias"])
def test_fast_path_matches_hf_on_other_llama_shapes(stories, kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    _, tok = stories
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=2, bos_token_id=1, max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True, mlp_bias=True,
                                             tie_word_embeddings=False)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)  # non-zero, so that a dropped bias would show
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ref = [hf_greedy(model, r, 24) for r in ids]
    engine = Engine(model, tok, fast=True)
    assert [c.token_ids for c in engine.generate(ids, Settings(max_new_tokens=24), batch_size=4)] == ref


def test_streaming_yields_the_same_text_token_by_token(stories, reference):
    model, tok = stories
    ids, ref = reference
    stream = Engine(model, tok).stream(ids[0], Settings(max_new_tokens=48))
    chunks = list(stream)
    assert len(chunks) > 10 and "".join(chunks) == stream.completion.text == tok.decode(ref[0])
    assert stream.completion.token_ids == ref[0]


def test_stop_strings_from_user_and_template(stories, reference):
    model, tok = stories
    ids, ref = reference
    full = tok.decode(ref[0])  # ", there was a little girl named Lily. She loved to ..."
    word = "little girl"
    assert word in full
    engine = Engine(model, tok)
    stream = engine.stream(ids[0], Settings(max_new_tokens=48, stop=[word]))
    chunks = list(stream)
    c = stream.completion
    assert c.finish_reason == "stop" and c.text == full[:full.index(word)]
    assert "".join(chunks) == c.text and not any("lit" in ch for ch in chunks[-2:])

    class Tpl:
        stop = ["named"]
    c = Engine(model, tok, template=Tpl()).generate([ids[0]], Settings(max_new_tokens=48))[0]
    assert c.finish_reason == "stop" and c.text == full[:full.index("named")]


class Scripted:
    """A runner that emits given token sequences (then EOS), to test stopping and streaming exactly."""

    name = "scripted"

    def __init__(self, seqs: list[list[int]], vocab: int, eos: int, alt: int | None = None, margin: float = 10.0):
        self.seqs, self.vocab, self.eos, self.alt, self.margin = seqs, vocab, eos, alt, margin
        self.calls = 0

    def _logits(self):
        out = torch.zeros(len(self.rows), self.vocab)
        for i, r in enumerate(self.rows):
            seq = self.seqs[r]
            out[i, seq[self.t] if self.t < len(seq) else self.eos] = self.margin
            if self.alt is not None:
                out[i, self.alt] = self.margin - 1
        return out

    def prefill(self, ids, mask, max_new_tokens=0):
        self.rows, self.t = list(range(ids.shape[0])), 0
        return self._logits()

    def step(self, tokens):
        self.t += 1
        self.calls += 1
        return self._logits()

    def keep(self, rows):
        self.rows = [self.rows[i] for i in rows.tolist()]


def scripted_engine(model, tok, seqs, **kw) -> Engine:
    engine = Engine(model, tok)
    engine.runner = Scripted(seqs, engine.vocab, engine.eos_ids[0], **kw)
    return engine


def test_chinese_stream_has_no_broken_characters_and_a_split_stop_string_never_shows(stories, bpe_tokenizer):
    model, _ = stories
    tok = bpe_tokenizer
    text = "你好，世界。今天天气很好，我们去公园散步吧。"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # several tokens carry partial UTF-8 sequences
    d = Detokenizer(tok)
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens end mid-character and were held back

    engine = Engine(model, tok)  # the model is a stand-in: the scripted runner produces the tokens
    engine.vocab = len(tok)
    engine.eos_ids = [tok.eos_token_id]
    engine.runner = Scripted([ids], len(tok), tok.eos_token_id)
    stream = engine.stream([ids[0]], Settings(max_new_tokens=100, stop=["公园"]))
    chunks = list(stream)
    assert stream.completion.finish_reason == "stop"
    assert "".join(chunks) == "你好，世界。今天天气很好，我们去"
    assert not any("\ufffd" in c or "公" in c for c in chunks)


def test_stop_text_holds_back_only_while_a_stop_string_could_follow():
    s = StopText(["### Instruction:"])
    assert s.feed("The answer is 5.\n#") == "The answer is 5.\n"
    assert s.feed("## Instr") == ""
    assert s.feed("uctions are") == "### Instructions are"  # not the stop string after all
    assert s.feed(" done ###") == " done "
    assert s.feed(" Instruction:") == "" and s.stopped
    s2 = StopText(["###"])
    assert s2.feed("a ##") == "a " and s2.feed("# b") == "" and s2.stopped


def test_eos_min_new_tokens_and_length_regulation(stories):
    model, tok = stories
    # The script wants EOS at once; token 100 is a close second.
    engine = scripted_engine(model, tok, [[]], alt=100)
    assert engine.generate([[1, 5]], Settings(max_new_tokens=10))[0].finish_reason == "eos"
    c = engine.generate([[1, 5]], Settings(max_new_tokens=10, min_new_tokens=4))[0]
    assert c.token_ids[:4] == [100] * 4 and c.finish_reason == "eos" and len(c.token_ids) == 4
    # MOSS length regulation: EOS is second best by 1 nat; a penalty of e per token after 3 tokens makes it win.
    engine = scripted_engine(model, tok, [[100] * 20], alt=engine.eos_ids[0])
    assert len(engine.generate([[1, 5]], Settings(max_new_tokens=20))[0].token_ids) == 20
    c = engine.generate([[1, 5]], Settings(max_new_tokens=20, length_penalty=math.e ** 0.6, regulation_start=3))[0]
    assert c.finish_reason == "eos" and len(c.token_ids) == 5


def test_max_time_ends_an_answer(stories):
    model, tok = stories
    engine = scripted_engine(model, tok, [[10] * 50])
    c = engine.generate([[1, 5]], Settings(max_new_tokens=50, max_time=1e-9))[0]
    assert c.finish_reason == "time" and c.token_ids == [10]


def test_finished_rows_leave_the_batch(stories):
    model, tok = stories
    engine = scripted_engine(model, tok, [[10, 11], [12] * 9, [13, 14, 15]])
    out = engine.generate([[1, 5], [1, 6], [1, 7]], Settings(max_new_tokens=30), batch_size=3)
    assert [c.token_ids for c in out] == [[10, 11], [12] * 9, [13, 14, 15]]
    assert engine.runner.rows == [1] and engine.runner.calls == 9


def test_logits_processing_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, float("nan")], [float("nan")] * 4])
    assert sanitize_(logits, eos_id=3) == 2
    assert logits[0, 3] == -math.inf and logits[1].argmax() == 3 and torch.isfinite(logits[0, :3]).all()
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    penalize_repetition_(logits, torch.tensor([[True, True, False, False]]), 2.0)
    assert logits.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # MOSS: positive / p, negative * p
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    filter_top_k_top_p_(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(logits).tolist() == [[True, True, False, False]]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    filter_top_k_top_p_(logits, top_k=3, top_p=1.0)
    assert torch.isfinite(logits).tolist() == [[True, True, True, False]]


def test_nan_logits_do_not_crash_generation(stories):
    model, tok = stories
    engine = scripted_engine(model, tok, [[10, 11, 12]])
    real = engine.runner._logits

    def broken():
        out = real()
        out[:, 200:300] = float("nan")
        if engine.runner.t == 2:
            out[:] = float("nan")  # nothing usable: the row ends
        return out
    engine.runner._logits = broken
    c = engine.generate([[1, 5]], Settings(max_new_tokens=5))[0]
    assert c.token_ids == [10, 11] and c.finish_reason == "eos" and engine.bad_logit_rows == 3


def test_sampling_is_seeded_and_repetition_penalty_changes_greedy_output(stories, reference):
    model, tok = stories
    ids, ref = reference
    engine = Engine(model, tok)
    s = dict(max_new_tokens=32, temperature=1.0, top_p=0.9, top_k=50)
    a = engine.generate(ids[:2], Settings(**s, seed=1))
    b = engine.generate(ids[:2], Settings(**s, seed=1))
    c = engine.generate(ids[:2], Settings(**s, seed=2))
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]
    penalized = engine.generate([ids[0]], Settings(max_new_tokens=48, repetition_penalty=1.5))[0]
    assert penalized.token_ids != ref[0]
    with torch.no_grad():  # HF's repetition penalty has the same semantics (over prompt and output)
        out = model.generate(torch.tensor([ids[0]]), max_new_tokens=48, do_sample=False, repetition_penalty=1.5)
    hf = out[0, len(ids[0]):].tolist()
    assert penalized.token_ids == (hf[:hf.index(2)] if 2 in hf else hf)


def reference_beam_search(model, prompt: list[int], beams: int, max_new: int, eos: int) -> list[int]:
    """Beam search written out here, independently of transformers, over the model's logits (a full forward per
    hypothesis and step, no cache), with the conventions transformers documents for its defaults (length_penalty
    1, early_stopping False): scores are summed log-probabilities; each step keeps the 2 * beams best continuations
    of all hypotheses; one of the best ``beams`` that ends in EOS (or reaches max_new) is a finished hypothesis
    scored by its sum over its length (EOS counted), the others run on (the best ``beams`` of them); the search
    ends when ``beams`` hypotheses are finished and the best running one, at its current length, scores no
    better than the worst of them. Returns the best finished hypothesis without its EOS."""
    running: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new):
        candidates = []
        for score, tokens in running:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            values, ids = torch.topk(torch.log_softmax(logits, -1), 2 * beams)
            candidates += [(score + v, tokens + [t]) for v, t in zip(values.tolist(), ids.tolist())]
        candidates = sorted(candidates, key=lambda c: -c[0])[:2 * beams]
        running = []
        for rank, (score, tokens) in enumerate(candidates):
            if tokens[-1] == eos or step + 1 == max_new:
                if rank < beams:
                    finished.append((score / len(tokens), tokens))
            elif len(running) < beams:
                running.append((score, tokens))
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        if len(finished) == beams and (not running or running[0][0] / (step + 1) <= finished[-1][0]):
            break
    best = finished[0][1]
    return best[:-1] if best[-1] == eos else best


def test_beam_search_matches_an_independent_beam_search(stories, reference):
    """The engine's beam search delegates to transformers' generate (README); its result is checked against the
    beam search above, both where every hypothesis runs to --max_new_tokens and where hypotheses of different
    lengths finish (with "." as the end token, so that length normalisation decides)."""
    model, tok = stories
    ids, _ = reference
    engine = Engine(model, tok)
    for prompt in ids[:2]:
        c = engine.generate([prompt], Settings(max_new_tokens=20, num_beams=3), batch_size=1)[0]
        assert c.token_ids == reference_beam_search(model, prompt, 3, 20, eos=2)
    dot = tok.convert_tokens_to_ids(".")
    engine.eos_ids = [dot]  # sentences end often: finished hypotheses compete
    differs = 0
    for prompt in ids[1:4]:
        ours = reference_beam_search(model, prompt, 3, 30, eos=dot)
        c = engine.generate([prompt], Settings(max_new_tokens=30, num_beams=3), batch_size=1)[0]
        assert c.token_ids == ours and c.finish_reason == "eos"
        differs += ours != engine.generate([prompt], Settings(max_new_tokens=30))[0].token_ids
    assert differs >= 2  # beam search found other answers than greedy decoding: the comparison means something


def test_settings_are_validated():
    problems = Settings(max_new_tokens=0, temperature=-1, top_p=0, num_beams=2, stop=[""]).problems()
    text = "\n".join(problems)
    for flag in ("--max_new_tokens", "--temperature", "--top_p", "--stop"):
        assert flag in text


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "hf"])
def test_rows_joining_a_running_batch_decode_as_they_do_alone(stories, reference, fast):
    """Continuous batching: prompts arrive while others decode (the scheduler prefills them on their own and merges
    their cache into the running batch, right-aligned); greedy rows give token for token what they give alone, and a
    seeded sampling row what it samples alone, whatever joins or leaves around them."""
    model, tok = stories
    ids, ref = reference
    engine = Engine(model, tok, fast=fast)
    sampled = Settings(max_new_tokens=40, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    alone = engine.generate([ids[3]], sampled)[0].token_ids
    sched = engine.scheduler(max_rows=4)
    rows = []
    arrivals = {0: [0, 1], 3: [2], 4: [3], 9: [4, 5]}  # tick -> prompts arriving (4 rows at most run at once)
    tick = 0
    while tick <= max(arrivals) or not sched.idle:
        for i in arrivals.get(tick, []):
            row = engine.row(ids[i], sampled if i == 3 else Settings(max_new_tokens=48), tag=i)
            rows.append(row)
            sched.submit([row])
        sched.tick()
        assert sched.running <= 4
        tick += 1
    got = {r.tag: r.completion.token_ids for r in rows}
    assert got[3] == alone
    assert [got[i] for i in (0, 1, 2, 4, 5)] == [ref[i] for i in (0, 1, 2, 4, 5)]
    assert all(r.completion.text == tok.decode(r.completion.token_ids, skip_special_tokens=True) for r in rows)


def test_a_cancelled_row_leaves_the_batch_at_the_next_step(stories, reference):
    model, tok = stories
    ids, ref = reference
    engine = Engine(model, tok)
    sched = engine.scheduler(max_rows=4)
    a, b = engine.row(ids[0], Settings(max_new_tokens=48)), engine.row(ids[1], Settings(max_new_tokens=48))
    sched.submit([a])
    sched.submit([b])
    sched.tick()  # both prefilled (a first token each) and one step (a second)
    sched.tick()
    assert sched.running == 2
    sched.cancel([a])
    assert sched.running == 1 and a.completion.finish_reason == "interrupted" and len(a.completion.token_ids) == 3
    while not sched.idle:
        sched.tick()
    assert b.completion.token_ids == ref[1]


def test_a_row_that_decoded_alone_keeps_its_tokens_when_others_join(stories, reference):
    """The case continuous batching meets first: one request decodes alone (no padding anywhere) for a few steps,
    then longer and shorter prompts join; the first row must still attend to every token it generated alone."""
    model, tok = stories
    ids, ref = reference
    engine = Engine(model, tok, fast=True)
    sched = engine.scheduler(max_rows=8)
    first = engine.row(ids[2], Settings(max_new_tokens=48))
    sched.submit([first])
    for _ in range(6):
        sched.tick()
    others = [engine.row(ids[i], Settings(max_new_tokens=48), tag=i) for i in (3, 0)]
    for r in others:
        sched.submit([r])
    while not sched.idle:
        sched.tick()
    assert first.completion.token_ids == ref[2]
    assert [r.completion.token_ids for r in others] == [ref[3], ref[0]]
