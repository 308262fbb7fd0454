"""Helpers for tests that run ``serve.py`` as a user would: a subprocess on a free local port.

``start_server(*flags)`` is a context manager: it starts ``[sys.executable, "serve.py", *flags]`` from the
repository root (offline), waits until ``GET /health`` answers 200 and yields a ``Server`` (its base URL, the
process and its stderr); on exit it sends SIGTERM and waits (SIGKILL after a timeout). ``metrics`` reads
``/metrics`` into numbers, ``sse_data`` splits a streamed body into its ``data:`` payloads. Servers get
``server_env()``: offline, one torch thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import httpx

from conftest import REPO

READY_LINE = re.compile(r"^serve: serving .* at http://(\S+):(\d+)", re.M)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}


def free_port() -> int:
    """A port no one listens on now (the kernel's pick for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with every hub download switched off."""
    return {**os.environ, **OFFLINE, **extra}


def server_env(**extra: str) -> dict[str, str]:
    """``offline_env`` plus one intra-op thread for torch (unless the caller's environment sets one).

    The server shares its cores with the test process (and, on a CI machine, with other jobs). With torch's
    default of one thread per core, each decoding step of a tiny model waits on whichever thread is descheduled:
    measured on 2 busy cores, 240 tokens for n=2 took 27 s with two threads and 1 s with one.
    """
    return offline_env(**{"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra})


@dataclass
class Server:
    """A running ``serve.py``: ``url`` (``http://127.0.0.1:PORT``), the process, and the file its stderr goes to."""

    url: str
    proc: subprocess.Popen
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def __str__(self) -> str:
        return self.url


def launch(*flags: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``serve.py *flags`` from the repository root, stdout discarded and stderr into ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "serve.py", *flags], cwd=REPO, env=env or server_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120,
                 headers: dict | None = None) -> None:
    """Poll ``url/health`` until it answers 200; fail with the server's stderr if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise AssertionError(f"serve.py exited with {code} before it was ready:\n"
                                 f"{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"serve.py not ready after {timeout:g} s:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/health", timeout=5, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def start_server(*flags: str, env: dict | None = None, timeout: float = 120,
                 log_dir: Path | None = None) -> Iterator[Server]:
    """Run ``serve.py *flags`` on 127.0.0.1 until the block ends; yields a ``Server`` once ``/health`` is 200.

    A free port is chosen here unless ``flags`` carry ``--port``; with ``--port 0`` the port is read from the
    server's ``serve: serving ... at http://HOST:PORT`` line.

    Args:
        flags: serve.py's command line (``--base_model`` and the rest).
        env: the environment (default: ``server_env()``).
        timeout: seconds to wait for readiness.
        log_dir: where the stderr file goes (default: a temporary folder removed at the end).
    """
    with contextlib.ExitStack() as stack:
        folder = log_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve_")))
        log = Path(folder) / f"serve_{time.monotonic_ns()}.stderr"
        flags = tuple(str(f) for f in flags)
        port = None
        if "--port" not in flags:
            port = free_port()
            flags += ("--port", str(port))
        elif flags[flags.index("--port") + 1] != "0":
            port = int(flags[flags.index("--port") + 1])
        proc = launch(*flags, log=log, env=env)
        try:
            if port is None:
                port = _announced_port(proc, log, timeout)
            url = f"http://127.0.0.1:{port}"
            wait_healthy(proc, url, log, timeout)
            yield Server(url, proc, log)
        finally:
            stop(proc)


def _announced_port(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = READY_LINE.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(2))
        if proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"serve.py printed no 'serve: serving ... at' line:\n{log.read_text(errors='replace')}")


# -- reading answers ----------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {``name`` or ``name{labels}``: value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    """The server's ``GET /metrics`` as numbers (see ``parse_metrics``)."""
    r = httpx.get(url + "/metrics", timeout=10, headers=headers)
    r.raise_for_status()
    return parse_metrics(r.text)


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data:`` payloads of an SSE body given line by line, as they arrive (comments, pings and other fields
    skipped)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()
