"""A client for any OpenAI-compatible ``/v1/chat/completions`` endpoint: the judge (and answerer) of ``eval/``.

``eval/answer.py``, ``eval/review.py`` and ``eval/judge.py`` send many independent chat requests to a model
they do not run: OpenAI, a vLLM or llama.cpp server, or our own ``serve.py``. Such an endpoint rate-limits,
fails now and then, and costs money, so the client:

* retries 429, 408, 409, 5xx, timeouts, connection errors and malformed bodies (not JSON, no
  ``choices[0].message.content`` string) with exponential backoff and full jitter (a uniform wait in
  ``[0, min(60, 2^k)]`` seconds before retry k+1), or exactly the server's ``Retry-After`` (seconds or an
  HTTP date; ``retry-after-ms`` too) when it sends one, up to ``--max_retries`` retries. Any other 4xx
  (400, 401, 403, 404, 422, ...) fails at once with the server's message: sending it again cannot help;
* keeps every success in a disk cache (``CACHE_FILE`` in the cache folder), keyed by the sha256 of the
  normalised base URL, the model, the messages and every sampling field. A re-run sends nothing, and a run
  killed half way sends only what is missing on the next run: each response is appended (a whole, fsynced
  line) by the worker that received it, before the caller even sees it. Failures are never cached, so a re-run
  asks again;
* bounds requests in flight by ``--concurrency`` (a thread pool of that size, one request per worker) and
  their rate by ``--rpm`` (a token bucket holding one token: any t seconds see at most ``1 + rpm * t / 60``
  request starts, each retry counting as one);
* never writes the API key anywhere: it is read from the environment variable named by
  ``--judge_api_key_env`` (absent or empty: no ``Authorization`` header, fine for a local server), sent only in
  that header, and cut out of every error message and response text (keys of 8 characters or more; shorter
  ones, such as vLLM's ``EMPTY``, are not secrets);
* counts what it did (``stats()``): HTTP requests sent, cache hits, failures, retries, token usage and the most
  requests in flight at once.

A failure is a result (``text`` None, ``error`` set), never dropped; the caller decides whether it is fatal.

The cache may be shared by several processes at once (``--cache_dir`` across run folders, a cron job next to a
manual run): every append holds an exclusive ``flock`` on ``CACHE_FILE.lock`` beside it, and under that lock a
torn last line (the mark of a writer killed mid-line, the only way one can appear since every writer holds the
lock) is cut before the new line goes on. A process reads the file once, when the client opens, so two
processes that start together may both send a request neither had cached; each line is one complete response,
and a duplicate key only repeats an equivalent answer.

Example::

    options = JudgeOptions(judge_base_url="http://127.0.0.1:8000/v1", judge_model="gpt-3.5-turbo")
    with JudgeClient(options, "runs/cache") as client:
        results = client.complete_many([ChatRequest(messages=({"role": "user", "content": "Hi"},))])
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence
from urllib.parse import urlsplit

from utils.args import Group, unfingerprinted
from utils.errors import UsageError
from utils.jsonl import JsonlAppender, cut_torn_tail, line_refs, read_jsonl

if TYPE_CHECKING:
    import httpx

#: The cache's one file in the cache folder (and ``CACHE_FILE + ".lock"``, the lock every writer holds).
CACHE_FILE = "judge_cache.jsonl"
#: Full-jitter backoff: the wait before retry k+1 is uniform in [0, min(BACKOFF_CAP, BACKOFF_BASE * 2**k)] s.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
#: The longest ``Retry-After`` obeyed (seconds); a longer one is waited this long, so a cron job cannot hang.
RETRY_AFTER_CAP = 600.0
#: Statuses worth sending again besides 5xx: rate limited, request timeout, conflict (as OpenAI's SDK does).
RETRYABLE = frozenset({408, 409, 429})
#: Keys shorter than this are not cut out of texts (they are placeholders such as ``EMPTY``, and cutting every
#: occurrence of a short word would damage answers).
MIN_SECRET = 8
REDACTED = "[redacted]"
#: Body fields a ChatRequest sets itself; ``extra`` may not override them.
RESERVED = frozenset({"model", "messages", "temperature", "max_tokens", "seed", "stream", "n"})
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STATS = ("requests", "cached", "failed", "retries", "prompt_tokens", "completion_tokens", "max_in_flight")


@dataclass(frozen=True)
class JudgeOptions(Group):
    """The endpoint and how it is called. Only the endpoint and the model change what comes back; the rest
    decides how hard, how fast and from where the same answers are fetched."""

    judge_base_url: str = ""
    judge_model: str = ""
    judge_api_key_env: str = unfingerprinted("OPENAI_API_KEY", why="names where the key is read; the key never "
                                             "changes an answer and is never recorded")
    cache_dir: str = unfingerprinted("", why="where responses are kept, not what they are")
    max_retries: int = unfingerprinted(5, why="how hard a request is tried: a request that still fails is "
                                       "reported as failed, never answered differently")
    timeout: float = unfingerprinted(60.0, why="how long a request may take: a timeout is retried or reported")
    concurrency: int = unfingerprinted(4, why="requests in flight; results keep the order of the requests")
    rpm: float = unfingerprinted(0.0, why="pacing only")

    def problems(self) -> list[str]:
        problems = []
        if not self.judge_base_url:
            problems.append("--judge_base_url is required: an OpenAI-compatible endpoint, e.g. "
                            "http://127.0.0.1:8000/v1")
        else:
            try:
                normalise_base_url(self.judge_base_url)
            except ValueError as e:
                problems.append(f"--judge_base_url {e}")
        if not self.judge_model:
            problems.append("--judge_model is required: the endpoint's model name")
        if not ENV_NAME.fullmatch(self.judge_api_key_env or ""):
            # Not echoed: a user who passed the key itself here must not see it printed.
            problems.append("--judge_api_key_env must be the NAME of an environment variable (letters, digits and "
                            "_, not starting with a digit) that holds the key, never the key itself")
        if self.max_retries < 0:
            problems.append(f"--max_retries must be >= 0, got {self.max_retries}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            problems.append(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.concurrency < 1:
            problems.append(f"--concurrency must be >= 1, got {self.concurrency}")
        if not (self.rpm >= 0 and math.isfinite(self.rpm)):
            problems.append(f"--rpm must be >= 0 (0: no limit), got {self.rpm}")
        return problems


def normalise_base_url(url: str) -> str:
    """The endpoint's API root, as requests and the cache key use it: ``scheme://host[:port]/v1``-style.

    ``http://h:p``, ``http://h:p/v1``, ``http://h:p/v1/`` and ``http://h:p/v1/chat/completions`` all give
    ``http://h:p/v1``; a path other than ``/v1`` (a proxy's prefix) is kept. Scheme and host are lower-cased
    and a default port dropped, so one endpoint has one cache key.

    Raises:
        ValueError: not an http(s) URL with a host, or one holding credentials, a query or a fragment (the
            message does not repeat the URL, which may hold a secret).
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials: put the key in the environment variable named by "
                         "--judge_api_key_env")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    host = parts.hostname
    if not host:
        raise ValueError("has no host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query (?...) or a fragment (#...)")
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    return f"{scheme}://{host}{path or '/v1'}"


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for. ``extra``: other body fields (top_p, stop, ...), kept sorted by name;
    ``key``: the caller's id for the item, neither sent nor part of the cache key."""

    messages: tuple[dict, ...]
    temperature: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    key: str = ""

    def __post_init__(self):
        messages = tuple(self.messages)
        if not messages:
            raise ValueError("ChatRequest needs at least one message")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"ChatRequest message {m!r} is not a {{role: str, content: str}} dict")
        extra = tuple(sorted(((str(k), v) for k, v in self.extra), key=lambda kv: kv[0]))
        clash = sorted({k for k, _ in extra} & RESERVED)
        if clash:
            raise ValueError(f"ChatRequest extra may not set {', '.join(clash)} (a field of its own)")
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "extra", extra)

    def body(self, model: str) -> dict:
        """The JSON body sent: the model, the messages, the temperature and the fields that are set."""
        body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in self.messages],
                                "temperature": float(self.temperature)}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra)
        return body


@dataclass
class ChatResult:
    """What came of a request: the first choice's text, or why there is none after every retry."""

    request: ChatRequest
    text: str | None
    error: str | None
    cached: bool
    usage: dict = field(default_factory=dict)
    attempts: int = 0


class TokenBucket:
    """``rpm`` request starts per minute at most: a bucket of one token refilled at ``rpm / 60`` per second.

    Each caller reserves the next free start time under the lock and sleeps outside it, so concurrent workers
    queue in order and any t seconds see at most ``1 + rpm * t / 60`` starts. ``clock`` and ``sleep`` are
    injected, so tests need no wall time. ``rpm`` 0: no limit.
    """

    def __init__(self, rpm: float, clock: Callable[[], float]):
        self.interval = 60.0 / rpm if rpm > 0 else 0.0
        self.clock = clock
        self.next_start: float | None = None
        self.lock = threading.Lock()

    def acquire(self, sleep: Callable[[float], Any]) -> None:
        """Wait (with ``sleep``) for this caller's start time."""
        if not self.interval:
            return
        with self.lock:
            now = self.clock()
            start = now if self.next_start is None else max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            sleep(start - now)


class ResponseCache:
    """The append-only JSONL of successful responses in ``folder``, shared safely between processes.

    Read once on open (after cutting a torn tail, under the lock); ``put`` appends one whole, fsynced line
    while holding an exclusive ``flock`` on the lock file (threads of this process take a mutex first, since
    a ``flock`` is held per open file, not per thread).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / CACHE_FILE
        self.mutex = threading.Lock()
        self.lock_fd = os.open(self.folder / (CACHE_FILE + ".lock"), os.O_CREAT | os.O_RDWR, 0o666)
        self.appender: JsonlAppender | None = None
        try:
            with self._locked():
                self.appender = JsonlAppender(self.path)  # cuts a killed writer's torn last line
                records, bad = read_jsonl(self.path)
        except BaseException:
            self.close()
            raise
        self.entries: dict[str, dict] = {}
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("text"), str):
                self.entries[record["key"]] = record
        if bad:
            # Whole lines that are not JSON can only come from outside this client (an edit, a disk error).
            print(f"judge: {len(bad)} unreadable line(s) in the cache ignored: {line_refs(str(self.path), bad)}",
                  file=sys.stderr)

    def _locked(self):
        return _Flock(self.lock_fd)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, record: dict) -> None:
        with self.mutex:
            self.entries[key] = record
            with self._locked():
                _cut_if_torn(self.path)
                self.appender.append([record])

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        if self.appender is not None:
            self.appender.close()
            self.appender = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


class _Flock:
    """An exclusive ``flock`` on an open file descriptor for the ``with`` block (waits for other holders)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _cut_if_torn(path: Path) -> None:
    """Cut a torn last line, reading only the last byte (the whole file only when it is torn)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return
        f.seek(size - 1)
        torn = f.read(1) != b"\n"
    if torn:
        cut_torn_tail(path)


def parse_retry_after(headers: Any, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait as the server asks: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP
    date (against the wall clock ``now``); clamped to [0, RETRY_AFTER_CAP]; None when absent or unreadable."""
    seconds = None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            seconds = None
    value = headers.get("retry-after")
    if seconds is None and value is not None:
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = when.timestamp() - now()
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


@dataclass
class _Outcome:
    """One HTTP attempt: ``text`` on success, else ``error``; ``retry`` whether another attempt may help."""

    text: str | None = None
    usage: dict = field(default_factory=dict)
    finish_reason: Any = None
    error: str | None = None
    retry: bool = False
    retry_after: float | None = None


class JudgeClient:
    """Sends ChatRequests to one endpoint and model with retries, a disk cache, a concurrency bound and a rate
    limit (see the module docstring). Use as a context manager, or call ``close``.

    Args:
        options: The endpoint, model, key variable and limits (``options.cache_dir`` is not read: ``cache_dir``
            is the folder the caller resolved).
        cache_dir: The cache folder (created if needed), shareable between runs and processes.
        clock, sleep: Monotonic time and waiting, for the rate limit and the backoff (tests inject fakes).
            With the default ``time.sleep``, waits end early when a ``complete_many`` call is being abandoned.
        transport: An httpx transport (tests: ``httpx.MockTransport``); default: httpx's own.
        rng: The jitter's random source (default: a fresh ``random.Random()``).

    Raises:
        UsageError: ``options.problems()`` is not empty.
    """

    def __init__(self, options: JudgeOptions, cache_dir: str | Path, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = time.sleep, transport: "httpx.BaseTransport | None" = None,
                 rng: random.Random | None = None):
        import httpx

        problems = options.problems()
        if problems:
            raise UsageError("\n".join(problems))
        if not str(cache_dir):
            raise ValueError("JudgeClient needs a cache folder")
        self.options = options
        self.base_url = normalise_base_url(options.judge_base_url)
        self.model = options.judge_model
        self._secret = os.environ.get(options.judge_api_key_env) or ""
        self._headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        # With the real sleep, waits are made on the call's stop event instead, so an abandoned call ends at once.
        self._sleep = None if sleep is time.sleep else sleep
        self._calls: set[threading.Event] = set()  # the stop events of the calls running now
        self._rng = rng or random.Random()
        self._bucket = TokenBucket(options.rpm, clock)
        self._mutex = threading.Lock()
        self._stats = dict.fromkeys(STATS, 0)
        self._in_flight = 0
        self._cache = ResponseCache(cache_dir)
        self._http = httpx.Client(
            timeout=httpx.Timeout(options.timeout), transport=transport, follow_redirects=False,
            limits=httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency))

    def __repr__(self) -> str:
        return f"JudgeClient({self.base_url!r}, model={self.model!r})"

    # -- the cache key --------------------------------------------------------------------------------------

    def cache_key(self, request: ChatRequest) -> str:
        """sha256 of the normalised base URL, the model, the messages, the temperature, max_tokens, seed and
        the extra sampling fields (canonical JSON: sorted keys, no whitespace, the temperature as a float)."""
        spec = {"base_url": self.base_url, "model": self.model, "messages": [dict(m) for m in request.messages],
                "temperature": float(request.temperature), "max_tokens": request.max_tokens, "seed": request.seed,
                "extra": [[k, v] for k, v in request.extra]}
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    # -- asking -----------------------------------------------------------------------------------------------

    def complete(self, request: ChatRequest) -> ChatResult:
        """One request (``complete_many`` of one, without a progress bar)."""
        return self.complete_many([request], progress=False)[0]

    def complete_many(self, requests: Sequence[ChatRequest], on_result: Callable[[ChatResult], None] | None = None,
                      desc: str = "judge", *, progress: bool = True) -> list[ChatResult]:
        """Every request's result, in the order of ``requests``.

        Cached ones come first without a request; the rest go to at most ``concurrency`` workers. A request
        repeated in ``requests`` is sent once, its repeats served as cached. ``on_result`` is called in the
        calling thread as each result arrives (cached ones first), so a caller can append it to its own JSONL
        at once. If it raises (or the caller is interrupted), no new attempt starts, the requests in flight
        finish (their responses are cached) and the exception propagates.

        Args:
            requests: The requests.
            on_result: Called with each ChatResult as it arrives.
            desc: The progress bar's label (the calling stage's name).
            progress: Show a progress bar (tqdm, on stderr).
        """
        results: list[ChatResult | None] = [None] * len(requests)
        bar = _progress(len(requests), desc) if progress else None
        stop = threading.Event()
        with self._mutex:
            self._calls.add(stop)

        def deliver(i: int) -> None:
            result = results[i]
            with self._mutex:
                self._stats["failed"] += result.text is None
            if bar is not None:
                bar.update(1)
            if on_result is not None:
                on_result(result)

        try:
            todo: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                key = self.cache_key(request)
                hit = self._cache.get(key) if key not in todo else None
                if hit is not None:
                    results[i] = ChatResult(request, hit["text"], None, True, dict(hit.get("usage") or {}), 0)
                    with self._mutex:
                        self._stats["cached"] += 1
                    deliver(i)
                else:
                    todo.setdefault(key, []).append(i)
            if todo:
                self._send(requests, todo, results, deliver, desc, stop)
        finally:
            stop.set()
            with self._mutex:
                self._calls.discard(stop)
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def _send(self, requests, todo: dict[str, list[int]], results: list, deliver, desc: str,
              stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(max_workers=min(self.options.concurrency, len(todo)), thread_name_prefix="judge")
        try:
            pending = {pool.submit(self._fetch, requests[indices[0]], key, desc, stop): key
                       for key, indices in todo.items()}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    key = pending.pop(future)
                    first = future.result()
                    for n, i in enumerate(todo[key]):
                        if n:
                            with self._mutex:
                                self._stats["cached"] += 1
                        results[i] = first if n == 0 else replace(first, request=requests[i], cached=True, attempts=0)
                        deliver(i)
        finally:
            # On the way out through an exception: no new attempt (``stop``), in-flight ones finish and are cached.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, request: ChatRequest, key: str, desc: str, stop: threading.Event) -> ChatResult:
        """One request with its retries (a worker thread); every success is cached before it is returned.
        ``stop`` set: the call is being abandoned, so no further attempt starts."""
        pause = stop.wait if self._sleep is None else self._sleep
        body = request.body(self.model)
        retries = self.options.max_retries
        attempts, outcome = 0, _Outcome(error="not sent")
        for attempt in range(retries + 1):
            if not stop.is_set():
                self._bucket.acquire(pause)
            if stop.is_set():  # checked after the token too: a wait cut short must not send
                return ChatResult(request, None, "cancelled: the run was stopped before this request was sent"
                                  + (f" (last error: {outcome.error})" if attempts else ""), False, {}, attempts)
            attempts += 1
            with self._mutex:
                self._in_flight += 1
                self._stats["requests"] += 1
                self._stats["retries"] += attempt > 0
                self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._in_flight)
            try:
                outcome = self._attempt(body)
            finally:
                with self._mutex:
                    self._in_flight -= 1
            if outcome.text is not None:
                usage = outcome.usage
                self._cache.put(key, {"key": key, "base_url": self.base_url, "model": self.model,
                                      "text": outcome.text, "usage": usage, "finish_reason": outcome.finish_reason})
                with self._mutex:
                    self._stats["prompt_tokens"] += usage.get("prompt_tokens", 0)
                    self._stats["completion_tokens"] += usage.get("completion_tokens", 0)
                return ChatResult(request, outcome.text, None, False, dict(usage), attempts)
            if not outcome.retry:
                return ChatResult(request, None, outcome.error, False, {}, attempts)
            if attempt == retries:
                break
            delay = outcome.retry_after
            if delay is None:
                delay = self._rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** attempt))
            _log(f"{desc}: {outcome.error}; retry {attempt + 1}/{retries} in {delay:.1f} s"
                 + (" (Retry-After)" if outcome.retry_after is not None else ""))
            pause(delay)
        return ChatResult(request, None, f"{outcome.error} (gave up after {attempts} attempt(s))", False, {}, attempts)

    def _attempt(self, body: dict) -> _Outcome:
        """One HTTP request and what it means for the retry loop."""
        import httpx

        try:
            response = self._http.post(self.base_url + "/chat/completions", json=body, headers=self._headers)
        except httpx.TimeoutException as e:
            return _Outcome(error=f"no answer within --timeout {self.options.timeout:g} s ({type(e).__name__})",
                            retry=True)
        except httpx.TransportError as e:
            return _Outcome(error=self._redact(f"connection error ({type(e).__name__}): {e}"), retry=True)
        status = response.status_code
        if 200 <= status < 300:
            return self._parse(response)
        message = self._redact(f"HTTP {status} from {self.base_url}: {_server_message(response)}")
        if status in RETRYABLE or status >= 500:
            return _Outcome(error=message, retry=True, retry_after=parse_retry_after(response.headers))
        return _Outcome(error=message)

    def _parse(self, response) -> _Outcome:
        """A 2xx body: the first choice's message content, or a malformed-body outcome (retried)."""
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}, not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            snippet = response.text[:200]
            return _Outcome(error=self._redact(f"malformed response (HTTP {response.status_code}, "
                                               f"{type(e).__name__}: {e}): {snippet!r}"), retry=True)
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        usage = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
                 if isinstance(usage.get(k), int) and not isinstance(usage.get(k), bool)}
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        return _Outcome(text=self._redact(text), usage=usage, finish_reason=reason)

    def _redact(self, text: str) -> str:
        if len(self._secret) >= MIN_SECRET and self._secret in text:
            return text.replace(self._secret, REDACTED)
        return text

    # -- accounting and life cycle ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Since the client opened: ``requests`` (HTTP requests sent, retries included), ``cached`` (results
        served without a request), ``failed`` (results without text), ``retries``, ``prompt_tokens`` and
        ``completion_tokens`` (as the server reported them, for requests sent now; cached ones cost nothing),
        ``max_in_flight``."""
        with self._mutex:
            return dict(self._stats)

    def close(self) -> None:
        with self._mutex:
            for stop in self._calls:
                stop.set()
        self._http.close()
        self._cache.close()

    def __enter__(self) -> "JudgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _server_message(response) -> str:
    """The server's own words: OpenAI's ``error.message``, FastAPI's ``detail``, else the body's start."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for value in (error, data.get("detail"), data.get("message")):
            if isinstance(value, str):
                return value
    text = response.text.strip()
    return text[:500] if text else response.reason_phrase or "(empty body)"


def _progress(total: int, desc: str):
    if total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


def _log(message: str) -> None:
    """A diagnostic line on stderr that does not break a progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
