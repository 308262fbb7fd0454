"""Token labels from rendered spans: golden comparisons and invariants on real data and two tokenizers."""

from __future__ import annotations

import json
import re

import pytest

from conftest import DATA, REAL_SETS
from utils.data.records import Columns, Example, RowError, load_examples
from utils.data.encode import IGNORE_INDEX, Encoded, Encoder
from utils.data.templates import MODEL_ROLES, Message, load_template

BIG = 1_000_000


def encode(tokenizer, template, examples, *, cutoff_len=BIG, on_overlength="truncate", mask_mode="assistant"):
    enc = Encoder(tokenizer, template, cutoff_len=cutoff_len, on_overlength=on_overlength, mask_mode=mask_mode,
                  keep_offsets=True)
    return enc.encode_batch(examples)


def real_examples(fmt: str, n: int) -> list[Example]:
    _, rows = load_examples(str(REAL_SETS[fmt]), "auto", Columns())
    return [r for r in rows if isinstance(r, Example)][:n]


def multi_turn_examples(n: int = 12, turns: int = 3) -> list[Example]:
    """Multi-turn conversations built from Phoenix's real questions and answers."""
    pairs = [(e.messages[0].content, e.messages[1].content) for e in real_examples("sharegpt", n * turns)]
    out = []
    for i in range(n):
        msgs = []
        for q, a in pairs[i * turns:(i + 1) * turns]:
            msgs += [Message("user", q), Message("assistant", a)]
        out.append(Example(msgs, path="synthetic", line=i + 1))
    return out


@pytest.fixture(params=["stories", "bpe"])
def tokenizer(request, stories_tokenizer, bpe_tokenizer):
    return stories_tokenizer if request.param == "stories" else bpe_tokenizer


# ---------------------------------------------------------------------------------------------------
# Instruction data: the same labels as alpaca-lora's recipe
# ---------------------------------------------------------------------------------------------------


def alpaca_lora_labels(tokenizer, prompt: str, output: str) -> tuple[list[int], list[int]]:
    """alpaca-lora finetune.py with train_on_inputs=False: tokenize prompt+output (+EOS), mask the
    first len(tokenize(prompt)) tokens."""
    full = tokenizer(prompt + output)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    return full, [IGNORE_INDEX] * n_prompt + full[n_prompt:]


def test_alpaca_labels_match_alpaca_lora(stories_tokenizer):
    tpl = load_template("alpaca")
    examples = real_examples("alpaca", 300)
    results = encode(stories_tokenizer, tpl, examples)
    for ex, res in zip(examples, results):
        assert isinstance(res, Encoded)
        prompt = tpl.generate_prompt(ex.messages[0].content, ex.input)
        ids, labels = alpaca_lora_labels(stories_tokenizer, prompt, ex.messages[1].content)
        assert res.input_ids == ids, ex.line
        assert res.labels == labels, ex.line


def test_train_on_inputs_trains_every_text_token(tokenizer):
    tpl = load_template("alpaca")
    for res in encode(tokenizer, tpl, real_examples("alpaca", 20), mask_mode="all"):
        for tok, label, (s, e) in zip(res.input_ids, res.labels, res.offsets):
            if e > s or (s, e) == (-1, -1):
                assert label == tok
        assert res.labels[-1] == tokenizer.eos_token_id


def test_alpaca_response_is_trained_prompt_is_not(tokenizer):
    tpl = load_template("alpaca")
    ex = Example([Message("user", "Add 2 and 3."), Message("assistant", "The sum is 5.")], path="t", line=1)
    (res,) = encode(tokenizer, tpl, [ex])
    trained = [t for t, l in zip(res.input_ids, res.labels) if l != IGNORE_INDEX]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == "The sum is 5."
    n_prompt = sum(1 for l in res.labels if l == IGNORE_INDEX)
    assert "### Response:" in tokenizer.decode(res.input_ids[:n_prompt])


# ---------------------------------------------------------------------------------------------------
# Conversations: loss on assistant turns and nothing else; EOS ends every response
# ---------------------------------------------------------------------------------------------------


def check_assistant_only(tokenizer, template, ex: Example, res: Encoded) -> None:
    rendered = template.render(ex.messages, input=ex.input)
    model_segs = [s for s in rendered.segments if s.role in MODEL_ROLES and s.train_end > s.train_start]
    other_segs = [s for s in rendered.segments if s.role not in MODEL_ROLES]
    answers = [s for s in model_segs if s.eos_after]
    n_eos = 0
    for i, (tok, label, (s, e)) in enumerate(zip(res.input_ids, res.labels, res.offsets)):
        if (s, e) == (-1, -1):  # inserted EOS: trained, right after an assistant response
            assert tok == tokenizer.eos_token_id and label == tok
            n_eos += 1
            continue
        in_answer = any(s < g.train_end and e > g.train_start for g in model_segs)
        inside_answer = any(s >= g.train_start and e <= g.train_end for g in model_segs)
        inside_other = any(s >= g.start and e <= g.end for g in other_segs)
        if label != IGNORE_INDEX:
            assert in_answer and not inside_other, (i, s, e, rendered.text[s:e])
            n_eos += tok == tokenizer.eos_token_id
        elif e > s:
            assert not inside_answer, (i, s, e, rendered.text[s:e])
    assert n_eos == len(answers)
    # The last trained token of every response is EOS: trained runs end with EOS.
    runs_end = [i for i in range(len(res.labels)) if res.labels[i] != IGNORE_INDEX
                and (i + 1 == len(res.labels) or res.labels[i + 1] == IGNORE_INDEX)]
    assert all(res.input_ids[i] == tokenizer.eos_token_id for i in runs_end if
               not any(g.role in ("thought", "command") for g in model_segs))


@pytest.mark.parametrize("name", ["vicuna_v1.1", "phoenix", "chatml", "llama2", "chatglm", "moss", "alpaca"])
def test_multi_turn_assistant_only(tokenizer, name):
    tpl = load_template(name)
    examples = real_examples("sharegpt", 6) if name == "alpaca" else multi_turn_examples() + real_examples("sharegpt", 6)
    for ex, res in zip(examples, encode(tokenizer, tpl, examples)):
        assert isinstance(res, Encoded), res
        check_assistant_only(tokenizer, tpl, ex, res)


def test_jinja_template_assistant_only_and_single_bos(stories_chat_tokenizer_dir, bpe_tokenizer):
    from transformers import AutoTokenizer

    stories_chat = AutoTokenizer.from_pretrained(str(stories_chat_tokenizer_dir), local_files_only=True)
    for tok in (stories_chat, bpe_tokenizer):
        tpl = load_template("tokenizer", tok)
        examples = multi_turn_examples(6)
        for ex, res in zip(examples, encode(tok, tpl, examples)):
            check_assistant_only(tok, tpl, ex, res)
            if tok is stories_chat:  # the template writes BOS; the tokenizer must not add a second one
                assert res.input_ids[0] == tok.bos_token_id and res.input_ids[1] != tok.bos_token_id


def test_moss_assistant_mode_trains_thoughts_commands_and_replies(stories_tokenizer):
    tpl = load_template("moss")
    examples = real_examples("moss", 15)
    for ex, res in zip(examples, encode(stories_tokenizer, tpl, examples)):
        check_assistant_only(stories_tokenizer, tpl, ex, res)


def llmzoo_labels(tokenizer, template, messages):
    """LLMZoo datasets.preprocess: per gpt turn, mask[len(tok(start)) - 1 : len(tok(end))] = True,
    re-tokenizing growing prefixes (O(turns^2))."""
    rendered = template.render(messages)
    ids = tokenizer(rendered.text)["input_ids"]
    keep = [False] * len(ids)
    for seg in rendered.segments:
        if seg.role != "assistant":
            continue
        start = rendered.text[:seg.start] + template.generation_prompt
        end = rendered.text[:seg.end]
        keep[len(tokenizer(start)["input_ids"]) - 1: len(tokenizer(end)["input_ids"])] = \
            [True] * (len(tokenizer(end)["input_ids"]) - len(tokenizer(start)["input_ids"]) + 1)
    return ids, [t if k else IGNORE_INDEX for t, k in zip(ids, keep)]


def test_phoenix_labels_vs_llmzoo_off_by_one(stories_tokenizer):
    """Same tokens; LLMZoo additionally trains the last prefix token ('<s>' of 'Assistant: <s>') of
    every answer; ours trains exactly the answer and its '</s>'."""
    tpl = load_template("phoenix")
    examples = multi_turn_examples(8)
    for ex, res in zip(examples, encode(stories_tokenizer, tpl, examples)):
        ids, ref = llmzoo_labels(stories_tokenizer, tpl, ex.messages)
        assert res.input_ids == ids  # '</s>' already is EOS: nothing inserted
        extra = [i for i in range(len(ids)) if ref[i] != IGNORE_INDEX and res.labels[i] == IGNORE_INDEX]
        missing = [i for i in range(len(ids)) if ref[i] == IGNORE_INDEX and res.labels[i] != IGNORE_INDEX]
        assert missing == []
        assert len(extra) == 3  # one per answer
        assert all(ids[i] == stories_tokenizer.bos_token_id for i in extra)


# ---------------------------------------------------------------------------------------------------
# MOSS masking mode
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["stories", "bpe"])
def test_moss_mode_masks_exactly_meta_and_result_bodies(which, stories_tokenizer, bpe_tokenizer):
    tok = stories_tokenizer if which == "stories" else bpe_tokenizer
    tpl = load_template("moss")
    examples = real_examples("moss", 25)
    raw = [json.loads(line) for line in open(REAL_SETS["moss"], encoding="utf-8")][:25]
    for ex, row, res in zip(examples, raw, encode(tok, tpl, examples, mask_mode="moss")):
        rendered = tpl.render(ex.messages)
        masked_spans = [(s.content_start, s.content_end) for s in rendered.segments if s.role in ("system", "result")]
        # The masked text is exactly the meta instruction and the tool-result bodies of the raw data.
        assert rendered.text[masked_spans[0][0]:masked_spans[0][1]] == row["meta_instruction"]
        bodies = [turn["Tool Responses"].rstrip("\n")[len("<|Results|>:"):-len("<eor>")] for _, turn in
                  sorted(row["chat"].items(), key=lambda kv: int(kv[0].split("_")[1]))]
        assert [rendered.text[a:b] for a, b in masked_spans[1:]] == [b[1:] if b.startswith(" ") else b for b in bodies]
        for label, (s, e) in zip(res.labels, res.offsets):
            if (s, e) == (-1, -1):
                assert label != IGNORE_INDEX
                continue
            fully_masked = e == s or any(s >= a and e <= b for a, b in masked_spans)
            fully_trained = not any(s < b and e > a for a, b in masked_spans)
            if fully_masked:
                assert label == IGNORE_INDEX, rendered.text[s:e]
            elif fully_trained:
                assert label != IGNORE_INDEX, rendered.text[s:e]
        assert "<eom>" in tok.decode([t for t, l in zip(res.input_ids, res.labels) if l != IGNORE_INDEX])


# ---------------------------------------------------------------------------------------------------
# Length policy
# ---------------------------------------------------------------------------------------------------


def test_truncate_cuts_after_last_whole_turn(stories_tokenizer):
    tpl = load_template("vicuna_v1.1")
    ex = multi_turn_examples(1, 3)[0]
    (full,) = encode(stories_tokenizer, tpl, [ex])
    eos_positions = [i for i, (s, e) in enumerate(full.offsets) if (s, e) == (-1, -1)
                     or (full.input_ids[i] == stories_tokenizer.eos_token_id and full.labels[i] != IGNORE_INDEX)]
    assert len(eos_positions) == 3
    cutoff = eos_positions[1] + 5  # inside the third turn
    (res,) = encode(stories_tokenizer, tpl, [ex], cutoff_len=cutoff)
    assert res.truncated and res.full_length == len(full.input_ids)
    assert len(res.input_ids) == eos_positions[1] + 1
    assert res.input_ids[-1] == stories_tokenizer.eos_token_id and res.labels[-1] != IGNORE_INDEX
    assert res.input_ids == full.input_ids[:len(res.input_ids)]


def test_truncate_mid_first_response_keeps_trained_tokens(stories_tokenizer):
    tpl = load_template("alpaca")
    ex = real_examples("alpaca", 1)[0]
    (full,) = encode(stories_tokenizer, tpl, [ex])
    first_trained = next(i for i, l in enumerate(full.labels) if l != IGNORE_INDEX)
    (res,) = encode(stories_tokenizer, tpl, [ex], cutoff_len=first_trained + 3)
    assert len(res.input_ids) == first_trained + 3 and res.n_trained == 3


def test_truncation_never_leaves_zero_trained_tokens(stories_tokenizer):
    tpl = load_template("alpaca")
    ex = real_examples("alpaca", 1)[0]
    (full,) = encode(stories_tokenizer, tpl, [ex])
    first_trained = next(i for i, l in enumerate(full.labels) if l != IGNORE_INDEX)
    (res,) = encode(stories_tokenizer, tpl, [ex], cutoff_len=first_trained)
    assert isinstance(res, RowError) and res.category == "no_trained_tokens_after_truncation"
    assert res.length == len(full.input_ids)


@pytest.mark.parametrize("policy", ["drop", "error"])
def test_overlength_drop_and_error(stories_tokenizer, policy):
    tpl = load_template("alpaca")
    ex = real_examples("alpaca", 1)[0]
    (res,) = encode(stories_tokenizer, tpl, [ex], cutoff_len=20, on_overlength=policy)
    assert isinstance(res, RowError) and res.category == "overlength" and res.length > 20


def test_example_with_nothing_to_train_is_an_error(stories_tokenizer):
    ex = Example([Message("user", "hi"), Message("assistant", "")], path="f.jsonl", line=7)
    (res,) = encode(stories_tokenizer, load_template("alpaca"), [ex])
    assert isinstance(res, RowError) and res.category == "no_trained_tokens" and res.where() == "f.jsonl:7"


def test_multi_turn_with_instruction_template_is_a_row_error(stories_tokenizer):
    ex = multi_turn_examples(1, 2)[0]
    (res,) = encode(stories_tokenizer, load_template("alpaca"), [ex])
    assert isinstance(res, RowError) and res.category == "unsupported_by_template"


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
        eos_token_id = 2

    from utils.data.templates import TemplateError

    with pytest.raises(TemplateError, match="fast tokenizer"):
        Encoder(Slow(), load_template("alpaca"), cutoff_len=10, on_overlength="truncate", mask_mode="assistant")


def test_chatglm_pair_history_encodes(stories_tokenizer):
    tpl = load_template("chatglm")
    ex = Example([Message("user", "a"), Message("assistant", "b"), Message("user", "c"), Message("assistant", "d")],
                 path="t", line=1)
    (res,) = encode(stories_tokenizer, tpl, [ex])
    trained = stories_tokenizer.decode([t for t, l in zip(res.input_ids, res.labels) if l != IGNORE_INDEX])
    assert trained.replace(" ", "") == "b</s>d</s>"
    assert DATA.is_dir()


# ---------------------------------------------------------------------------------------------------
# Golden masks written by hand
# ---------------------------------------------------------------------------------------------------
# The tests above derive the expected trained spans from the template's own segments, so a wrong segment
# would pass them. Here the expected labels are written out by hand for one short example per template,
# with a word-level tokenizer built here whose tokens are words, runs of punctuation and single
# whitespace characters (and the special markers as whole tokens), so that each token is readable and
# no token straddles a trained boundary. In a golden string, ⟦...⟧ encloses the trained text and ⟨eos⟩
# marks an EOS token the encoder must insert (trained); the text outside the markers is the rendered
# prompt, which the rendering must reproduce exactly.

SPECIAL_TEXT = ["</s>", "<|Human|>", "<|Inner Thoughts|>", "<|Commands|>", "<|Results|>", "<|MOSS|>",
                "<eoh>", "<eot>", "<eoc>", "<eor>", "<eom>"]
GOLDEN_SPLIT = r"\w+|[^\w\s]+|\s"

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n")
ALPACA_INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. ")
MOSS_MESSAGES = [Message("system", "You are MOSS.\n"), Message("user", "Add 2 and 3"),
                 Message("thought", "I use the calculator"), Message("command", "Calculator(2+3)"),
                 Message("result", "5"), Message("assistant", "It is 5")]

GOLDEN = {
    # alpaca-lora: the response and EOS, nothing of the prompt.
    "alpaca": (
        "alpaca", [Message("user", "Add 2 and 3."), Message("assistant", "The sum is 5.")], None, "assistant",
        ALPACA_PREAMBLE + "### Instruction:\nAdd 2 and 3.\n\n### Response:\n⟦The sum is 5.⟨eos⟩⟧"),
    "alpaca_input": (
        "alpaca", [Message("user", "Add the numbers."), Message("assistant", "5")], "2 and 3", "assistant",
        ALPACA_INPUT_PREAMBLE + "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n⟦5⟨eos⟩⟧"),
    # FastChat's vicuna_v1.1: every answer after 'ASSISTANT:' through its '</s>' (which is EOS: none inserted).
    "vicuna_v1.1": (
        "vicuna_v1.1", [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Add 2 and 3."),
                        Message("assistant", "5")], None, "assistant",
        VICUNA_SYSTEM + "USER: Hi ASSISTANT:⟦ Hello!</s>⟧USER: Add 2 and 3. ASSISTANT:⟦ 5</s>⟧"),
    # ChatGLM-6B: '[Round N]' turns; each answer and an EOS, not the newline after it. (ChatGLM's own
    # P-tuning script trains only the last answer; this suite trains every assistant turn.)
    "chatglm": (
        "chatglm", [Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Add 2 and 3"),
                    Message("assistant", "5")], None, "assistant",
        "[Round 0]\n问：Hi\n答：⟦Hello⟨eos⟩⟧\n[Round 1]\n问：Add 2 and 3\n答：⟦5⟨eos⟩⟧\n"),
    # ChatGLM with no history: the query is sent raw, the answer follows it directly.
    "chatglm_single": (
        "chatglm", [Message("user", "Hi?"), Message("assistant", "Hello")], None, "assistant",
        "Hi?⟦Hello⟨eos⟩⟧\n"),
    # MOSS, default mode: what MOSS produces (inner thoughts and commands whole, the reply after '<|MOSS|>:'
    # through '<eom>', then EOS); not the meta instruction, the human turn or the tool results.
    "moss": (
        "moss", MOSS_MESSAGES, None, "assistant",
        "You are MOSS.\n<|Human|>: Add 2 and 3<eoh>\n⟦<|Inner Thoughts|>: I use the calculator<eot>\n"
        "<|Commands|>: Calculator(2+3)<eoc>\n⟧<|Results|>: 5<eor>\n<|MOSS|>:⟦ It is 5<eom>⟨eos⟩⟧\n"),
    # MOSS's own recipe (--mask_mode moss): everything but the meta instruction and the tool-result body.
    "moss_mode": (
        "moss", MOSS_MESSAGES, None, "moss",
        "You are MOSS.\n⟦<|Human|>: Add 2 and 3<eoh>\n<|Inner Thoughts|>: I use the calculator<eot>\n"
        "<|Commands|>: Calculator(2+3)<eoc>\n<|Results|>: ⟧5⟦<eor>\n<|MOSS|>: It is 5<eom>⟨eos⟩\n⟧"),
}


def parse_golden(golden: str) -> tuple[str, list[bool], list[int]]:
    """(plain text, per-character trained flags, character positions of inserted EOS tokens)."""
    text, trained, eos_at, inside, i = [], [], [], False, 0
    while i < len(golden):
        if golden.startswith("⟨eos⟩", i):
            assert inside, "an inserted EOS is trained: write it inside ⟦...⟧"
            eos_at.append(len(text))
            i += len("⟨eos⟩")
            continue
        ch = golden[i]
        if ch in "⟦⟧":
            assert inside == (ch == "⟧"), f"unbalanced {ch} at {i}"
            inside = not inside
        else:
            text.append(ch)
            trained.append(inside)
        i += 1
    assert not inside
    return "".join(text), trained, eos_at


@pytest.fixture(scope="module")
def word_tokenizer():
    """Word-level tokenizer over the golden texts: BOS prepended (zero-width, as Llama's), ``</s>`` EOS,
    the MOSS markers whole, every word, punctuation run and whitespace character one token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(GOLDEN_SPLIT), behavior="isolated")
    # The markers are matched before the split (as added tokens are); the words are what lies between.
    pieces = [p for *_, golden in GOLDEN.values()
              for p in re.split("|".join(map(re.escape, SPECIAL_TEXT)), parse_golden(golden)[0])]
    words = sorted({w for p in pieces for w, _ in split.pre_tokenize_str(p)})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *SPECIAL_TEXT[1:], *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.add_tokens(SPECIAL_TEXT[1:])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def golden_ids_labels(tokenizer, golden: str) -> tuple[list[int], list[int]]:
    """The expected input_ids and labels, built from the golden string alone (no template code)."""
    text, trained, eos_at = parse_golden(golden)
    enc = tokenizer.backend_tokenizer.encode(text)
    ids, labels = [], []
    for tok_id, (s, e) in zip(enc.ids, enc.offsets):
        flags = set(trained[s:e])
        assert len(flags) <= 1, f"token {text[s:e]!r} straddles a trained boundary: fix the golden tokenizer"
        ids.append(tok_id)
        labels.append(tok_id if flags == {True} else IGNORE_INDEX)
        if e > s and e in eos_at:  # an inserted EOS right after the text it ends
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    assert ids.count(tokenizer.eos_token_id) >= len(eos_at)
    assert tokenizer.convert_ids_to_tokens(ids).count("<unk>") == 0
    return ids, labels


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_token_masks(word_tokenizer, case):
    name, messages, input_text, mode, golden = GOLDEN[case]
    tpl = load_template(name)
    ex = Example(messages, path="golden", line=1, input=input_text)
    text = parse_golden(golden)[0]
    assert tpl.render(ex.messages, input=ex.input).text == text
    (res,) = encode(word_tokenizer, tpl, [ex], mask_mode=mode)
    assert isinstance(res, Encoded), res
    ids, labels = golden_ids_labels(word_tokenizer, golden)
    assert res.input_ids[0] == word_tokenizer.bos_token_id and res.labels[0] == IGNORE_INDEX
    got = [(t, label != IGNORE_INDEX) for t, label in zip(word_tokenizer.convert_ids_to_tokens(res.input_ids), res.labels)]
    want = [(t, label != IGNORE_INDEX) for t, label in zip(word_tokenizer.convert_ids_to_tokens(ids), labels)]
    assert got == want
    assert (res.input_ids, res.labels) == (ids, labels)


def test_golden_trained_text_literally(word_tokenizer):
    """The same goldens read as the trained text itself, one string per trained run (EOS as </s>)."""
    expected = {
        "alpaca": ["The sum is 5.</s>"],
        "vicuna_v1.1": [" Hello!</s>", " 5</s>"],
        "chatglm": ["Hello</s>", "5</s>"],
        "moss": ["<|Inner Thoughts|>: I use the calculator<eot>\n<|Commands|>: Calculator(2+3)<eoc>\n",
                 " It is 5<eom></s>"],
        "moss_mode": ["<|Human|>: Add 2 and 3<eoh>\n<|Inner Thoughts|>: I use the calculator<eot>\n<|Commands|>: "
                      "Calculator(2+3)<eoc>\n<|Results|>: ", "<eor>\n<|MOSS|>: It is 5<eom></s>\n"],
    }
    for case, runs in expected.items():
        name, messages, input_text, mode, _ = GOLDEN[case]
        (res,) = encode(word_tokenizer, load_template(name), [Example(messages, path="golden", line=1, input=input_text)],
                        mask_mode=mode)
        pieces, current = [], []
        for tok, label in zip(word_tokenizer.convert_ids_to_tokens(res.input_ids), res.labels):
            if label != IGNORE_INDEX:
                current.append(tok)
            elif current:
                pieces.append("".join(current))
                current = []
        pieces += ["".join(current)] if current else []
        assert pieces == runs, case
