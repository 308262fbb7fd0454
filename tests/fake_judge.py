"""A fake OpenAI-compatible judge for tests: ``POST /v1/chat/completions`` on 127.0.0.1, nothing else reached.

The tests of the judge client and of ``eval/`` (answers, reviews, judging, runs) need a judge that answers
the way a real endpoint does, misbehaves on demand, and can be watched. ``FakeJudge`` is one: a
``ThreadingHTTPServer`` on an ephemeral port (or a given one, to stand in again for an earlier fake at the
same URL: the judge client's cache key holds the base URL) in a daemon thread, used as a context manager::

    with FakeJudge(responder=lambda body: "Rating: [[7]]") as judge:
        judge.fail(Fault.http(429, retry_after="2"), Fault.http(500), Fault.hang(5), Fault.malformed())
        ...  # point the client at judge.url (http://127.0.0.1:PORT/v1)
        assert judge.requests == 5 and judge.max_in_flight <= 2

Replies come from ``responder(body) -> text`` (the request's JSON body), or from ``replay``, a table
question -> review text (``replay_from_reviews`` builds it from a stored LLMZoo ``review.jsonl``), matched on
the ``[Question]\\n{q}\\n\\n`` that opens an LLMZoo review prompt (the last user message). A question the table
does not hold gets a 400 naming it, so a test fails loudly rather than scoring a made-up review.

``fail(*faults)`` queues faults for the next requests, one each, in arrival order: ``Fault.http(status,
message, retry_after)``, ``Fault.hang(seconds)`` (answers only after that long: past a client's timeout),
``Fault.malformed()`` (a 200 whose body is cut JSON), ``Fault.reply(text)`` (a 200 with this text, e.g. a
verdict no parser can read) and ``Fault.drop()`` (the connection closed without a reply).

It records ``requests`` (chat requests received), ``in_flight`` / ``max_in_flight``, each request's
``headers`` (lower-case names, to check the key is sent) and ``bodies``; replies carry ``usage`` (words
counted as tokens) unless ``usage=False``. ``delay`` (seconds, or a function of the body) holds every reply
that long. Waits end at once when the server stops, so a test never waits for a hang it has finished with.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

CHAT_PATH = "/v1/chat/completions"
#: The question of an LLMZoo review prompt: ``[Question]\n{q}\n\n[Assistant 1]\n...`` (the role is the rules').
LLMZOO_QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[[^\]\n]+ 1\]\n", re.S)


@dataclass(frozen=True)
class Fault:
    """One misbehaviour for one request (see the module docstring); build with the class methods."""

    kind: str
    status: int = 200
    message: str = ""
    retry_after: str | None = None
    seconds: float = 0.0
    text: str = ""

    @classmethod
    def http(cls, status: int, message: str = "", retry_after: str | float | None = None) -> "Fault":
        """An error status with an OpenAI-style ``{"error": {"message": ...}}`` body (and ``Retry-After``)."""
        return cls("http", status=status, message=message or f"fake judge: injected {status}",
                   retry_after=None if retry_after is None else str(retry_after))

    @classmethod
    def hang(cls, seconds: float) -> "Fault":
        """No reply for ``seconds`` (then a normal one, to a client that has usually given up)."""
        return cls("hang", seconds=seconds)

    @classmethod
    def malformed(cls) -> "Fault":
        """A 200 whose body is not valid JSON."""
        return cls("malformed")

    @classmethod
    def reply(cls, text: str) -> "Fault":
        """A well-formed 200 with ``text`` as the answer (an unparseable verdict, say)."""
        return cls("reply", text=text)

    @classmethod
    def drop(cls) -> "Fault":
        """The connection closed with no reply at all."""
        return cls("drop")


def llmzoo_question(message: str) -> str | None:
    """The question of an LLMZoo review prompt (``[Question]\\n{q}\\n\\n[Assistant 1]\\n...``), else None."""
    match = LLMZOO_QUESTION.match(message)
    return match.group(1) if match else None


def replay_from_reviews(path: str | Path) -> dict[str, str]:
    """question -> review text, from an LLMZoo ``review.jsonl`` (``metadata.question`` and ``text`` of each
    record), for ``FakeJudge(replay=...)``.

    Raises:
        ValueError: two records of the file hold different reviews of the same question (no one answer).
    """
    table: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            question, text = record["metadata"]["question"], record["text"]
            if table.get(question, text) != text:
                raise ValueError(f"{path}:{number}: a second, different review of question {question[:60]!r}")
            table[question] = text
    return table


def _words(text: str) -> int:
    return len(text.split())


class FakeJudge:
    """The fake endpoint; see the module docstring. ``url`` is the base URL a client takes
    (``http://127.0.0.1:PORT/v1``), ``root`` the same without ``/v1``."""

    def __init__(self, responder: Callable[[dict], str] | None = None, *, replay: dict[str, str] | None = None,
                 delay: float | Callable[[dict], float] = 0.0, usage: bool = True, port: int = 0):
        if (responder is None) == (replay is None):
            raise ValueError("FakeJudge needs exactly one of responder= and replay=")
        self.responder, self.replay, self.delay, self.usage = responder, replay, delay, usage
        self.faults: deque[Fault] = deque()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.headers: list[dict[str, str]] = []
        self.bodies: list[Any] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.server.daemon_threads = True  # a hung handler must not keep the test process alive
        self.port = self.server.server_address[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True, name=f"fake-judge-{self.port}")

    # -- control ---------------------------------------------------------------------------------------

    def fail(self, *faults: Fault) -> "FakeJudge":
        """Queue ``faults`` for the next requests, one each, in the order requests arrive."""
        with self.lock:
            self.faults.extend(faults)
        return self

    def __enter__(self) -> "FakeJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()

    # -- answering --------------------------------------------------------------------------------------

    def answer(self, body: dict) -> tuple[int, str]:
        """(status, text): the responder's or the replay table's answer to ``body``."""
        if self.responder is not None:
            return 200, self.responder(body)
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        question = llmzoo_question(users[-1]) if users else None
        if question is None:
            return 400, "fake judge: the last user message is not an LLMZoo review prompt ([Question]\\n...)"
        if question not in self.replay:
            return 400, f"fake judge: no stored review for question {question[:80]!r}"
        return 200, self.replay[question]

    def completion(self, body: dict, text: str) -> dict:
        """An OpenAI chat.completion object carrying ``text``."""
        reply: dict[str, Any] = {
            "id": f"chatcmpl-fake-{self.requests}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        if self.usage:
            prompt = sum(_words(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
            reply["usage"] = {"prompt_tokens": prompt, "completion_tokens": _words(text),
                              "total_tokens": prompt + _words(text)}
        return reply

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # no access log on the test's stderr
                pass

            def send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (a timeout): nothing to tell it

            def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
                body = {"error": {"message": message, "type": "fake_error", "param": None, "code": status}}
                self.send(status, json.dumps(body).encode(), headers)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self.send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())
                else:
                    self.error(404, f"fake judge: no route {self.path}")

            def do_POST(self) -> None:
                payload = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != CHAT_PATH:
                    self.error(404, f"fake judge: no route {self.path} (only {CHAT_PATH})")
                    return
                with judge.lock:
                    judge.requests += 1
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                    judge.headers.append({k.lower(): v for k, v in self.headers.items()})
                    fault = judge.faults.popleft() if judge.faults else None
                try:
                    try:
                        body = json.loads(payload)
                    except ValueError:
                        body = None
                    with judge.lock:
                        judge.bodies.append(body)
                    if not isinstance(body, dict):
                        self.error(400, "fake judge: the body is not a JSON object")
                        return
                    self.respond(body, fault)
                finally:
                    with judge.lock:
                        judge.in_flight -= 1

            def respond(self, body: dict, fault: Fault | None) -> None:
                delay = judge.delay(body) if callable(judge.delay) else judge.delay
                if delay:
                    judge.stopping.wait(delay)
                if fault is not None and fault.kind == "http":
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                    self.error(fault.status, fault.message, headers)
                    return
                if fault is not None and fault.kind == "malformed":
                    self.send(200, b'{"id": "chatcmpl-fake", "choices": [{"message": {"content": "tor')
                    return
                if fault is not None and fault.kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the connection end, no reply
                    return
                if fault is not None and fault.kind == "hang":
                    judge.stopping.wait(fault.seconds)
                if fault is not None and fault.kind == "reply":
                    status, text = 200, fault.text
                else:
                    try:
                        status, text = judge.answer(body)
                    except Exception as e:  # a test's responder failing: a 400, which the client does not retry
                        status, text = 400, f"fake judge: the responder raised {type(e).__name__}: {e}"
                if status != 200:
                    self.error(status, text)
                    return
                self.send(200, json.dumps(judge.completion(body, text), ensure_ascii=False).encode())

        return Handler
