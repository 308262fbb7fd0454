"""Tests for prompt / conversation templates (``utils/data/templates.py`` and ``templates/*.json``).

Golden strings are those of the reference projects (alpaca-lora, Vigogne, FastChat vicuna_v1.1,
LLMZoo Phoenix, ChatGLM-6B's chat(), Llama-2-chat, ChatML, MOSS); MOSS is checked against every row
of the real MOSS SFT sample.
"""

import json

import pytest

from conftest import DATA, REPO, SHARED, read_jsonl
from utils.data.templates import (TEMPLATE_DIR, Message, Rendered, TemplateError, available_templates, load_template, template_from_dict)

M = Message
BUILTIN = sorted(p.stem for p in (REPO / "templates").glob("*.json"))
INSTRUCTION = ["alpaca", "alpaca_legacy", "alpaca_short", "vigogne"]
CONVERSATION = ["chatglm", "chatml", "llama2", "moss", "phoenix", "vicuna_v1.1"]

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
VIGOGNE_NO_INPUT = (
    "Ci-dessous se trouve une instruction qui décrit une tâche. Écrivez une réponse qui complète correctement "
    "la demande.\n\n### Instruction:\n{instruction}\n\n### Réponse:\n"
)
VIGOGNE_INPUT = (
    "Ci-dessous se trouve une instruction qui décrit une tâche, associée à une entrée qui fournit un contexte "
    "supplémentaire. Écrivez une réponse qui complète correctement la demande.\n\n"
    "### Instruction:\n{instruction}\n\n### Entrée:\n{input}\n\n### Réponse:\n"
)
GOLDEN_INSTRUCTION = {
    "alpaca": (ALPACA_NO_INPUT, ALPACA_INPUT, "### Response:"),
    "alpaca_legacy": (ALPACA_NO_INPUT[:-1], ALPACA_INPUT[:-1], "### Response:"),
    "alpaca_short": ("### Instruction:\n{instruction}\n\n### Response:\n",
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n", "### Response:"),
    "vigogne": (VIGOGNE_NO_INPUT, VIGOGNE_INPUT, "### Réponse:"),
}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PHOENIX_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def text_of(name: str, messages, add_generation_prompt=True, **kw) -> str:
    return load_template(name).render(messages, add_generation_prompt=add_generation_prompt, **kw).text


# ------------------------------------------------------------------------------------------------
# Instruction templates (alpaca-lora's Prompter)
# ------------------------------------------------------------------------------------------------


def test_alpaca_golden_no_input():
    assert load_template("alpaca").generate_prompt("Tell me about alpacas.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nTell me about alpacas.\n\n### Response:\n"
    )


@pytest.mark.parametrize("name", INSTRUCTION)
def test_instruction_golden(name):
    no_input, with_input, split = GOLDEN_INSTRUCTION[name]
    t = load_template(name)
    assert t.kind == "instruction"
    instr, inp = "Tell me about alpacas.", "Alpacas live in the Andes."
    assert t.generate_prompt(instr) == no_input.format(instruction=instr)
    assert t.generate_prompt(instr, inp) == with_input.format(instruction=instr, input=inp)
    assert t.generate_prompt(instr, label="X") == no_input.format(instruction=instr) + "X"
    assert t.generate_prompt(instr, inp, label="X") == with_input.format(instruction=instr, input=inp) + "X"
    # An empty input is "no input", as in alpaca-lora.
    assert t.generate_prompt(instr, "") == no_input.format(instruction=instr)
    assert t.data["response_split"] == split


def test_alpaca_legacy_has_no_newline_after_response():
    assert load_template("alpaca_legacy").generate_prompt("I").endswith("### Response:")
    assert load_template("alpaca_legacy").generate_prompt("I", "J").endswith("### Input:\nJ\n\n### Response:")


def test_vigogne_golden_split():
    t = load_template("vigogne")
    assert t.get_response(t.generate_prompt("Bonjour ?") + " Salut !") == "Salut !"


def test_instruction_render_spans():
    t = load_template("alpaca")
    r = t.render([M("user", "Do it."), M("assistant", "Done.")], input="ctx")
    assert r.text == ALPACA_INPUT.format(instruction="Do it.", input="ctx") + "Done."
    user, assistant = r.segments
    assert (user.role, user.start, user.train_start, user.train_end) == ("user", 0, user.end, user.end)
    assert r.text[assistant.content_start:assistant.content_end] == "Done."
    assert r.text[assistant.train_start:assistant.train_end] == "Done."
    assert assistant.eos_after and not user.eos_after
    assert r.add_special_tokens is True


def test_get_response_alpaca():
    t = load_template("alpaca")
    assert t.get_response("…### Response:\n  Hi  ") == "Hi"
    assert t.get_response(t.generate_prompt("Q") + "Answer.\n\n### Instruction:\nmore") == "Answer."
    # Last split wins; a completion alone (no split) is cut at stops and stripped.
    assert t.get_response("### Response: a ### Response: b") == "b"
    assert t.get_response("  just text\n### Input:\nx") == "just text"


def test_get_response_cuts_at_conversation_stops():
    assert load_template("vicuna_v1.1").get_response(
        text_of("vicuna_v1.1", [M("user", "Hello")]) + " Hi there</s>USER: next") == "Hi there"
    assert load_template("phoenix").get_response("Human: <s>q</s>Assistant: <s>ok</s>Human: x") == "ok"
    assert load_template("chatml").get_response(
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n<|im_start|>user") == "answer"
    assert load_template("moss").get_response("<|Human|>: q<eoh>\n<|MOSS|>: reply<eom>\n<|Human|>:") == "reply"


def test_instruction_template_refuses_multi_turn():
    t = load_template("alpaca")
    with pytest.raises(TemplateError, match="conversation template"):
        t.render([M("user", "a"), M("assistant", "b"), M("user", "c"), M("assistant", "d")])
    with pytest.raises(TemplateError, match="conversation template"):
        t.render([M("system", "s"), M("user", "a")])


# ------------------------------------------------------------------------------------------------
# Conversation templates: golden strings
# ------------------------------------------------------------------------------------------------


def test_chatglm_golden_with_history():
    assert text_of("chatglm", [M("user", "a"), M("assistant", "b"), M("user", "c")]) == (
        "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答："
    )


def test_chatglm_golden_no_history_is_raw_query():
    assert text_of("chatglm", [M("user", "c")]) == "c"


def test_chatglm_rounds_count_from_zero():
    msgs = [M("user", "q1"), M("assistant", "a1"), M("user", "q2"), M("assistant", "a2"), M("user", "q3")]
    assert text_of("chatglm", msgs) == (
        "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：a2\n[Round 2]\n问：q3\n答："
    )


def test_phoenix_golden():
    assert text_of("phoenix", [M("user", "Hello")]) == (
        PHOENIX_SYSTEM + "\n\nHuman: <s>Hello</s>Assistant: <s>"
    )


def test_vicuna_golden():
    assert text_of("vicuna_v1.1", [M("user", "Hello")]) == VICUNA_SYSTEM + " USER: Hello ASSISTANT:"
    assert text_of("vicuna_v1.1", [M("user", "Hello"), M("assistant", "Hi"), M("user", "Again")]) == (
        VICUNA_SYSTEM + " USER: Hello ASSISTANT: Hi</s>USER: Again ASSISTANT:"
    )


def test_vicuna_explicit_system_replaces_default():
    assert text_of("vicuna_v1.1", [M("system", "S"), M("user", "Hello")]) == "S USER: Hello ASSISTANT:"


def test_llama2_golden():
    msgs = [M("system", "S"), M("user", "Hello"), M("assistant", "Hi"), M("user", "Again")]
    assert text_of("llama2", msgs) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHello [/INST] Hi </s><s>[INST] Again [/INST]"
    assert text_of("llama2", [M("user", "Hello")]) == "[INST] Hello [/INST]"


def test_chatml_golden():
    assert text_of("chatml", [M("system", "S"), M("user", "Hello")]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text_of("chatml", [M("user", "Hello")]) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_generation_prompt_only_when_asked():
    t = load_template("chatml")
    msgs = [M("user", "Hello"), M("assistant", "Hi")]
    assert t.render(msgs).text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n"
    assert t.render(msgs, add_generation_prompt=True).text.endswith("Hi<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------
# MOSS against the real data
# ------------------------------------------------------------------------------------------------

MOSS_FIELD_ORDER = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")


def _moss_expected(obj: dict) -> str:
    turns = sorted(obj["chat"], key=lambda k: int(k.split("_")[1]))
    return obj["meta_instruction"] + "".join(obj["chat"][k][f] for k in turns for f in MOSS_FIELD_ORDER)


def _moss_render(lineno: int, obj: dict) -> str:
    from utils.data.records import Columns, Record, parse_moss

    example = parse_moss(Record(str(DATA / "moss" / "moss_sft_sample.jsonl"), lineno, obj), Columns())
    return load_template("moss").render(example.messages).text


@pytest.fixture(scope="module")
def moss_rows() -> list[dict]:
    return read_jsonl(DATA / "moss" / "moss_sft_sample.jsonl")


def test_moss_default_system_is_meta_instruction():
    meta = (SHARED / "data" / "moss" / "meta_instruction.txt").read_text(encoding="utf-8")
    assert load_template("moss").default_system == meta


def test_moss_every_real_row_round_trips(moss_rows):
    mismatched = [i for i, obj in enumerate(moss_rows, start=1) if _moss_render(i, obj) != _moss_expected(obj)]
    assert mismatched == []


def test_moss_reply_starting_with_newline_minimal():
    obj = {"meta_instruction": "META\n", "chat": {"turn_1": {
        "Human": "<|Human|>: q<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
        "Commands": "<|Commands|>: None<eoc>\n", "Tool Responses": "<|Results|>: None<eor>\n",
        "MOSS": "<|MOSS|>: \n\nText<eom>\n"}}}
    assert _moss_render(1, obj) == _moss_expected(obj)


def test_moss_result_forms_round_trip():
    # '<|Results|>: None' keeps its space; a multi-line result is written '<|Results|>:\n...'.
    obj = {"meta_instruction": "META\n", "chat": {
        "turn_2": {"Human": "<|Human|>: again<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                   "Commands": "<|Commands|>: None<eoc>\n", "Tool Responses": "<|Results|>: None<eor>\n",
                   "MOSS": "<|MOSS|>: Done.<eom>\n"},
        "turn_1": {"Human": "<|Human|>: 2+2?<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: use calc<eot>\n",
                   "Commands": "<|Commands|>: Calculate(\"2+2\")<eoc>\n",
                   "Tool Responses": "<|Results|>:\nCalculate(\"2+2\") => 4\n<eor>\n",
                   "MOSS": "<|MOSS|>: It is 4.<eom>\n"},
    }}
    assert _moss_render(1, obj) == _moss_expected(obj)


def test_moss_real_rows_with_tool_results_round_trip(moss_rows):
    # Real rows whose tool results span lines ('<|Results|>:\n...'), with ordinary replies.
    picked = [
        (i, obj) for i, obj in enumerate(moss_rows, start=1)
        if any(t["Tool Responses"].startswith("<|Results|>:\n") for t in obj["chat"].values())
        and not any(t["MOSS"].startswith("<|MOSS|>: \n") for t in obj["chat"].values())
    ]
    assert len(picked) >= 20
    for i, obj in picked[:100]:
        assert _moss_render(i, obj) == _moss_expected(obj), f"row {i}"


def test_moss_turns_in_numeric_order():
    turn = {"Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n", "Commands": "<|Commands|>: None<eoc>\n",
            "Tool Responses": "<|Results|>: None<eor>\n"}
    chat = {f"turn_{n}": {**turn, "Human": f"<|Human|>: q{n}<eoh>\n", "MOSS": f"<|MOSS|>: a{n}<eom>\n"}
            for n in (10, 2, 1)}
    obj = {"meta_instruction": "META\n", "chat": chat}
    text = _moss_render(1, obj)
    assert text == _moss_expected(obj)
    assert text.index("q1") < text.index("q2") < text.index("q10")


# ------------------------------------------------------------------------------------------------
# Segments
# ------------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "single": [M("user", "Hello"), M("assistant", "Hi")],
    "two_turns": [M("user", "Hello"), M("assistant", "Hi there"), M("user", "Again"), M("assistant", "Sure.")],
    "system_three_turns": [M("system", "Be brief."), M("user", "Q1"), M("assistant", "A1"),
                           M("user", "Q2 多行\n内容"), M("assistant", "A2\n- item"), M("user", "Q3"),
                           M("assistant", "\nA3 starts with a newline")],
}


def _cases():
    for name in CONVERSATION:
        for conv, msgs in CONVERSATIONS.items():
            if name == "chatglm" and msgs[0].role == "system":
                continue  # ChatGLM has no system role (checked in test_template_without_system_role)
            yield pytest.param(name, msgs, id=f"{name}-{conv}")
    moss_tools = [M("user", "2+2?"), M("thought", "use the calculator"), M("command", 'Calculate("2+2")'),
                  M("result", 'Calculate("2+2") => 4'), M("assistant", "4"), M("user", "thanks"),
                  M("thought", "None"), M("command", "None"), M("result", "None"), M("assistant", "You're welcome.")]
    yield pytest.param("moss", moss_tools, id="moss-tools")


def check_segments(r: Rendered, messages, default_system: str = ""):
    text, segs = r.text, r.segments
    explicit_system = messages[0].content if messages and messages[0].role == "system" else None
    body = [m for m in messages if m.role != "system"]
    sys_segs = [s for s in segs if s.role == "system"]
    other = [s for s in segs if s.role != "system"]
    assert [s.role for s in other] == [m.role for m in body]
    if sys_segs:
        (sys_seg,) = sys_segs
        assert segs[0] is sys_seg
        expected = explicit_system if explicit_system is not None else default_system
        assert text[sys_seg.content_start:sys_seg.content_end] == expected
    for seg, m in zip(other, body):
        assert text[seg.content_start:seg.content_end] == m.content
    prev_end = 0
    for s in segs:
        assert prev_end <= s.start <= s.content_start <= s.content_end <= s.end <= len(text)
        prev_end = s.end
        if s.role == "assistant":
            assert s.eos_after is True
            assert s.start <= s.train_start < s.train_end <= s.end
            trained = text[s.train_start:s.train_end]
            assert text[s.content_start:s.content_end] in trained
        elif s.role in ("user", "system", "result"):
            assert s.eos_after is False
            assert s.train_start == s.train_end
        else:  # MOSS thoughts / commands are produced by the model: trained, no EOS
            assert s.eos_after is False
            assert s.start <= s.train_start <= s.train_end <= s.end


@pytest.mark.parametrize("name, messages", list(_cases()))
def test_segments_locate_every_message(name, messages):
    t = load_template(name)
    for gen in (False, True):
        r = t.render(messages, add_generation_prompt=gen)
        check_segments(r, messages, t.default_system)
        assert r.add_special_tokens is True
    # The segments account for the whole text (no hidden message), apart from the generation prompt.
    plain = t.render(messages)
    assert plain.segments[-1].end == len(plain.text)


def test_segments_default_system_present():
    for name, system in (("vicuna_v1.1", VICUNA_SYSTEM), ("phoenix", PHOENIX_SYSTEM)):
        r = load_template(name).render([M("user", "Hello"), M("assistant", "Hi")])
        assert r.segments[0].role == "system"
        assert r.text[r.segments[0].content_start:r.segments[0].content_end] == system


def test_assistant_train_span_excludes_generation_prompt_and_trailing_newline():
    r = load_template("chatml").render([M("user", "Hello"), M("assistant", "Hi")])
    a = r.segments[1]
    assert r.text[a.start:a.train_start] == "<|im_start|>assistant\n"
    assert r.text[a.train_start:a.train_end] == "Hi<|im_end|>"
    assert r.text[a.train_end:a.end] == "\n"


def test_template_without_system_role():
    with pytest.raises(TemplateError, match="no system role"):
        load_template("chatglm").render([M("system", "S"), M("user", "a"), M("assistant", "b")])


def test_system_message_only_first():
    with pytest.raises(TemplateError, match="only allowed first"):
        load_template("chatml").render([M("user", "a"), M("system", "S"), M("assistant", "b")])


# ------------------------------------------------------------------------------------------------
# Every built-in template file
# ------------------------------------------------------------------------------------------------


def test_builtin_list_matches_files():
    assert available_templates() == BUILTIN
    assert set(INSTRUCTION + CONVERSATION + ["tokenizer"]) == set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_template_file_loads_and_renders(name, bpe_tokenizer):
    t = load_template(name, bpe_tokenizer if name == "tokenizer" else None)
    assert t.stop and all(isinstance(s, str) and s for s in t.stop)
    if name in INSTRUCTION:
        msgs = [M("user", "Name a colour."), M("assistant", "Blue.")]
    else:
        msgs = [M("user", "Name a colour."), M("assistant", "Blue."), M("user", "Another?"), M("assistant", "Red.")]
    r = t.render(msgs)
    pos = 0
    for m in msgs:
        pos = r.text.index(m.content, pos) + len(m.content)
    assert [s.role for s in r.segments if s.role != "system"] == [m.role for m in msgs]
    # The template's data is what gets saved with an artifact: it must be JSON.
    assert json.loads(json.dumps(t.to_json()))["name"] == name


def test_tokenizer_template_without_chat_template(stories_tokenizer):
    assert not getattr(stories_tokenizer, "chat_template", None)
    with pytest.raises(TemplateError) as info:
        load_template("tokenizer", stories_tokenizer)
    msg = str(info.value)
    assert "chat_template" in msg
    assert "vicuna_v1.1" in msg  # points at the named templates


def test_tokenizer_template_without_tokenizer():
    with pytest.raises(TemplateError, match="chat_template"):
        load_template("tokenizer")


def test_templates_found_relative_to_package(tmp_path, monkeypatch):
    # A decoy templates/ folder in the working directory must not be used.
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "alpaca.json").write_text(json.dumps(
        {"prompt_input": "X {instruction} {input}", "prompt_no_input": "X {instruction}", "response_split": "X"}))
    monkeypatch.chdir(tmp_path)
    assert TEMPLATE_DIR == REPO / "templates"
    assert load_template("alpaca").generate_prompt("I") == ALPACA_NO_INPUT.format(instruction="I")
    assert "vicuna_v1.1" in available_templates()


# ------------------------------------------------------------------------------------------------
# User templates and malformed templates
# ------------------------------------------------------------------------------------------------


def test_user_instruction_template_by_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({
        "prompt_input": "Q: {instruction}\nC: {input}\nA:", "prompt_no_input": "Q: {instruction}\nA:",
        "response_split": "A:", "stop": ["Q:"],
    }), encoding="utf-8")
    t = load_template(str(path))
    assert t.name == "mine" and t.kind == "instruction"
    assert t.generate_prompt("hi") == "Q: hi\nA:"
    assert t.generate_prompt("hi", "ctx", label=" yo") == "Q: hi\nC: ctx\nA: yo"
    assert t.get_response("Q: hi\nA: yo\nQ: more") == "yo"


def test_user_conversation_template_by_path(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps({
        "name": "my_chat", "system": "Be nice.", "system_format": "SYS {system}\n",
        "user_format": "U{round}: {content}\n", "assistant_format": "A: {content}<end>\n",
        "generation_prompt": "A:", "response_split": "A:", "stop": ["<end>"],
    }), encoding="utf-8")
    t = load_template(str(path))
    assert t.name == "my_chat" and t.kind == "conversation"
    msgs = [M("user", "hi"), M("assistant", "yo"), M("user", "bye")]
    r = t.render(msgs, add_generation_prompt=True)
    assert r.text == "SYS Be nice.\nU0: hi\nA: yo<end>\nU1: bye\nA:"
    check_segments(r, msgs, t.default_system)
    assert t.get_response(r.text + " later<end>\n") == "later"


def _write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_missing_key_named(tmp_path):
    path = _write(tmp_path, {"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}"})
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert "response_split" in str(info.value) and "bad.json" in str(info.value)
    path = _write(tmp_path, {"user_format": "U: {content}"}, "conv.json")
    with pytest.raises(TemplateError, match="assistant_format") as info:
        load_template(path)
    assert "conv.json" in str(info.value)


def test_unknown_placeholder_named(tmp_path):
    path = _write(tmp_path, {"user_format": "U: {content} {speaker}", "assistant_format": "A: {content}"})
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert "user_format" in str(info.value) and "speaker" in str(info.value) and "bad.json" in str(info.value)
    path = _write(tmp_path, {"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction} {input}",
                             "response_split": "A:"}, "instr.json")
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert "prompt_no_input" in str(info.value) and "input" in str(info.value)


def test_content_twice_named(tmp_path):
    path = _write(tmp_path, {"user_format": "U: {content}", "assistant_format": "A: {content} {content}"})
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert "assistant_format" in str(info.value) and "{content}" in str(info.value)
    assert "bad.json" in str(info.value)


def test_content_missing_named(tmp_path):
    path = _write(tmp_path, {"user_format": "U:", "assistant_format": "A: {content}"})
    with pytest.raises(TemplateError, match="user_format"):
        load_template(path)


def test_capitalised_placeholder_rejected(tmp_path):
    path = _write(tmp_path, {"user_format": "U: {content} {Name}", "assistant_format": "A: {content}"})
    with pytest.raises(TemplateError, match="user_format"):
        load_template(path).render([M("user", "hi"), M("assistant", "yo")])


def test_instruction_prompt_without_instruction_rejected(tmp_path):
    path = _write(tmp_path, {"prompt_input": "{instruction}\n{input}\n### Response:\n",
                             "prompt_no_input": "### Response:\n", "response_split": "### Response:"})
    with pytest.raises(TemplateError, match="prompt_no_input"):
        load_template(path)


def test_bad_stop_rejected(tmp_path):
    path = _write(tmp_path, {"user_format": "U: {content}", "assistant_format": "A: {content}", "stop": [""]})
    with pytest.raises(TemplateError, match="stop"):
        load_template(path)


def test_generation_prompt_must_prefix_assistant_format(tmp_path):
    path = _write(tmp_path, {"user_format": "U: {content}", "assistant_format": "A: {content}",
                             "generation_prompt": "B:"})
    with pytest.raises(TemplateError, match="generation_prompt"):
        load_template(path)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(TemplateError, match="not found"):
        load_template(str(tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(TemplateError, match="broken.json"):
        load_template(str(broken))
    unknown_schema = _write(tmp_path, {"foo": "bar"}, "schema.json")
    with pytest.raises(TemplateError, match="not a known schema"):
        load_template(unknown_schema)


def test_unknown_name_lists_builtins():
    with pytest.raises(TemplateError) as info:
        load_template("alpacca")
    msg = str(info.value)
    assert "alpacca" in msg
    for name in BUILTIN:
        assert name in msg


def test_role_without_format_rejected():
    with pytest.raises(TemplateError, match="thought"):
        load_template("chatml").render([M("user", "a"), M("thought", "hmm"), M("assistant", "b")])


def test_template_from_dict_conversation():
    t = template_from_dict({"user_format": "<{content}>", "assistant_format": "[{content}]"}, name="d")
    assert t.render([M("user", "a"), M("assistant", "b")], add_generation_prompt=True).text == "<a>[b]["


# ------------------------------------------------------------------------------------------------
# The tokenizer's own chat_template (Jinja)
# ------------------------------------------------------------------------------------------------

JINJA_CONV = [M("system", "You are terse."), M("user", "Hello"), M("assistant", "Hi there"),
              M("user", "Again\nplease"), M("assistant", "Sure.")]


def test_jinja_template_render_and_spans(bpe_tokenizer):
    t = load_template("tokenizer", bpe_tokenizer)
    assert t.kind == "jinja"
    r = t.render(JINJA_CONV)
    expected = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in JINJA_CONV)
    assert r.text == expected
    assert r.add_special_tokens is False
    check_segments(r, JINJA_CONV)
    assert [s.role for s in r.segments] == [m.role for m in JINJA_CONV]
    assert r.segments[-1].end == len(r.text)
    for s, m in zip(r.segments, JINJA_CONV):
        assert r.text[s.content_start:s.content_end] == m.content
        if m.role == "assistant":
            assert r.text[s.start:s.train_start] == "<|im_start|>assistant\n"
            assert r.text[s.train_start:s.train_end] == m.content + "<|im_end|>"
            assert r.text[s.train_end:s.end] == "\n"


def test_jinja_template_stop_generation_prompt_and_response(bpe_tokenizer):
    t = load_template("tokenizer", bpe_tokenizer)
    assert "<|im_end|>" in t.stop
    assert t.generation_prompt == "<|im_start|>assistant\n"
    prompt = t.render([M("user", "q")], add_generation_prompt=True).text
    assert prompt == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert t.get_response(prompt + "answer<|im_end|>\n<|im_start|>user\nmore") == "answer"


def test_jinja_template_with_bos_in_template(stories_chat_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_chat_tokenizer_dir), local_files_only=True)
    t = load_template("tokenizer", tok)
    msgs = [M("user", "Hello"), M("assistant", "Hi")]
    r = t.render(msgs)
    assert r.text == tok.bos_token + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n"
    # The template writes BOS itself, so the tokenizer must not add it again.
    assert r.add_special_tokens is False
    check_segments(r, msgs)
    assert r.segments[0].start == 0
    assert r.text[r.segments[1].train_start:r.segments[1].train_end] == "Hi<|im_end|>"


def test_jinja_content_span_not_inside_header(bpe_tokenizer):
    t = load_template("tokenizer", bpe_tokenizer)
    r = t.render([M("system", "system"), M("user", "s"), M("assistant", "a")])
    for seg in r.segments:
        header = f"<|im_start|>{seg.role}\n"
        assert seg.content_start == seg.start + len(header)


def test_jinja_input_joined_to_first_user_message(bpe_tokenizer):
    t = load_template("tokenizer", bpe_tokenizer)
    r = t.render([M("user", "Summarise"), M("assistant", "Ok")], input="the text")
    assert "<|im_start|>user\nSummarise\n\nthe text<|im_end|>" in r.text


def test_jinja_unknown_role_rejected(bpe_tokenizer):
    with pytest.raises(TemplateError, match="thought"):
        load_template("tokenizer", bpe_tokenizer).render([M("user", "a"), M("thought", "b")])
