"""``serve.py`` under bad input, hostile clients, overload, disconnects, timeouts and shutdown.

Every test runs against a real server subprocess on stories260K, started as a user would (``tests/serving.py``),
and talks to it over HTTP with httpx or a raw socket. Servers are shared per configuration (module-scoped
fixtures); each test leaves its server idle. Expected values are read from the server's own flags, the
tokenizer, the request sent, or the response's ``usage``, never written in.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import REPO, STORIES
from serving import free_port, launch, metrics, offline_env, server_env, sse_data, start_server, stop

BASE = ("--base_model", str(STORIES))
MAX_LEN = 256  # --max_model_len of the shared server
MAX_N = 2  # --max_n of the shared server
BATCH = 16  # --max_batch_size of the shared server (its default)
PROMPT = "Once upon a time"
POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/")
GAUGES = ("serve_requests_running", "serve_requests_waiting", "serve_batch_rows")
GENERATED = "serve_generation_tokens_total"
# What a message must not leak: a traceback, or a path into this machine's folders.
LEAKS = re.compile(r"Traceback|File \"|/(home|root|usr|tmp|work|opt|var|etc|srv|mnt|proc)\b|site-packages")


# -- shared servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The server most tests share: default batch (16) and queue (64), a 256-token context, at most 2 choices."""
    with start_server(*BASE, "--max_model_len", str(MAX_LEN), "--max_n", str(MAX_N),
                      log_dir=tmp_path_factory.mktemp("api")) as s:
        yield s


@pytest.fixture(scope="module")
def model_id(api):
    return httpx.get(api.url + "/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def vocab_size(stories_tokenizer):
    return len(stories_tokenizer)


# -- helpers -------------------------------------------------------------------------------------------------


def post_raw(url: str, path: str, content: bytes | str, timeout: float = 120, **kw) -> httpx.Response:
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **kw.pop(
        "headers", {})}, timeout=timeout, **kw)


def post(url: str, path: str, body, timeout: float = 120, **kw) -> httpx.Response:
    # json.dumps writes float("nan") / float("inf") as the bare NaN / Infinity that Python's json accepts.
    return post_raw(url, path, json.dumps(body), timeout=timeout, **kw)


def assert_error(r: httpx.Response, status: int, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    """``r`` is OpenAI's error shape with this status / type (/ param / code), its message free of paths and
    tracebacks; returns the error object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert err["type"] == type, err
    assert isinstance(err["message"], str) and err["message"], err
    assert not LEAKS.search(err["message"]) and str(REPO) not in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate()`` until it returns something truthy; that value, or an AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:g} s (last: {last!r})")


def gauges(url: str, **want: float) -> dict | None:
    """The metrics if each named gauge (``running=2`` for serve_requests_running, ...) has the wanted value."""
    m = metrics(url)
    names = {"running": "serve_requests_running", "waiting": "serve_requests_waiting", "rows": "serve_batch_rows"}
    return m if all(m[names[k]] == v for k, v in want.items()) else None


def idle(url: str) -> dict | None:
    """The metrics if no request runs or waits and the batch is empty, else None."""
    return gauges(url, running=0, waiting=0, rows=0)


def assert_settles(url: str, within: float = 2.0) -> float:
    """Within ``within`` seconds the gauges are back to 0, and no more tokens are generated (read twice, 0.5 s
    apart); returns the generated-token count."""
    m = wait_for(lambda: idle(url), within, what="running / waiting / batch rows back to 0")
    time.sleep(0.5)
    again = metrics(url)
    assert again[GENERATED] == m[GENERATED], "tokens are still being generated after every request ended"
    return again[GENERATED]


def long_completion(max_tokens: int, **extra) -> dict:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **extra}


@dataclass
class Streamed:
    """A streaming request's answer: its status and headers, and its ``data:`` payloads (the body when not 200)."""

    status: int
    headers: httpx.Headers
    payloads: list[str]


def stream(url: str, path: str, body: dict, started: threading.Event | None = None,
           timeout: float = 300) -> Streamed:
    """POST a streaming request and read it to the end. ``started`` is set once the first payload carrying
    generated text has arrived."""
    with httpx.Client(timeout=timeout) as client:
        with client.stream("POST", url + path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                return Streamed(r.status_code, r.headers, [r.text])
            payloads = []
            for data in sse_data(r.iter_lines()):
                payloads.append(data)
                if started is not None and _has_text(data):
                    started.set()
            return Streamed(200, r.headers, payloads)


def _has_text(data: str) -> bool:
    if data == "[DONE]":
        return False
    chunk = json.loads(data)
    return any(c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", []))


def stream_outcome(payloads: list[str]) -> dict:
    """A stream's payloads -> {"finish": finish reasons, "errors", "done": [DONE] count, "usage", "tail": the last
    three payloads (for the failure message)}."""
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    out = {"finish": [], "errors": [], "done": payloads.count("[DONE]"), "usage": None, "tail": payloads[-3:]}
    for data in payloads[:-1]:
        chunk = json.loads(data)
        if "error" in chunk:
            out["errors"].append(chunk["error"])
            continue
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for c in chunk["choices"]:
            out["finish"] += [c["finish_reason"]] if c.get("finish_reason") else []
    return out


# -- malformed bodies ----------------------------------------------------------------------------------------

MALFORMED = {
    "truncated JSON": b'{"model": ',
    "single quotes": b"{'prompt': 'x'}",
    "trailing comma": b'{"prompt": "x",}',
    "a string": b'"a string"',
    "a list": b"[1, 2]",
    "a number": b"42",
    "null": b"null",
    "empty": b"",
    "not UTF-8": b'{"prompt": "\xff\xfe"}',
}


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_body_is_a_400_in_openai_shape(api, route, body):
    assert_error(post_raw(api.url, route, body), 400, param="body")


@pytest.mark.parametrize("method, path", [("GET", "/no/such/route"), ("DELETE", "/v1/models"),
                                          ("GET", "/v1/completions")])
def test_unknown_route_or_method_answers_in_openai_shape(api, method, path):
    """Even the router's own 404 / 405 answer with OpenAI's error object, not FastAPI's ``{"detail": ...}``."""
    r = httpx.request(method, api.url + path, timeout=10)
    assert r.status_code in (404, 405), r.text
    assert_error(r, r.status_code)


# -- invalid fields --------------------------------------------------------------------------------------------

DROP = object()  # a field left out of the request


CHAT_MESSAGES = [{"role": "user", "content": "Hello"}]
CHAT_CASES = [
    ("messages missing", {"messages": DROP}, "messages"),
    ("messages empty", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "Hello"}, "messages"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("role missing", {"messages": [{"content": "hi"}]}, "messages"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,"}}]}]}, "messages"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens -1", {"max_tokens": -1}, "max_tokens"),
    ("max_tokens over the context", {"max_tokens": MAX_LEN}, "max_tokens"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("n 0", {"n": 0}, "n"),
    ("n -1", {"n": -1}, "n"),
    ("n over --max_n", {"n": MAX_N + 1}, "n"),
    ("temperature NaN", {"temperature": float("nan")}, "temperature"),
    ("temperature Infinity", {"temperature": float("inf")}, "temperature"),
    ("temperature -1", {"temperature": -1}, "temperature"),
    ("temperature 2.5", {"temperature": 2.5}, "temperature"),
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p"),
    ("top_p NaN", {"top_p": float("nan")}, "top_p"),
    ("top_logprobs 21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("five stop strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("min_tokens over max_tokens", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("tool_choice", {"tool_choice": "required"}, "tool_choice"),
    ("logit_bias", {"logit_bias": {"1": 5}}, "logit_bias"),
    ("presence_penalty", {"presence_penalty": 0.5}, "presence_penalty"),
    ("frequency_penalty", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("response_format json_object", {"response_format": {"type": "json_object"}}, "response_format"),
    ("seed not a number", {"seed": "abc"}, "seed"),
]

# A patch may depend on the vocabulary size: a function of it.
COMPLETION_CASES = [
    ("prompt missing", {"prompt": DROP}, "prompt"),
    ("prompt empty string", {"prompt": ""}, "prompt"),
    ("prompt empty list", {"prompt": []}, "prompt"),
    ("prompt empty token list", {"prompt": [[]]}, "prompt"),
    ("prompt list with an empty string", {"prompt": ["a", ""]}, "prompt"),
    ("token id = vocabulary size", lambda vocab: {"prompt": [1, vocab]}, "prompt"),
    ("negative token id", {"prompt": [1, -1]}, "prompt"),
    ("token id far outside", {"prompt": [[1, 2], [10 ** 12]]}, "prompt"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens -1", {"max_tokens": -1}, "max_tokens"),
    ("max_tokens over the context", {"max_tokens": MAX_LEN}, "max_tokens"),
    ("default max_tokens over the context", {"prompt": [1] * (MAX_LEN - 1), "max_tokens": DROP}, "max_tokens"),
    ("prompt alone over the context", {"prompt": [1] * (MAX_LEN + 1)}, "prompt"),
    ("n 0", {"n": 0}, "n"),
    ("n -1", {"n": -1}, "n"),
    ("n over --max_n", {"n": MAX_N + 1}, "n"),
    ("more prompts x n than the batch", {"prompt": ["a"] * (BATCH + 1)}, "prompt"),
    ("temperature NaN", {"temperature": float("nan")}, "temperature"),
    ("temperature Infinity", {"temperature": float("inf")}, "temperature"),
    ("temperature -1", {"temperature": -1}, "temperature"),
    ("temperature 2.5", {"temperature": 2.5}, "temperature"),
    ("top_p 0", {"top_p": 0}, "top_p"),
    ("top_p 1.5", {"top_p": 1.5}, "top_p"),
    ("logprobs -1", {"logprobs": -1}, "logprobs"),
    ("logprobs 6", {"logprobs": 6}, "logprobs"),
    ("five stop strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("empty stop string", {"stop": [""]}, "stop"),
    ("logit_bias", {"logit_bias": {"1": 5}}, "logit_bias"),
    ("presence_penalty", {"presence_penalty": 0.5}, "presence_penalty"),
    ("frequency_penalty", {"frequency_penalty": -0.5}, "frequency_penalty"),
    ("suffix", {"suffix": "The end."}, "suffix"),
    ("best_of other than n", {"best_of": 2}, "best_of"),
    ("top_k below -1", {"top_k": -2}, "top_k"),
    ("repetition_penalty 0", {"repetition_penalty": 0}, "repetition_penalty"),
]


def _body(base: dict, patch: dict) -> dict:
    body = {**base, **patch}
    return {k: v for k, v in body.items() if v is not DROP}


@pytest.mark.parametrize("patch, param", [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_invalid_chat_field_is_a_400_naming_it(api, model_id, patch, param):
    base = {"model": model_id, "messages": CHAT_MESSAGES, "max_tokens": 4}
    err = assert_error(post(api.url, "/v1/chat/completions", _body(base, patch)), 400)
    assert err["param"] == param or (param == "messages" and str(err["param"]).startswith("messages")), err


@pytest.mark.parametrize("patch, param", [c[1:] for c in COMPLETION_CASES], ids=[c[0] for c in COMPLETION_CASES])
def test_invalid_completion_field_is_a_400_naming_it(api, model_id, vocab_size, patch, param):
    patch = patch(vocab_size) if callable(patch) else patch
    base = {"model": model_id, "prompt": PROMPT, "max_tokens": 4}
    err = assert_error(post(api.url, "/v1/completions", _body(base, patch)), 400)
    assert err["param"] == param, err


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
])
def test_unknown_extra_fields_are_accepted(api, model_id, route, body):
    r = post(api.url, route, {"model": model_id, **body, "user": "alice", "metadata": {"team": "a"},
                              "some_future_field": [1, {"x": None}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
    ("/tokenize", {"prompt": PROMPT}),
    ("/detokenize", {"tokens": [1, 2]}),
])
def test_unknown_model_is_a_404(api, model_id, route, body):
    assert_error(post(api.url, route, {**body, "model": model_id + "-nope"}), 404, param="model",
                 code="model_not_found")


def test_server_is_healthy_after_the_bad_requests(api, model_id):
    """After every refusal above, the server still answers a valid request in full."""
    assert httpx.get(api.url + "/health", timeout=10).status_code == 200
    r = post(api.url, "/v1/completions", {"model": model_id, **long_completion(8)})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert idle(api.url), "requests still running or waiting"


# -- sampling values that are valid but extreme ------------------------------------------------------------


@pytest.mark.parametrize("extreme", [{"temperature": 1e-40}, {"temperature": 5e-324},
                                     {"repetition_penalty": 5e-324, "temperature": 1.0},
                                     {"top_p": 5e-324, "temperature": 1.0}],
                         ids=["temperature 1e-40", "temperature 5e-324", "repetition_penalty 5e-324", "top_p 5e-324"])
def test_extreme_sampling_value_fails_neither_itself_nor_its_neighbours(api, model_id, extreme):
    """A value the schema admits (a denormal temperature / penalty) is answered (200, or 400 naming it), never
    with a 5xx, and it does not end the other requests decoding in the same batch."""
    name = next(iter(extreme))
    started = threading.Event()
    neighbour_body = {"model": model_id, **long_completion(MAX_LEN - 16)}
    with ThreadPoolExecutor(1) as pool:
        neighbour = pool.submit(stream, api.url, "/v1/completions", neighbour_body, started)
        assert started.wait(60), "the neighbour stream never started"
        r = post(api.url, "/v1/completions", {"model": model_id, "prompt": PROMPT, "max_tokens": 4, **extreme})
        answer = neighbour.result(timeout=300)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert_error(r, 400, param=name)
    assert answer.status == 200
    outcome = stream_outcome(answer.payloads)
    assert outcome["errors"] == [] and outcome["finish"] == ["length"], outcome


# -- sizes --------------------------------------------------------------------------------------------------------

HUGE_TEXT = "Once upon a time, there was a little girl. " * 4600  # ~200k characters: under the body limit


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": HUGE_TEXT, "max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": ["short", HUGE_TEXT], "max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE_TEXT}], "max_tokens": 4}, "messages"),
    ("/tokenize", {"prompt": HUGE_TEXT}, "prompt"),
    ("/", {"prompt": HUGE_TEXT}, "prompt"),
], ids=["completions", "completions list", "chat", "tokenize", "chatglm"])
def test_over_context_prompt_is_refused_before_the_tokenizer(api, route, body, param):
    assert 150_000 < len(json.dumps(body)) < 4 * 1024 * 1024
    calls = metrics(api.url)["serve_tokenizer_calls_total"]
    assert_error(post(api.url, route, body), 400, param=param, code="context_length_exceeded")
    assert metrics(api.url)["serve_tokenizer_calls_total"] == calls, "the tokenizer saw the over-long prompt"


def _five_mb_body() -> bytes:
    return json.dumps({"prompt": "a" * (5 * 1024 * 1024)}).encode()


def test_body_over_the_limit_is_a_413_with_content_length(api):
    body = _five_mb_body()
    r = httpx.post(api.url + "/v1/completions", content=body, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.request.headers["content-length"] == str(len(body))
    assert_error(r, 413)
    assert httpx.get(api.url + "/health", timeout=10).status_code == 200


def test_body_over_the_limit_is_a_413_when_chunked(api):
    body = _five_mb_body()

    def chunks():
        for i in range(0, len(body), 256 * 1024):
            yield body[i:i + 256 * 1024]

    r = httpx.post(api.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413)
    assert httpx.get(api.url + "/health", timeout=10).status_code == 200


def test_body_under_the_limit_is_read(api):
    """3 MiB (under the 4 MiB default) is read and judged on its content: a 400 for its length, not a 413."""
    body = json.dumps({"prompt": "a" * (3 * 1024 * 1024)})

    def chunks():
        yield body.encode()

    for content in (body, chunks()):
        assert_error(post_raw(api.url, "/v1/completions", content), 400, param="prompt")


@pytest.mark.parametrize("headers", [
    [("x-big", "a" * (65 * 1024))],
    [(f"x-h{i}", "v") for i in range(257)],
    [(f"x-h{i}", "b" * 300) for i in range(230)],
], ids=["one 65 KiB header", "257 headers", "230 headers of 300 bytes"])
def test_too_many_or_too_large_headers_are_a_431(api, headers):
    r = httpx.get(api.url + "/v1/models", headers=headers, timeout=30)
    assert r.status_code == 431, r.text
    assert httpx.get(api.url + "/health", timeout=10).status_code == 200


def test_ordinary_headers_pass(api):
    r = httpx.get(api.url + "/v1/models", headers=[(f"x-h{i}", "v" * 100) for i in range(100)], timeout=30)
    assert r.status_code == 200, r.text


# -- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_move_with_requests(api, model_id):
    before = metrics(api.url)
    ok = post(api.url, "/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert_error(post(api.url, "/v1/completions", {"model": model_id, "prompt": PROMPT, "n": 0}), 400)
    after = metrics(api.url)
    usage = ok.json()["usage"]
    for name in GAUGES:
        assert after[name] == 0
    assert after["serve_prompt_tokens_total"] - before.get("serve_prompt_tokens_total", 0) == usage["prompt_tokens"]
    assert after[GENERATED] - before[GENERATED] == usage["completion_tokens"]
    buckets = [k for k in after if k.startswith("serve_time_to_first_token_seconds_bucket{")]
    assert 'serve_time_to_first_token_seconds_bucket{le="+Inf"}' in buckets and len(buckets) > 3
    ttft = "serve_time_to_first_token_seconds_count"
    assert after[ttft] - before.get(ttft, 0) == 1
    # The chat request and the first /metrics read (counted once its answer has started) answered 200.
    ok_code, bad_code = 'serve_responses_total{code="200"}', 'serve_responses_total{code="400"}'
    assert after[ok_code] - before[ok_code] == 2
    assert after[bad_code] - before.get(bad_code, 0) == 1


# -- streams ----------------------------------------------------------------------------------------------------


def _streamed_tokens(payloads: list[str]) -> dict[int, int]:
    """Tokens received per choice, from the per-token logprobs each chunk carries (chat or completions)."""
    counts: dict[int, int] = {}
    for data in payloads[:-1]:
        for c in json.loads(data).get("choices", []):
            lp = c.get("logprobs") or {}
            counts[c["index"]] = counts.get(c["index"], 0) + len(lp.get("tokens") or lp.get("content") or [])
    return counts


def test_concurrent_streams_deliver_every_token_and_their_finish_reason(api, model_id):
    """Eight streams at a time decoding together (completions and chat), three times over: each receives all
    ``max_tokens`` tokens and its finish reason before [DONE]. (The end of a stream races the engine thread: a
    last update is lost only when the stream's reader is behind the engine, which a few fast rows make likely
    and a full, slower batch does not.)"""
    tokens = 64
    completion = {"model": model_id, **long_completion(tokens, logprobs=0)}
    chat = {"model": model_id, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": tokens,
            "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 0}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: stream(api.url, "/v1/completions", completion) if i % 2 else
                                stream(api.url, "/v1/chat/completions", chat), range(24)))
    for answer in answers:
        assert answer.status == 200, answer.payloads
        outcome = stream_outcome(answer.payloads)
        assert outcome["errors"] == [] and outcome["finish"] == ["length"], outcome
        assert _streamed_tokens(answer.payloads) == {0: tokens}
    assert_settles(api.url)


# -- disconnects -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(3))
def test_client_gone_mid_stream_frees_its_rows(api, model_id, attempt):
    generated = metrics(api.url)[GENERATED]
    body = {"model": model_id, **long_completion(MAX_LEN - 16, n=MAX_N), "stream": True}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", api.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            # Held until the block ends: dropping the iterator would close the response (and the connection).
            events = sse_data(r.iter_lines())
            next(d for d in events if _has_text(d))
            assert metrics(api.url)["serve_batch_rows"] == MAX_N
    # Leaving both blocks closed the connection mid-stream.
    total = assert_settles(api.url)
    assert total - generated < MAX_N * (MAX_LEN - 16), "the stream ran to its end: the rows were never dropped"


@pytest.mark.parametrize("attempt", range(6))
def test_client_gone_mid_request_frees_its_rows(api, model_id, attempt):
    """The connection closes as soon as the request decodes. Several attempts: a cancellation that lands while a
    token is being handed over can be lost (asyncio.wait_for on Python 3.11), so one attempt may pass by luck."""
    generated = metrics(api.url)[GENERATED]
    body = json.dumps({"model": model_id, **long_completion(MAX_LEN - 16, n=MAX_N)}).encode()
    parts = urlsplit(api.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: metrics(api.url)["serve_batch_rows"] == MAX_N, 60, 0.01, what="the request decoding")
    total = assert_settles(api.url)
    assert total - generated < MAX_N * (MAX_LEN - 16), "the request ran to its end: the rows were never dropped"


# -- health under load ---------------------------------------------------------------------------------------------

FLOOD = """
import asyncio, sys
import httpx

url, count, body = sys.argv[1], int(sys.argv[2]), sys.argv[3]


async def one(client):
    async with client.stream("POST", url + "/v1/completions", content=body,
                             headers={"content-type": "application/json"}) as r:
        async for _ in r.aiter_raw():
            pass


async def main():
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(count)), return_exceptions=True)


asyncio.run(main())
"""


@pytest.mark.slow
def test_health_stays_fast_during_a_flood(api, model_id):
    """Slow (~20 s): 56 streaming requests (a full batch and 40 queued) must be running while /health is timed
    100 times. The flood is another process, as other users would be, so that its reading does not share this
    process's interpreter with the timing."""
    waiting = 40
    body = json.dumps({"model": model_id, **long_completion(MAX_LEN - 16), "stream": True})
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, api.url, str(BATCH + waiting), body],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=offline_env())
    try:
        wait_for(lambda: gauges(api.url, running=BATCH, waiting=waiting), 120, 0.2,
                 what=f"{BATCH} running and {waiting} waiting")
        times = []
        with httpx.Client(timeout=10) as client:
            for _ in range(100):
                t = time.perf_counter()
                r = client.get(api.url + "/health")
                times.append(time.perf_counter() - t)
                assert r.status_code == 200
        still = metrics(api.url)
        assert still["serve_requests_running"] == BATCH, "the flood ended before the timing did"
    finally:
        flood.kill()
        flood.wait()
    times.sort()
    assert times[98] < 0.1, f"/health p99 {times[98] * 1000:.0f} ms (p50 {times[50] * 1000:.0f} ms, " \
                            f"max {times[-1] * 1000:.0f} ms)"
    assert_settles(api.url, within=10)


# -- queue overflow -------------------------------------------------------------------------------------------------

SMALL_BATCH, SMALL_QUEUE = 2, 3


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    with start_server(*BASE, "--max_batch_size", str(SMALL_BATCH), "--max_queue", str(SMALL_QUEUE), "--max_n", "1",
                      log_dir=tmp_path_factory.mktemp("busy")) as s:
        yield s


def _completion(url: str, body: dict) -> httpx.Response:
    return post(url, "/v1/completions", body, timeout=600)


@pytest.mark.slow
def test_queue_overflow_is_a_429_with_retry_after(busy):
    """Slow (~40 s on 2 cores): 5 long requests fill the batch (2) and the queue (3); the 4 sent while they are
    in flight are refused, and the 5 run to their end, two rounds behind one another."""
    tokens = 300
    body = long_completion(tokens, stream_options={"include_usage": True})
    with ThreadPoolExecutor(SMALL_BATCH + SMALL_QUEUE + 4) as pool:
        # Alternately streaming and not, so that both paths are admitted and queued.
        accepted = [pool.submit(stream, busy.url, "/v1/completions", body) if i % 2 else
                    pool.submit(_completion, busy.url, body) for i in range(SMALL_BATCH + SMALL_QUEUE)]
        wait_for(lambda: gauges(busy.url, running=SMALL_BATCH, waiting=SMALL_QUEUE), 120,
                 what="a full batch and a full queue")
        refused = [pool.submit(stream, busy.url, "/v1/completions", body) if i % 2 else
                   pool.submit(_completion, busy.url, body) for i in range(4)]
        refusals = [f.result(timeout=120) for f in refused]
        results = [f.result(timeout=600) for f in accepted]
    for r in refusals:
        if isinstance(r, Streamed):  # a refused stream: the 429 comes before any event
            assert r.status == 429, r
            assert json.loads(r.payloads[0])["error"]["type"] == "rate_limit_error"
        else:
            assert_error(r, 429, type="rate_limit_error")
        assert int(r.headers["retry-after"]) >= 1
    for r in results:
        if isinstance(r, Streamed):
            assert r.status == 200
            outcome = stream_outcome(r.payloads)
            assert outcome["errors"] == [] and outcome["finish"] == ["length"], outcome
            assert outcome["usage"]["completion_tokens"] == tokens
        else:
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == tokens
            assert r.json()["choices"][0]["finish_reason"] == "length"
    assert_settles(busy.url)


# -- request timeout ----------------------------------------------------------------------------------------------

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def hasty(tmp_path_factory):
    with start_server(*BASE, "--request_timeout", str(TIMEOUT_S), log_dir=tmp_path_factory.mktemp("hasty")) as s:
        yield s


def _too_long_for(url: str) -> dict:
    """A request that cannot finish in TIMEOUT_S: every row a request may have (--max_n 4), to the context's end."""
    return long_completion(_longest(url), n=4)


@pytest.mark.slow
def test_request_over_the_timeout_is_a_504(hasty):
    """Slow (a server of its own, with --request_timeout 0.5)."""
    t = time.monotonic()
    r = post(hasty.url, "/v1/completions", _too_long_for(hasty.url))
    elapsed = time.monotonic() - t
    assert_error(r, 504, type="timeout_error")
    assert elapsed < TIMEOUT_S + 3, elapsed
    assert_settles(hasty.url)


@pytest.mark.slow
def test_stream_over_the_timeout_ends_with_an_error_event(hasty):
    """Slow (a server of its own, with --request_timeout 0.5)."""
    answer = stream(hasty.url, "/v1/completions", _too_long_for(hasty.url))
    assert answer.status == 200
    outcome = stream_outcome(answer.payloads)
    assert outcome["done"] == 1 and [e["type"] for e in outcome["errors"]] == ["timeout_error"], outcome
    assert json.loads(answer.payloads[-2]).get("error"), "the error event is not the last before [DONE]"
    assert outcome["finish"] == []
    assert_settles(hasty.url)


# -- API keys -------------------------------------------------------------------------------------------------------

KEY = "sk-test-" + "7f3a9c" * 4
FILE_KEYS = ("sk-file-one-" + "a1" * 10, "sk-file-two-" + "b2" * 10)
WRONG = "sk-wrong-" + "0" * 20


@pytest.fixture(scope="module", params=["api_key", "api_key_file"])
def secured(request, tmp_path_factory):
    """(server, its keys): one with --api_key, one with --api_key_file holding two keys (and a comment)."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "api_key":
        flags, keys = ("--api_key", KEY), (KEY,)
    else:
        key_file = folder / "keys.txt"
        key_file.write_text(f"# our keys\n{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  \n#{WRONG}\n", encoding="utf-8")
        flags, keys = ("--api_key_file", str(key_file)), FILE_KEYS
    with start_server(*BASE, *flags, log_dir=folder) as s:
        yield s, keys


def _valid_bodies(url: str, key: str) -> dict[str, dict]:
    """A small valid body for each POST route (the test fails when a route is added without one here)."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    r = httpx.post(url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    # ChatGLM's route renders the same one-turn conversation; its max_length counts the prompt too.
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    return {"/v1/chat/completions": chat, "/v1/completions": {"prompt": PROMPT, "max_tokens": 2},
            "/tokenize": {"prompt": PROMPT}, "/detokenize": {"tokens": [1, 2, 3]},
            "/": {"prompt": "Hi", "max_length": prompt_tokens + 2}}


def _routes(url: str, key: str) -> list[tuple[str, str]]:
    """Every (method, path) of the app: /openapi.json's operations plus the documentation routes."""
    schema = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
    return routes + [("GET", p) for p in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/metrics")
                     if ("GET", p) not in routes]


def _call(url: str, method: str, path: str, headers: dict, bodies: dict) -> httpx.Response:
    return httpx.request(method, url + path, headers=headers, timeout=120,
                         json=bodies[path] if method == "POST" else None)


@pytest.mark.slow
def test_every_route_but_health_needs_the_key(secured):
    """Slow (two servers of their own, one per way of giving keys)."""
    server, keys = secured
    routes = _routes(server.url, keys[0])
    bodies = _valid_bodies(server.url, keys[0])
    assert {p for m, p in routes if m == "POST"} == set(bodies)
    refused = [{}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": WRONG}, {"Authorization": "Bearer"},
               {"Authorization": f"Basic {keys[0]}"}, {"Authorization": f"Bearer {keys[0]}x"},
               {"X-API-Key": keys[0]}]
    for method, path in routes + [("GET", "/no/such/route")]:
        if path == "/health":
            continue
        for headers in refused:
            r = _call(server.url, method, path, headers, bodies)
            assert_error(r, 401, type="authentication_error")
    for method, path in routes:
        for key in keys:
            r = _call(server.url, method, path, {"Authorization": f"Bearer {key}"}, bodies)
            assert r.status_code == 200, (method, path, r.status_code, r.text[:300])
    for headers in refused:
        assert httpx.get(server.url + "/health", headers=headers, timeout=10).status_code == 200


@pytest.mark.slow
def test_keys_never_reach_the_log(secured):
    """Slow (the servers of the test above)."""
    server, keys = secured
    for key in (*keys, WRONG):
        httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    log = server.stderr()
    assert "serve: serving" in log
    for key in (*keys, WRONG):
        assert key not in log


# -- where the server may listen ------------------------------------------------------------------------------


def _refused(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "serve.py", *BASE, "--port", str(free_port()), *flags], cwd=REPO,
                          env=server_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, names", [
    (("--host", "0.0.0.0"), "--api_key"),
    (("--host", "::"), "--api_key"),
    (("--host", "0.0.0.0", "--api_key", KEY, "--ui"), "--ui_auth"),
    (("--host", "0.0.0.0", "--insecure", "--ui"), "--ui_auth"),
], ids=["0.0.0.0 without a key", ":: without a key", "ui without ui_auth", "insecure ui without ui_auth"])
def test_non_loopback_host_needs_a_key(flags, names):
    r = _refused(*flags)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert names in r.stderr, r.stderr
    assert "Loading weights" not in r.stderr and "loading " not in r.stderr, "it loaded the model first"
    assert KEY not in r.stderr


@pytest.mark.slow
def test_non_loopback_host_with_insecure_starts(tmp_path):
    """Slow (starts a server, until it listens)."""
    port = free_port()
    log = tmp_path / "stderr.txt"
    proc = launch(*BASE, "--host", "0.0.0.0", "--insecure", "--port", str(port), log=log)
    try:
        def answers():
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        wait_for(answers, 120, 0.25, what="the server listening on 0.0.0.0")
    finally:
        stop(proc)
    assert "invalid arguments" not in log.read_text()


# -- shutdown -------------------------------------------------------------------------------------------------------


def _in_flight(url: str, body: dict, streams: int, plain: int, pool: ThreadPoolExecutor) -> list:
    """Start ``streams`` streaming and ``plain`` non-streaming requests; returns their futures once all of them
    hold rows of the batch and every stream has produced text."""
    events = [threading.Event() for _ in range(streams)]
    futures = [pool.submit(stream, url, "/v1/completions", body, e) for e in events]
    futures += [pool.submit(_completion, url, body) for _ in range(plain)]
    wait_for(lambda: gauges(url, running=streams + plain), 120, what="all requests running")
    for e in events:
        assert e.wait(120)
    return futures


def _longest(url: str) -> int:
    """The most new tokens a short prompt can take on this server (its context, less room for the prompt)."""
    return httpx.get(url + "/tokenizer_info", timeout=10).json()["model_max_length"] - 16


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(tmp_path):
    """Slow (up to a minute on a loaded machine): a server of its own receives SIGTERM while four requests
    decode to the end of the context; they must finish."""
    grace = 60.0
    with start_server(*BASE, "--shutdown_timeout", str(grace), log_dir=tmp_path) as server:
        tokens = _longest(server.url)
        body = long_completion(tokens, stream_options={"include_usage": True})
        with ThreadPoolExecutor(4) as pool:
            futures = _in_flight(server.url, body, 2, 2, pool)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            health = wait_for(lambda: (lambda r: r if r.status_code == 503 else None)(
                httpx.get(server.url + "/health", timeout=10)), 10, 0.02, what="/health 503 while draining")
            assert health.json()["status"] == "draining"
            r = post(server.url, "/v1/completions", long_completion(4))
            assert_error(r, 503, type="unavailable_error")
            assert int(r.headers["retry-after"]) >= 1
            assert gauges(server.url, running=4), "the requests ended before the drain was checked"
            results = [f.result(timeout=grace) for f in futures]
        code = server.proc.wait(timeout=max(1.0, grace + 5 - (time.monotonic() - signalled)))
    assert code == 0, server.stderr()
    for r in results:
        if isinstance(r, Streamed):
            assert r.status == 200
            outcome = stream_outcome(r.payloads)
            assert outcome["errors"] == [] and outcome["finish"] == ["length"], outcome
            assert outcome["usage"]["completion_tokens"] == tokens
        else:
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == tokens


@pytest.mark.slow
def test_sigterm_ends_what_outlasts_the_shutdown_timeout(tmp_path):
    """Slow (a server of its own): with --shutdown_timeout 0.5, requests far longer than that (every row of the
    batch, to the end of the context) are ended with an error (an error event then [DONE] when streaming), and
    the process still exits 0."""
    grace = 0.5
    with start_server(*BASE, "--shutdown_timeout", str(grace), log_dir=tmp_path) as server:
        tokens = _longest(server.url)
        with ThreadPoolExecutor(3) as pool:
            futures = _in_flight(server.url, long_completion(tokens, n=4), 2, 1, pool)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=60) for f in futures]
        code = server.proc.wait(timeout=max(1.0, grace + 5 - (time.monotonic() - signalled)))
    assert code == 0, server.stderr()
    for r in results:
        if isinstance(r, Streamed):
            assert r.status == 200
            outcome = stream_outcome(r.payloads)
            assert outcome["done"] == 1 and len(outcome["errors"]) == 1 and outcome["finish"] == [], outcome
            assert outcome["errors"][0]["type"] == "unavailable_error"
            assert json.loads(r.payloads[-2]).get("error"), "the error event is not the last before [DONE]"
        else:
            assert_error(r, 503, type="unavailable_error")
