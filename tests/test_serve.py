"""serve.py through the official ``openai`` SDK, as a user starts it (a subprocess on 127.0.0.1): chat and
completions, streaming, echo + logprobs against a plain transformers forward, n, stop strings, equality with
generate.py and with the engine's own chat rendering, the SDK's exceptions, batch invariance under concurrency,
and every kind of artifact served unmerged (LoRA, DoRA, prefix, a merged export; several adapters together)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, REPO, STORIES, gsm8k_rows, prepare_gsm8k, run_finetune
from serving import start_server

pytestmark = pytest.mark.slow  # every test here talks to a server subprocess that loads a model

QUESTIONS = [json.loads(line)["text"] for line in (DATA / "vicuna_question_80.jsonl").read_text().splitlines()[:16]]


def client(url: str, key: str = "none", retries: int = 0):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=120)


@pytest.fixture(scope="module")
def base_url():
    with start_server("--base_model", str(STORIES)) as server:
        yield server.url


def chat(c, question: str, model: str = "hf", **kw) -> str:
    kw = {"temperature": 0, "max_tokens": 48, **kw}
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)
    return out.choices[0].message.content


def generate_py(*args: str) -> str:
    """generate.py's one-shot answer (stdout less the newline it ends with)."""
    proc = subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


def test_chat_streaming_deltas_join_to_the_non_streamed_text(base_url):
    c = client(base_url)
    whole = c.chat.completions.create(model="hf", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                                      max_tokens=64)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model="hf", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            temperature=0, max_tokens=64, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([d for d in deltas if d]) >= 3  # streamed, not one piece
    assert "".join(deltas) == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def hf_logprobs(ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token_ids"])
def test_echo_logprobs_equal_a_plain_transformers_forward(base_url, stories_tokenizer, as_ids):
    text = "Once upon a time, there was a little dog named Max. Max liked to run"
    ids = stories_tokenizer(text)["input_ids"]
    out = client(base_url).completions.create(model="hf", prompt=[ids] if as_ids else text, echo=True, logprobs=5,
                                              max_tokens=1, temperature=0, seed=1234)
    lp = out.choices[0].logprobs
    ref = hf_logprobs(ids)
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - float(ref[j - 1, ids[j]])) < 1e-4, j
        top = torch.topk(ref[j - 1], 5)
        assert sorted(lp.top_logprobs[j].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
    generated = int(ref[-1].argmax())
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, generated]), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    if as_ids:  # echoed as decoded, special tokens included: the pieces add up to it
        assert "".join(lp.tokens) == out.choices[0].text
    else:  # echoed as given, then the continuation
        assert out.choices[0].text.startswith(text) and "".join(lp.tokens).endswith(out.choices[0].text[len(text):])


def test_models_n_and_stop_strings(base_url):
    c = client(base_url)
    assert [m.id for m in c.models.list().data] == ["hf"]
    two = c.chat.completions.create(model="hf", messages=[{"role": "user", "content": QUESTIONS[1]}], n=2,
                                    temperature=0.9, seed=3, max_tokens=32)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content  # its own generator per choice
    full = chat(c, QUESTIONS[1], max_tokens=64)
    word = full.split()[3]
    cut = chat(c, QUESTIONS[1], max_tokens=64, stop=[word, "zzzz"])
    assert cut == full[:full.index(word)]
    streamed = c.chat.completions.create(model="hf", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                         temperature=0, max_tokens=64, stop=[word], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == cut


def test_greedy_text_equals_generate_py_and_the_engines_chat_rendering(base_url):
    from utils.data.templates import Message
    from utils.inference.generation import Engine
    from utils.inference.loading import load_for_inference
    from utils.inference.settings import Settings

    c = client(base_url)
    prompt = "Once upon a time, there was a little girl"
    served = c.completions.create(model="hf", prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    assert served == generate_py("--base_model", str(STORIES), "--prompt", prompt, "--max_new_tokens", "40")
    loaded = load_for_inference(str(STORIES), prompt_template="alpaca", log=lambda m: None)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.template)
    rendered = loaded.template.render([Message("user", QUESTIONS[2])], add_generation_prompt=True)
    ids = engine.encode(rendered.text, add_special_tokens=rendered.add_special_tokens)
    ours = engine.generate([ids], Settings(max_new_tokens=48))[0].text
    assert chat(c, QUESTIONS[2]) == ours


def test_concurrent_greedy_requests_each_give_what_they_give_alone(base_url):
    c = client(base_url)
    alone = [chat(c, q, max_tokens=64) for q in QUESTIONS]
    sampled = dict(temperature=1.0, top_p=0.9, seed=11, max_tokens=48)
    sampled_alone = chat(c, QUESTIONS[5], **sampled)
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        jobs = [pool.submit(chat, c, q, max_tokens=64) for q in QUESTIONS]
        seeded = pool.submit(chat, c, QUESTIONS[5], **sampled)
        together = [j.result() for j in jobs]
    assert together == alone
    assert seeded.result() == sampled_alone


def test_sdk_exceptions_for_400_401_404_and_429():
    import openai

    with start_server("--base_model", str(STORIES), "--api_key", "sekret", "--max_batch_size", "1",
                      "--max_queue", "0") as server:
        url = server.url
        good = client(url, "sekret")
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        with pytest.raises(openai.BadRequestError) as bad:
            good.chat.completions.create(model="hf", messages=[], max_tokens=4)
        assert bad.value.body["param"] == "messages"
        with pytest.raises(openai.NotFoundError):
            good.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        long = good.chat.completions.create(model="hf", messages=[{"role": "user", "content": "Tell a story"}],
                                            max_tokens=400, extra_body={"ignore_eos": True}, stream=True)
        next(iter(long))  # running: the one row of the batch is taken, and nothing may wait
        with pytest.raises(openai.RateLimitError):
            good.chat.completions.create(model="hf", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        long.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """LoRA, DoRA and prefix adapters trained by finetune.py on stories260K, and the LoRA merged by export_hf.py."""
    root = tmp_path_factory.mktemp("serve_runs")
    data = prepare_gsm8k(root, gsm8k_rows(24), "--cutoff_len", "192", "--val_set_size", "0")
    common = ["--max_steps", "2", "--batch_size", "8", "--micro_batch_size", "8", "--logging_steps", "0"]
    out = {
        "lora": run_finetune(root / "lora", data, "--method", "lora", "--learning_rate", "2e-2", *common),
        "dora": run_finetune(root / "dora", data, "--method", "lora", "--use_dora", "--learning_rate", "2e-2",
                             *common),
        "prefix": run_finetune(root / "prefix", data, "--method", "prefix", "--num_virtual_tokens", "4",
                               "--learning_rate", "1e-1", *common),
    }
    merged = root / "merged"
    proc = subprocess.run([sys.executable, "export_hf.py", "--lora_weights", str(out["lora"]), "--output_dir",
                           str(merged)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out["merged"] = merged
    return out


def test_every_artifact_served_unmerged_answers_as_generate_py_does(artifacts):
    """One process serves the LoRA, the DoRA and the prefix adapter of one base (and the base itself); each
    answers exactly as generate.py does on that artifact alone, and the merged export served on its own answers
    as generate.py does on it."""
    question = gsm8k_rows(30)[-1]["instruction"]
    expected = {name: generate_py("--lora_weights", str(path), "--instruction", question, "--max_new_tokens", "32")
                for name, path in artifacts.items() if name != "merged"}
    expected["hf"] = generate_py("--base_model", str(STORIES), "--instruction", question, "--max_new_tokens", "32")
    assert len(set(expected.values())) >= 3  # the adapters change the answer: the comparison means something
    with start_server("--lora_weights", str(artifacts["lora"]), "--model_name", "lora", "--adapters",
                      f"dora={artifacts['dora']},prefix={artifacts['prefix']}") as server:
        c = client(server.url)
        assert sorted(m.id for m in c.models.list().data) == ["dora", "hf", "lora", "prefix"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # all four at once: rows of every variant interleave
            got = {name: pool.submit(chat, c, question, model=name, max_tokens=32) for name in expected}
            got = {name: f.result() for name, f in got.items()}
    assert got == expected
    merged = generate_py("--base_model", str(artifacts["merged"]), "--instruction", question, "--max_new_tokens", "32")
    assert merged == expected["lora"]
    with start_server("--base_model", str(artifacts["merged"])) as server:
        assert chat(client(server.url), question, model="merged", max_tokens=32) == merged


def test_chatglm_route_is_stateless_and_validated(base_url):
    import httpx

    r = httpx.post(base_url + "/", json={"prompt": "你好", "history": []}, timeout=120)
    body = r.json()
    assert r.status_code == 200 and body["status"] == 200 and body["history"] == [["你好", body["response"]]]
    assert len(body["time"]) == len("2026-01-01 00:00:00")
    r = httpx.post(base_url + "/", json={"prompt": "hi", "history": [["only one"]]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "history.0"


def test_sampling_defaults_come_from_the_artifacts_generation_config(tmp_path):
    """A model whose generation config samples (temperature 0.8, top_p 0.9) is served sampling by default: a seeded
    request without temperature gives what the same request with those values gives, not the greedy text."""
    import shutil

    folder = tmp_path / "sampling"
    shutil.copytree(STORIES, folder)
    config = json.loads((folder / "generation_config.json").read_text()) if (
        folder / "generation_config.json").is_file() else {}
    config.update(do_sample=True, temperature=0.8, top_p=0.9)
    (folder / "generation_config.json").write_text(json.dumps(config))
    with start_server("--base_model", str(folder)) as server:
        c = client(server.url)
        ask = dict(model="sampling", prompt="Once upon a time", max_tokens=32, seed=5)
        default = c.completions.create(**ask).choices[0].text
        explicit = c.completions.create(**ask, temperature=0.8, top_p=0.9).choices[0].text
        greedy = c.completions.create(**ask, temperature=0).choices[0].text
    assert default == explicit != greedy
