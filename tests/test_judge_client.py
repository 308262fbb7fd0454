"""utils/judge.py, the judge client (R25), against the fake OpenAI-compatible judge of tests/fake_judge.py.

Nothing leaves 127.0.0.1. Waits go through an injected ``sleep`` (a list that records them) and the rate limit
through an injected clock, so the retries' and the token bucket's timing is checked without wall time; only the
timeout test waits for real (a 0.3 s timeout against a hang).
"""

from __future__ import annotations

import email.utils
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import DATA, REPO
from fake_judge import FakeJudge, Fault, llmzoo_question, replay_from_reviews
from utils.errors import UsageError
from utils.jsonl import read_jsonl
from utils.judge import (BACKOFF_BASE, CACHE_FILE, RETRY_AFTER_CAP, ChatRequest, JudgeClient, JudgeOptions,
                         normalise_base_url, parse_retry_after)

KEY_ENV = "JUDGE_CLIENT_TEST_KEY"
SECRET = "sk-test-4f1c9e0b7a2d-DO-NOT-LEAK"
GENERAL = DATA / "llmzoo" / "reviews" / "en" / "general" / "review.jsonl"


class Sleeps(list):
    """An injected ``sleep``: records each wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class FakeClock:
    """An injected monotonic clock that only ``sleep`` moves (one thread at a time)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def options(url: str, **over) -> JudgeOptions:
    return JudgeOptions(**{"judge_base_url": url, "judge_model": "judge-m", "judge_api_key_env": KEY_ENV,
                           "timeout": 5.0, **over})


def request(i, **fields) -> ChatRequest:
    return ChatRequest(messages=({"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": f"question {i}"}), key=str(i), **fields)


def echo(body: dict) -> str:
    return "answer to " + body["messages"][-1]["content"]


def cache_lines(folder: Path) -> tuple[list, list]:
    return read_jsonl(folder / CACHE_FILE)


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


# -- retries ----------------------------------------------------------------------------------------------------


def test_the_fault_sequence_ends_in_success_with_the_right_retry_count(tmp_path):
    """429 with Retry-After, 500, a hang past the timeout, malformed JSON, then an unparseable verdict: that is a
    well-formed answer, returned as it is (the caller's parser counts it), after 4 retries."""
    sleeps = Sleeps()
    with FakeJudge(echo) as judge:
        judge.fail(Fault.http(429, retry_after="7"), Fault.http(500), Fault.hang(5), Fault.malformed(),
                   Fault.reply("I cannot decide."))
        with JudgeClient(options(judge.url, timeout=0.3), tmp_path, sleep=sleeps) as client:
            result = client.complete(request(1))
            assert (result.text, result.error, result.cached, result.attempts) == ("I cannot decide.", None, False, 5)
            assert judge.requests == 5
            assert client.stats() == {"requests": 5, "cached": 0, "failed": 0, "retries": 4,
                                      "prompt_tokens": 4, "completion_tokens": 3, "max_in_flight": 1}
            assert sleeps[0] == 7.0  # exactly what the server asked
            for k, wait in enumerate(sleeps[1:], 1):  # full jitter: uniform in [0, base * 2^k]
                assert 0.0 <= wait <= BACKOFF_BASE * 2 ** k
            assert len(sleeps) == 4
            assert client.complete(request(2)).text == "answer to question 2"  # the queue is spent


def test_a_dropped_connection_and_a_refused_one_are_retried_then_reported(tmp_path):
    sleeps = Sleeps()
    with FakeJudge(echo) as judge:
        judge.fail(Fault.drop())
        with JudgeClient(options(judge.url), tmp_path / "a", sleep=sleeps) as client:
            assert client.complete(request(1)).attempts == 2
    with socket.socket() as s:  # a port no one listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with JudgeClient(options(f"http://127.0.0.1:{port}", max_retries=1), tmp_path / "b", sleep=sleeps) as client:
        result = client.complete(request(1))
    assert result.text is None and result.attempts == 2
    assert "connection error" in result.error and "gave up after 2 attempt(s)" in result.error


def test_retries_stop_at_max_retries_and_a_failure_is_not_cached(tmp_path):
    sleeps = Sleeps()
    with FakeJudge(echo) as judge:
        judge.fail(*[Fault.http(503, "overloaded, try later")] * 3)
        with JudgeClient(options(judge.url, max_retries=2), tmp_path, sleep=sleeps) as client:
            result = client.complete(request(1))
            assert result.text is None and result.attempts == 3 and len(sleeps) == 2
            assert "HTTP 503" in result.error and "overloaded, try later" in result.error
            assert "gave up after 3 attempt(s)" in result.error
            assert client.stats()["failed"] == 1 and client.stats()["retries"] == 2
        assert cache_lines(tmp_path) == ([], [])
        with JudgeClient(options(judge.url), tmp_path, sleep=sleeps) as client:  # a re-run asks again
            assert client.complete(request(1)).text == "answer to question 1"
        assert judge.requests == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_client_error_fails_at_once_with_the_server_message(tmp_path, status):
    sleeps = Sleeps()
    with FakeJudge(echo) as judge:
        judge.fail(Fault.http(status, f"the model 'judge-m' says no ({status})"))
        with JudgeClient(options(judge.url), tmp_path, sleep=sleeps) as client:
            result = client.complete(request(1))
            assert result.text is None and result.attempts == 1 and sleeps == []
            assert f"HTTP {status}" in result.error and f"the model 'judge-m' says no ({status})" in result.error
            assert judge.requests == 1 and client.stats()["failed"] == 1 and client.stats()["retries"] == 0


def test_retry_after_as_an_http_date_is_honoured(tmp_path):
    sleeps = Sleeps()
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with FakeJudge(echo) as judge:
        judge.fail(Fault.http(429, retry_after=when))
        with JudgeClient(options(judge.url), tmp_path, sleep=sleeps) as client:
            assert client.complete(request(1)).attempts == 2
    assert len(sleeps) == 1 and 28.0 <= sleeps[0] <= 31.0  # the date has whole seconds


def test_parse_retry_after():
    assert parse_retry_after(httpx.Headers({"Retry-After": "2.5"})) == 2.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "-3"})) == 0.0
    assert parse_retry_after(httpx.Headers({"Retry-After": "99999"})) == RETRY_AFTER_CAP
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "Retry-After": "9"})) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
    past = email.utils.formatdate(time.time() - 100, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": past})) == 0.0


# -- rate and concurrency ---------------------------------------------------------------------------------------


def mock_transport(log: list, clock=None):
    """An httpx transport answering every chat request at once, logging the (fake) time of each."""
    def handler(req: httpx.Request) -> httpx.Response:
        log.append(clock() if clock else json.loads(req.content))
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "ok"}}]})
    return httpx.MockTransport(handler)


def test_rpm_is_a_token_bucket_on_the_injected_clock(tmp_path):
    clock, starts = FakeClock(), []
    with JudgeClient(options("http://judge.invalid", rpm=120, concurrency=1), tmp_path / "a", clock=clock,
                     sleep=clock.sleep, transport=mock_transport(starts, clock)) as client:
        results = client.complete_many([request(i) for i in range(5)], progress=False)
    assert [r.text for r in results] == ["ok"] * 5
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0]  # 120 per minute: one every half second, none sooner

    # Several workers reserve their start times in turn: with the clock standing still, worker n waits n/2 s.
    sleeps, frozen = Sleeps(), []
    with JudgeClient(options("http://judge.invalid", rpm=120, concurrency=4), tmp_path / "b", clock=lambda: 0.0,
                     sleep=sleeps, transport=mock_transport(frozen)) as client:
        client.complete_many([request(i) for i in range(6)], progress=False)
    assert sorted(sleeps) == [0.5, 1.0, 1.5, 2.0, 2.5] and len(frozen) == 6


def test_requests_in_flight_never_exceed_concurrency(tmp_path):
    with FakeJudge(echo, delay=0.05) as judge:
        with JudgeClient(options(judge.url, concurrency=2), tmp_path) as client:
            results = client.complete_many([request(i) for i in range(12)], progress=False)
            assert client.stats()["max_in_flight"] == 2
        assert judge.requests == 12 and judge.max_in_flight == 2
    assert [r.text for r in results] == [f"answer to question {i}" for i in range(12)]


def test_results_keep_the_order_of_requests_and_on_result_runs_in_the_calling_thread(tmp_path):
    # Later requests answer sooner, so they arrive out of order.
    def delay(body):
        return 0.1 - 0.01 * int(body["messages"][-1]["content"].split()[-1])

    seen = []
    with FakeJudge(echo, delay=delay) as judge:
        with JudgeClient(options(judge.url, concurrency=4), tmp_path) as client:
            results = client.complete_many([request(i) for i in range(8)],
                                           on_result=lambda r: seen.append((r.request.key, threading.current_thread())))
    assert [r.request.key for r in results] == [str(i) for i in range(8)]
    assert [r.text for r in results] == [f"answer to question {i}" for i in range(8)]
    assert sorted(k for k, _ in seen) == [str(i) for i in range(8)]
    assert {t for _, t in seen} == {threading.current_thread()}


# -- the cache ---------------------------------------------------------------------------------------------------


def test_an_identical_rerun_sends_no_request(tmp_path):
    with FakeJudge(echo) as judge:
        with JudgeClient(options(judge.url), tmp_path) as client:
            first = client.complete_many([request(i) for i in range(6)], progress=False)
        with JudgeClient(options(judge.url + "/"), tmp_path) as client:  # another spelling of the same endpoint
            again = client.complete_many([request(i) for i in range(6)], progress=False)
            assert client.stats() == {"requests": 0, "cached": 6, "failed": 0, "retries": 0,
                                      "prompt_tokens": 0, "completion_tokens": 0, "max_in_flight": 0}
        assert judge.requests == 6
    assert [r.text for r in again] == [r.text for r in first]
    assert all(r.cached and r.attempts == 0 and r.error is None for r in again)
    assert [r.usage for r in again] == [r.usage for r in first] and first[0].usage["total_tokens"] > 0


def test_a_run_stopped_half_way_then_rerun_sends_only_the_missing_requests(tmp_path):
    """on_result raising after half the results (a caller killed at 50%): no new request starts, the ones in
    flight finish and are cached, and the re-run asks for exactly the rest: 10 requests in all."""
    got = []

    def stop_at_half(result):
        got.append(result)
        if len(got) == 5:
            raise KeyboardInterrupt

    with FakeJudge(echo, delay=0.03) as judge:
        with JudgeClient(options(judge.url, concurrency=2), tmp_path) as client:
            with pytest.raises(KeyboardInterrupt):
                client.complete_many([request(i) for i in range(10)], on_result=stop_at_half, progress=False)
        sent = judge.requests
        records, bad = cache_lines(tmp_path)
        assert 5 <= sent < 10 and len(records) == sent and bad == []
        with JudgeClient(options(judge.url, concurrency=2), tmp_path) as client:
            results = client.complete_many([request(i) for i in range(10)], progress=False)
            assert client.stats()["requests"] == 10 - sent and client.stats()["cached"] == sent
        assert judge.requests == 10  # no request was sent twice
    assert [r.text for r in results] == [f"answer to question {i}" for i in range(10)]



def test_an_abandoned_call_does_not_sit_out_a_backoff(tmp_path):
    """With the real sleep, a worker waiting out a Retry-After of 30 s gives up as soon as the call is abandoned
    (here: on_result raising on the other request's answer), without sending again."""
    def stop(result):
        raise KeyboardInterrupt

    with FakeJudge(echo) as judge:
        judge.fail(Fault.http(429, retry_after=30))
        with JudgeClient(options(judge.url, concurrency=2), tmp_path) as client:
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                client.complete_many([request(0), request(1)], on_result=stop, progress=False)
            assert time.monotonic() - started < 10
        assert judge.requests == 2


def test_calls_from_two_threads_on_one_client_do_not_stop_each_other(tmp_path):
    with FakeJudge(echo, delay=0.02) as judge:
        with JudgeClient(options(judge.url, concurrency=2), tmp_path) as client:
            out = {}
            calls = [threading.Thread(target=lambda n=n, k=k: out.setdefault(n, client.complete_many(
                [request(f"{n}-{i}") for i in range(k)], progress=False))) for n, k in [(0, 1), (1, 6)]]
            for t in calls:
                t.start()
            for t in calls:
                t.join()
    assert [r.text for n in (0, 1) for r in out[n]] == [f"answer to question {n}-{i}"
                                                        for n, k in [(0, 1), (1, 6)] for i in range(k)]

KILLED_RUN = """
import sys
sys.path.insert(0, {repo!r})
from utils.judge import ChatRequest, JudgeClient, JudgeOptions
options = JudgeOptions(judge_base_url={url!r}, judge_model="judge-m", judge_api_key_env={env!r}, concurrency=1)
requests = [ChatRequest(messages=({{"role": "user", "content": f"question {{i}}"}},)) for i in range(12)]
with JudgeClient(options, {cache!r}) as client:
    client.complete_many(requests, progress=False)
"""


@pytest.mark.slow
def test_a_killed_process_resumes_with_only_the_missing_requests(tmp_path):
    """A real kill (SIGKILL, a subprocess: in-process stops are above) once half the responses are cached; slow
    only by one interpreter start. The re-run sends exactly the requests not in the cache."""
    requests = [ChatRequest(messages=({"role": "user", "content": f"question {i}"},)) for i in range(12)]
    cache = tmp_path / "cache"
    with FakeJudge(echo, delay=0.05) as judge:
        code = KILLED_RUN.format(repo=str(REPO), url=judge.url, env=KEY_ENV, cache=str(cache))
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if (cache / CACHE_FILE).is_file() and len(cache_lines(cache)[0]) >= 6:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
        cached, _ = cache_lines(cache)
        before = judge.requests
        assert 6 <= len(cached) < 12
        with JudgeClient(options(judge.url), cache) as client:
            results = client.complete_many(requests, progress=False)
            assert client.stats()["requests"] == 12 - len(cached) == judge.requests - before
    assert [r.text for r in results] == [f"answer to question {i}" for i in range(12)]
    assert read_jsonl(cache / CACHE_FILE)[1] == []


def test_a_torn_last_cache_line_is_repaired(tmp_path):
    with FakeJudge(echo) as judge:
        with JudgeClient(options(judge.url), tmp_path) as client:
            client.complete_many([request(i) for i in range(3)], progress=False)
        path = tmp_path / CACHE_FILE
        with open(path, "a", encoding="utf-8") as f:  # a writer killed mid-line
            f.write('{"key": "0123", "text": "half an ans')
        with JudgeClient(options(judge.url), tmp_path) as client:
            assert path.read_text(encoding="utf-8").endswith("}\n")  # cut on open
            assert all(r.cached for r in client.complete_many([request(i) for i in range(3)], progress=False))
            with open(path, "a", encoding="utf-8") as f:  # another process killed mid-line while this one runs
                f.write('{"key": "4567", "te')
            assert client.complete(request(3)).text == "answer to question 3"
        records, bad = read_jsonl(path)
        assert bad == [] and sorted(r["text"] for r in records) == [f"answer to question {i}" for i in range(4)]
        assert judge.requests == 4


def test_clients_sharing_a_cache_folder_do_not_corrupt_it(tmp_path):
    """Two clients on one folder at once (each its own open file and flock, as two processes have)."""
    with FakeJudge(echo, delay=0.005) as judge:
        clients = [JudgeClient(options(judge.url, concurrency=3), tmp_path) for _ in range(2)]
        threads = [threading.Thread(target=c.complete_many, args=([request(f"{n}-{i}") for i in range(15)],),
                                    kwargs={"progress": False}) for n, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in clients:
            c.close()
        records, bad = cache_lines(tmp_path)
        assert bad == [] and len({r["key"] for r in records}) == len(records) == 30
        with JudgeClient(options(judge.url), tmp_path) as client:
            both = [request(f"{n}-{i}") for n in range(2) for i in range(15)]
            assert all(r.cached for r in client.complete_many(both, progress=False))
        assert judge.requests == 30


def test_a_request_repeated_in_one_call_is_sent_once(tmp_path):
    with FakeJudge(echo) as judge:
        with JudgeClient(options(judge.url), tmp_path) as client:
            results = client.complete_many([request(1), request(2), request(1)], progress=False)
            assert client.stats()["requests"] == 2 and client.stats()["cached"] == 1
    assert [(r.text, r.cached) for r in results] == [("answer to question 1", False), ("answer to question 2", False),
                                                     ("answer to question 1", True)]


def test_the_cache_key_covers_the_endpoint_the_model_and_every_sampling_field(tmp_path):
    with JudgeClient(options("http://127.0.0.1:9/v1"), tmp_path) as client:
        key = client.cache_key
        base = key(request(1))
        assert key(request(1)) == base == key(ChatRequest(messages=request(1).messages, key="other id"))
        assert key(ChatRequest(messages=request(1).messages, temperature=0)) == base  # 0 and 0.0 are one value
        different = [request(2), request(1, temperature=0.7), request(1, max_tokens=64), request(1, seed=3),
                     request(1, extra=(("top_p", 0.9),))]
        assert len({base, *map(key, different)}) == 6
        assert key(request(1, extra=(("top_p", 0.9), ("stop", ["\n"])))) == \
            key(request(1, extra=(("stop", ["\n"]), ("top_p", 0.9))))
    for url, model in [("http://127.0.0.1:9", "judge-m"), ("http://127.0.0.1:9/v1/", "judge-m")]:
        with JudgeClient(options(url, judge_model=model), tmp_path) as other:
            assert other.cache_key(request(1)) == base
    for url, model in [("http://127.0.0.1:10/v1", "judge-m"), ("http://127.0.0.1:9/v1", "judge-2")]:
        with JudgeClient(options(url, judge_model=model), tmp_path) as other:
            assert other.cache_key(request(1)) != base


# -- the key -----------------------------------------------------------------------------------------------------


def test_the_key_is_sent_but_never_written_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    sleeps = Sleeps()
    with FakeJudge(echo) as judge:
        # Servers echo keys: in a rate-limit message (logged on retry), a 401, even an answer.
        judge.fail(Fault.http(429, f"rate limit for key {SECRET}", retry_after=0),
                   Fault.http(401, f"Incorrect API key provided: {SECRET}"), Fault.reply(f"your key is {SECRET}"))
        with JudgeClient(options(judge.url, concurrency=1), tmp_path / "cache", sleep=sleeps) as client:
            results = client.complete_many([request(i) for i in range(4)])
            shown = repr(client) + json.dumps(client.stats()) + repr(client.options)
        assert {h.get("authorization") for h in judge.headers} == {f"Bearer {SECRET}"}
    assert results[0].text is None and "Incorrect API key provided: [redacted]" in results[0].error
    assert results[1].text == "your key is [redacted]"
    out, err = capsys.readouterr()
    assert "rate limit for key [redacted]" in err
    for text in [out, err, shown, *map(repr, results)]:
        assert SECRET not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(SECRET.encode() not in p.read_bytes() for p in files)


def test_no_key_no_authorization_header(tmp_path):
    with FakeJudge(echo) as judge:
        with JudgeClient(options(judge.url), tmp_path) as client:
            client.complete(request(1))
        assert "authorization" not in judge.headers[0]


# -- counts, options, URLs ----------------------------------------------------------------------------------------


def test_stats_count_requests_hits_failures_retries_and_tokens(tmp_path):
    sleeps = Sleeps()
    with FakeJudge(echo) as judge:
        with JudgeClient(options(judge.url), tmp_path) as client:
            client.complete(request(0))
        judge.fail(Fault.http(500), Fault.http(400, "bad request"))
        with JudgeClient(options(judge.url, concurrency=1), tmp_path, sleep=sleeps) as client:
            results = client.complete_many([request(i) for i in range(4)], progress=False)
            stats = client.stats()
    # request 0 cached; request 1: 500 then 400 (failed, 2 attempts); requests 2, 3 answered at once.
    assert [(r.cached, r.attempts, r.text is None) for r in results] == [(True, 0, False), (False, 2, True),
                                                                         (False, 1, False), (False, 1, False)]
    fresh = [r for r in results if not r.cached and r.text is not None]
    assert stats == {"requests": 4, "cached": 1, "failed": 1, "retries": 1,
                     "prompt_tokens": sum(r.usage["prompt_tokens"] for r in fresh),
                     "completion_tokens": sum(r.usage["completion_tokens"] for r in fresh), "max_in_flight": 1}
    assert stats["prompt_tokens"] == 2 * 4 and stats["completion_tokens"] == 2 * 4  # words, as the fake counts


def test_options_report_every_problem_at_once():
    problems = JudgeOptions().problems()
    assert any("--judge_base_url is required" in p for p in problems)
    assert any("--judge_model is required" in p for p in problems)
    bad = JudgeOptions(judge_base_url="localhost:8000", judge_model="m", judge_api_key_env=SECRET, max_retries=-1,
                       timeout=0, concurrency=0, rpm=-1)
    problems = bad.problems()
    assert len(problems) == 6
    assert all(SECRET not in p for p in problems)  # the key passed in place of its variable's name is not echoed
    with pytest.raises(UsageError, match="--concurrency must be >= 1"):
        JudgeClient(bad, "unused")
    assert JudgeOptions(judge_base_url="http://127.0.0.1:8000", judge_model="m").problems() == []


def test_base_url_forms():
    for url in ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
                "http://127.0.0.1:8000/v1/", " HTTP://127.0.0.1:8000/v1/chat/completions"]:
        assert normalise_base_url(url) == "http://127.0.0.1:8000/v1"
    assert normalise_base_url("https://API.example.com:443/") == "https://api.example.com/v1"
    assert normalise_base_url("http://h/proxy/openai/v1/") == "http://h/proxy/openai/v1"
    assert normalise_base_url("http://[::1]:8000") == "http://[::1]:8000/v1"
    for url, message in [("ftp://h", "http"), ("localhost:8000", "http"), ("http://u:hunter22@h", "credentials"),
                         ("http://h/v1?x=1", "query"), ("http://h:99999", "port"), ("http:///v1", "host")]:
        with pytest.raises(ValueError, match=message) as e:
            normalise_base_url(url)
        assert "hunter22" not in str(e.value)


def test_the_bare_host_reaches_v1_chat_completions(tmp_path):
    with FakeJudge(echo) as judge:  # the fake answers only /v1/chat/completions
        with JudgeClient(options(judge.root), tmp_path) as client:
            assert client.complete(request(1)).text == "answer to question 1"


def test_chat_request_checks_its_fields():
    with pytest.raises(ValueError, match="at least one message"):
        ChatRequest(messages=())
    with pytest.raises(ValueError, match="role"):
        ChatRequest(messages=({"content": "x"},))
    with pytest.raises(ValueError, match="may not set model"):
        ChatRequest(messages=({"role": "user", "content": "x"},), extra=(("model", "other"),))
    r = ChatRequest(messages=[{"role": "user", "content": "x"}], extra=(("top_p", 0.5), ("stop", ["a"])), seed=1)
    assert r.messages == ({"role": "user", "content": "x"},) and r.extra == (("stop", ["a"]), ("top_p", 0.5))
    assert r.body("m") == {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.0,
                           "seed": 1, "stop": ["a"], "top_p": 0.5}


# -- the fake judge's replay of LLMZoo reviews -------------------------------------------------------------------


def test_llmzoo_question_is_read_from_the_review_prompt():
    prompt = "[Question]\nTwo\n\nlines?\n\n[Assistant 1]\nA\n\n[End of Assistant 1]\n\n[System]\nOrder them.\n\n"
    assert llmzoo_question(prompt) == "Two\n\nlines?"
    assert llmzoo_question("Hello") is None


@pytest.mark.skipif(not GENERAL.is_file(), reason=f"LLMZoo's stored reviews are not at {GENERAL} "
                    "(the shared data folder beside the repository)")
def test_the_fake_judge_replays_stored_llmzoo_reviews(tmp_path):
    table = replay_from_reviews(GENERAL)
    stored = [json.loads(line) for line in GENERAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(table) == 70
    first = stored[0]
    answers = "\n\n".join(f"[Assistant {i}]\n{a}\n\n[End of Assistant {i}]"
                          for i, a in enumerate(first["metadata"]["answers"], 1))
    prompt = f"[Question]\n{first['metadata']['question']}\n\n{answers}\n\n[System]\nOrder them.\n\n"
    unknown = "[Question]\nNot a stored question\n\n[Assistant 1]\nA\n\n[End of Assistant 1]"
    sleeps = Sleeps()
    with FakeJudge(replay=table) as judge:
        with JudgeClient(options(judge.url), tmp_path, sleep=sleeps) as client:
            hit, miss = client.complete_many([ChatRequest(messages=({"role": "user", "content": prompt},)),
                                              ChatRequest(messages=({"role": "user", "content": unknown},))],
                                             progress=False)
    assert hit.text == first["text"]
    assert miss.text is None and miss.attempts == 1 and "no stored review" in miss.error and sleeps == []


def test_the_cache_folder_given_to_the_client_is_the_one_used(tmp_path):
    """options.cache_dir is the flag the caller resolved its folder from; the client takes the folder given."""
    with FakeJudge(echo) as judge:
        with JudgeClient(options(judge.url, cache_dir=str(tmp_path / "flag")), tmp_path / "given") as client:
            client.complete(request(1))
    assert sorted(os.listdir(tmp_path / "given")) == [CACHE_FILE, CACHE_FILE + ".lock"]
    assert not (tmp_path / "flag").exists()
