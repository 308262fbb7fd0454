"""The engine thread: the one thread that owns the model and drives the continuous batcher.

The event loop never runs model code. It hands work over through a queue (``submit`` a request's rows,
``cancel`` them, ``call`` a function such as a prompt-scoring forward) and receives, for each request, the
tokens and text its rows produced, pushed into an ``asyncio.Queue`` from this thread
(``loop.call_soon_threadsafe``). A cancelled request's rows leave the batch before its next forward pass.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

IDLE_WAIT_S = 0.5  # how long the idle thread sleeps on its queue before looking again


@dataclass
class Update:
    """What one row of a request produced in one step."""

    index: int  # the row (choice) within its request
    text: str  # newly visible text (maybe "")
    logprobs: list  # TokenLogprob of the tokens taken since the last update
    completion: Any  # the row's Completion once it has ended, else None


class Job:
    """One request's rows in the engine; ``updates`` receives lists of ``Update`` (or an Exception)."""

    def __init__(self, rows: list, loop: asyncio.AbstractEventLoop):
        self.rows = rows
        for i, r in enumerate(rows):
            r.tag = (self, i)
        self.loop = loop
        self.updates: asyncio.Queue = asyncio.Queue()
        self.sent = [0] * len(rows)  # logprobs already handed over, per row
        self.prompt_tokens = sum(len(r.prompt) for r in rows)

    @property
    def finished(self) -> bool:
        return all(r.completion is not None for r in self.rows)


class Worker:
    """Runs ``load()`` (which returns an Engine) and then the decode loop, in its own thread.

    Args:
        load: builds the engine (reads the weights); runs in the thread, so the server answers 503 meanwhile.
        max_rows: rows decoding at once (the scheduler's bound; the server admits no more than that).
        on_ready / on_error: called in the thread when loading succeeded / failed.
    """

    def __init__(self, load: Callable[[], Any], max_rows: int, on_ready: Callable[[Any], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        self.load, self.max_rows = load, max_rows
        self.on_ready, self.on_error = on_ready, on_error
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.engine = None
        self.scheduler = None
        self.jobs: set[Job] = set()
        self.generated_tokens = 0  # every token taken by every row (read by the metrics)
        self.steps = 0
        self.thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        self.thread.join(timeout)

    @property
    def rows_running(self) -> int:
        return self.scheduler.running if self.scheduler is not None else 0

    # -- from the event loop ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(engine)`` in the engine thread, between two decode steps."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.inbox.put(("call", (fn, future, loop)))
        return await future

    # -- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = self.load()
            self.scheduler = self.engine.scheduler(self.max_rows)
        except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits with the message
            if self.on_error is not None:
                self.on_error(exc)
            return
        if self.on_ready is not None:
            self.on_ready(self.engine)
        while not self._stop.is_set():
            self._drain_inbox(block=self.scheduler.idle)
            if not self.scheduler.idle:
                self._tick()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            job = payload
            if job.finished:
                return
            self.jobs.add(job)
            try:
                self.scheduler.submit(job.rows)
            except (KeyError, ValueError) as exc:
                self.jobs.discard(job)
                self._push(job, exc)
        elif kind == "cancel":
            job = payload
            if job in self.jobs:
                self.scheduler.cancel(job.rows)
                self.jobs.discard(job)
        elif kind == "call":
            fn, future, loop = payload
            try:
                result, error = fn(self.engine), None
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting request
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _tick(self) -> None:
        try:
            events = self.scheduler.tick()
        except Exception as exc:  # noqa: BLE001 - every running request gets the error, the server goes on
            traceback.print_exc()
            for job in list(self.jobs):
                self.scheduler.cancel(job.rows)
                self._push(job, RuntimeError(f"the engine failed: {type(exc).__name__}"))
            self.jobs.clear()
            self.scheduler = self.engine.scheduler(self.max_rows)
            return
        self.steps += 1
        self.generated_tokens += len(events)
        by_job: dict[Job, dict[int, Update]] = {}
        for row, piece in events:
            job, index = row.tag
            logprobs = row.logprobs[job.sent[index]:]
            job.sent[index] = len(row.logprobs)
            updates = by_job.setdefault(job, {})
            if index in updates:  # admitted and stepped in one tick: one update with both tokens
                earlier = updates[index]
                updates[index] = Update(index, earlier.text + piece, earlier.logprobs + logprobs, row.completion)
            else:
                updates[index] = Update(index, piece, logprobs, row.completion)
        for job, updates in by_job.items():
            if job.finished:
                self.jobs.discard(job)
            self._push(job, list(updates.values()))

    @staticmethod
    def _push(job: Job, item: Any) -> None:
        job.loop.call_soon_threadsafe(job.updates.put_nowait, item)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
