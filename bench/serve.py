"""Serving (P6): our OpenAI-compatible ``serve.py`` under sequential, concurrent and staggered streaming clients,
against Hugging Face's own ``transformers serve --continuous-batching`` on the same model, on CPU.

The model is built here as in bench/generate.py (its ``bpe_tokenizer`` and ``random_llama``): a randomly
initialised Llama of 58M parameters, fp32, with a 32000-token byte-level BPE tokenizer trained locally on
../shared data, saved to a temporary folder with the alpaca template written as the tokenizer's Jinja
``chat_template`` (``utils.data.chat_template.to_jinja``), so that both servers render the same prompt.
Ours runs as ``serve.py --base_model MODEL_DIR --prompt_template alpaca --dtype fp32 --device cpu
--max_batch_size max(16, REQUESTS)``. Requests, the same kind for both servers: the first --requests Vicuna-80
questions, one user message each, to ``/v1/chat/completions`` with ``stream: true``, greedy
(``temperature: 0``), ``max_tokens`` --max_tokens and ``stream_options: {include_usage: true}``. EOS is
suppressed so that every request makes exactly --max_tokens tokens: ours gets our ``ignore_eos: true``
extension; ``transformers serve`` refuses unknown fields (422) and ignores ``stream_options`` (it always sends
usage in its final chunk, and no ``[DONE]``), so it gets its own ``generation_config`` field,
``{"eos_token_id": -1}`` (continuous batching then has no EOS). Completion tokens are counted from each
stream's final usage chunk (from the number of content chunks where a server sends none), and tokens/s from
those counts.

Measured in one run, each server a subprocess on 127.0.0.1 (ready when ``GET /health`` answers 200; for
``transformers serve``, whose health is 200 as soon as uvicorn is up, that is after it has preloaded the
forced model), after a warm-up (one short request, then all of them at once, 4 tokens each):
  (a) sequential   the requests one after another, through our server;
  (b) concurrent   one client per request, all started together, through our server;
  (c) staggered    one client per request, started --stagger s apart, through our server;
  (d) peer         (b)'s concurrent clients through ``transformers serve --continuous-batching --device cpu
                   --dtype float32 MODEL_DIR`` (started after ours has exited; --nopeer skips it).
Figures per run: aggregate completion tokens/s (all completion tokens / wall time of the run), time to first
token (TTFT: request sent to first non-empty content chunk) p50/p99, inter-token latency (gaps between
consecutive content chunks of a stream, all streams pooled) p99, median end-to-end latency, and the client
process's CPU time as a fraction of the run's wall time (one asyncio loop with httpx; a fraction near 1
would mean the clients, not the server, set the pace), with the 1-minute load average at its end (on a
shared machine, other work slows every figure). Texts of (a) and (b) are compared request by request.
Targets (printed, never asserted): (b)/(a) tokens/s >= 5; (b)/(d) >= 2 with a lower p99 TTFT; p99 TTFT in
(b) <= 1 s; p99 TTFT in (c) <= 0.1 x the median end-to-end latency in (c); every text of (a) equal to (b)'s.

Run: .venv/bin/python bench/serve.py [--requests 16] [--max_tokens 128] [--stagger 0.25] [--nopeer] [--threads 1]
     (on the 2-core machine: about 2 minutes with --threads 1; 7 to 10 with torch's default threads while other
     work shares the cores, whose contention then dominates every figure)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

#: Environment of both servers: nothing is ever downloaded, and the transformers CLI skips its version check.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
#: Seconds a server may take from start to a 200 on /health.
READY_TIMEOUT_S = 300.0


def build_model(folder: Path) -> float:
    """Save bench/generate.py's random 58M Llama and its tokenizer, with the alpaca chat template, to
    ``folder``; return the parameter count in millions."""
    from bench.generate import bpe_tokenizer, random_llama
    from utils.data.chat_template import to_jinja
    from utils.data.templates import load_template

    tok = bpe_tokenizer(32000)
    model = random_llama(tok)
    tok.chat_template = to_jinja(load_template("alpaca"))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters()) / 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(name: str, cmd: list[str], port: int, env: dict[str, str]):
    """Start ``cmd`` (a server on 127.0.0.1:``port``, with ``env`` added to the environment), wait for /health
    200 and yield (base URL, seconds it took to be ready); terminate it at the end. On any error its captured
    output is shown and its log kept; otherwise the log is removed."""
    import httpx

    log = tempfile.NamedTemporaryFile(prefix=f"p6-{name.replace(' ', '_')}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready")
            if time.perf_counter() - t > READY_TIMEOUT_S:
                raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S:.0f} s")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        ready_s = time.perf_counter() - t
        print(f"{name}: ready after {ready_s:.1f} s", file=sys.stderr, flush=True)
        yield url, ready_s
    except BaseException:
        log.flush()
        tail = Path(log.name).read_text(encoding="utf-8", errors="replace")[-6000:]
        print(f"--- {name} ({' '.join(cmd)}), last output (all of it in {log.name}):\n{tail}\n---",
              file=sys.stderr)
        log.close()
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not log.closed:  # no error: nothing to keep
            log.close()
            os.unlink(log.name)


@dataclass
class Stream:
    """One streamed request as the client saw it (perf_counter seconds)."""
    sent: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    done: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    from_usage: bool = False
    finish_reason: str | None = None


async def stream_one(client, url: str, body: dict, delay: float = 0.0) -> Stream:
    """Send one streaming chat request after ``delay`` seconds and time its content chunks."""
    await asyncio.sleep(delay)
    s = Stream(sent=time.perf_counter())
    parts, usage = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/chat/completions {json.dumps(body)[:300]} -> {r.status_code}: "
                               f"{(await r.aread()).decode(errors='replace')[:1000]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    s.chunk_times.append(time.perf_counter())
                    parts.append(content)
                s.finish_reason = choice.get("finish_reason") or s.finish_reason
    s.done = time.perf_counter()
    s.text = "".join(parts)
    s.from_usage = usage is not None
    s.completion_tokens = usage["completion_tokens"] if usage else len(s.chunk_times)
    s.prompt_tokens = usage.get("prompt_tokens") if usage else None
    return s


async def run_clients(url: str, bodies: list[dict], mode: str, stagger: float = 0.0):
    """Send ``bodies`` one after another (``sequential``) or one client each, started ``stagger`` s apart
    (``concurrent``: 0); return (streams in input order, wall s, client CPU s)."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(None),
                                 limits=httpx.Limits(max_connections=len(bodies) + 1)) as client:
        t, cpu = time.perf_counter(), time.process_time()
        if mode == "sequential":
            streams = [await stream_one(client, url, b) for b in bodies]
        else:
            streams = await asyncio.gather(*(stream_one(client, url, b, i * stagger) for i, b in enumerate(bodies)))
        return list(streams), time.perf_counter() - t, time.process_time() - cpu


def figures(streams: list[Stream], wall: float, cpu: float) -> dict:
    """One run's figures from its streams, its wall time and the client's CPU time (seconds)."""
    import numpy as np

    tokens = sum(s.completion_tokens for s in streams)
    ttft = [s.chunk_times[0] - s.sent for s in streams if s.chunk_times]
    itl = [b - a for s in streams for a, b in zip(s.chunk_times, s.chunk_times[1:])]
    latency = [s.done - s.sent for s in streams]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 4) if xs else None  # noqa: E731
    return {
        "tok_s": round(tokens / wall, 2),
        "completion_tokens": tokens,
        "tokens_per_request": sorted({s.completion_tokens for s in streams}),
        "tokens_counted_from": "usage" if all(s.from_usage for s in streams) else "content chunks",
        "finish_reasons": sorted({str(s.finish_reason) for s in streams}),
        "wall_s": round(wall, 3),
        "p50_ttft_s": pct(ttft, 50),
        "p99_ttft_s": pct(ttft, 99),
        "p99_itl_s": pct(itl, 99),
        "median_itl_s": pct(itl, 50),
        "median_latency_s": pct(latency, 50),
        "client_cpu_fraction": round(cpu / wall, 3),
    }


def request_bodies(questions: list[str], model: str, max_tokens: int, extra: dict) -> list[dict]:
    return [{"model": model, "messages": [{"role": "user", "content": q}], "stream": True, "temperature": 0,
             "max_tokens": max_tokens, "stream_options": {"include_usage": True}, **extra} for q in questions]


def bench_server(name: str, url: str, bodies: list[dict], modes: list[tuple[str, str, float]]) -> dict:
    """Warm-up (one short request, then all of them at once, short), then each (label, mode, stagger) run in
    turn: {label: (streams, figures)}. Warming both shapes keeps one-time costs (continuous batching's set-up
    on its first request, first use of a batch size) out of whichever run would meet them first."""
    log = lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    short = [{**b, "max_tokens": min(4, b["max_tokens"])} for b in bodies]
    asyncio.run(run_clients(url, short[:1], "sequential"))
    asyncio.run(run_clients(url, short, "concurrent"))
    out = {}
    for label, mode, stagger in modes:
        streams, wall, cpu = asyncio.run(run_clients(url, bodies, mode, stagger))
        # The machine may be shared: the load average says how much else ran (the server itself adds up to
        # its thread count).
        out[label] = (streams, {**figures(streams, wall, cpu), "load_avg_1min": round(os.getloadavg()[0], 2)})
        log(f"{label}: " + json.dumps(out[label][1]))
    return out


def main(requests: int = 16, max_tokens: int = 128, stagger: float = 0.25, peer: bool = True,
         threads: int = 0) -> None:
    """Run the benchmark.

    Args:
        requests: Vicuna-80 questions sent in each run (the first ones of the file).
        max_tokens: Completion tokens per request (exactly: EOS is suppressed on both servers).
        stagger: Seconds between client starts in the staggered run (c).
        peer: Also run (d), the concurrent clients through ``transformers serve --continuous-batching``
            (``--nopeer`` skips it).
        threads: torch threads of both servers (``OMP_NUM_THREADS``; 0: torch's default). On a shared machine, 1
            keeps other load from stalling OpenMP's per-operation barriers.
    """
    with open(SHARED / "data" / "vicuna_question_80.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line)["text"] for line in f][:requests]
    env = {**SERVER_ENV, **({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})}
    with tempfile.TemporaryDirectory(prefix="p6-model-") as tmp:
        folder = Path(tmp) / "llama58M"
        params_m = build_model(folder)
        print(f"model: {params_m:.1f}M parameters, fp32, in {folder}", file=sys.stderr, flush=True)

        port = free_port()
        # The folder carries no template.json: name the template its chat_template was written from.
        ours_cmd = [sys.executable, "serve.py", "--base_model", str(folder), "--prompt_template", "alpaca",
                    "--dtype", "fp32", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
                    "--model_name", "llama58M", "--max_batch_size", str(max(16, requests))]
        with running_server("serve.py", ours_cmd, port, env) as (url, ours_ready):
            ours = bench_server("serve.py", url, request_bodies(questions, "llama58M", max_tokens,
                                                                {"ignore_eos": True}),
                                [("sequential", "sequential", 0.0), ("concurrent", "concurrent", 0.0),
                                 ("staggered", "concurrent", stagger)])

        theirs, peer_ready = None, None
        if peer:
            port = free_port()
            peer_cmd = [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching",
                        "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
                        str(folder)]
            with running_server("transformers serve", peer_cmd, port, env) as (url, peer_ready):
                # The server is pinned to the folder given on its command line and refuses any other model id.
                theirs = bench_server("transformers serve", url,
                                      request_bodies(questions, str(folder), max_tokens,
                                                     {"generation_config": json.dumps({"eos_token_id": -1})}),
                                      [("concurrent", "concurrent", 0.0)])["concurrent"]

    report(ours, theirs, params_m, ours_ready, peer_ready,
           {"requests": requests, "max_tokens": max_tokens, "stagger_s": stagger, "threads": threads or "default"})


def report(ours: dict, theirs, params_m: float, ours_ready: float, peer_ready, config: dict) -> None:
    """Print every run's figures and the targets on stderr, and the RESULT line on stdout."""
    seq_streams, seq = ours["sequential"]
    con_streams, con = ours["concurrent"]
    _, stag = ours["staggered"]
    peer_streams, peer = theirs if theirs else (None, None)
    stag_ratio = stag["p99_ttft_s"] / stag["median_latency_s"]
    identical = all(a.text == b.text for a, b in zip(seq_streams, con_streams))
    result = {
        "throughput_ratio": round(con["tok_s"] / seq["tok_s"], 2),
        "sequential_tok_s": seq["tok_s"],
        "concurrent_tok_s": con["tok_s"],
        "p50_ttft_s": con["p50_ttft_s"],
        "p99_ttft_s": con["p99_ttft_s"],
        "p99_itl_s": con["p99_itl_s"],
        "staggered_p99_ttft_s": stag["p99_ttft_s"],
        "staggered_ttft_to_latency_ratio": round(stag_ratio, 4),
        "outputs_identical": identical,
        # A random model's greedy text is mostly repetition: how many requests differ says what the check is worth.
        "distinct_texts": len({s.text for s in con_streams}),
        "vs_transformers_serve_ratio": round(con["tok_s"] / peer["tok_s"], 2) if peer else None,
        "transformers_serve_tok_s": peer["tok_s"] if peer else None,
        "transformers_serve_p99_ttft_s": peer["p99_ttft_s"] if peer else None,
        "sequential_median_latency_s": seq["median_latency_s"],
        "concurrent_median_latency_s": con["median_latency_s"],
        "staggered_tok_s": stag["tok_s"],
        "staggered_median_latency_s": stag["median_latency_s"],
        "transformers_serve_p50_ttft_s": peer["p50_ttft_s"] if peer else None,
        "transformers_serve_p99_itl_s": peer["p99_itl_s"] if peer else None,
        "transformers_serve_median_latency_s": peer["median_latency_s"] if peer else None,
        # Same model, same prompts, both greedy in fp32: equal texts say both do the same work.
        "texts_equal_vs_transformers_serve": (
            round(sum(a.text == b.text for a, b in zip(con_streams, peer_streams)) / len(con_streams), 3)
            if peer else None),
        "prompt_tokens_equal_vs_transformers_serve": (
            all(a.prompt_tokens == b.prompt_tokens for a, b in zip(con_streams, peer_streams)) if peer else None),
        "completion_tokens": {**{label: r[1]["completion_tokens"] for label, r in ours.items()},
                              "transformers_serve": peer["completion_tokens"] if peer else None},
        "load_avg_1min": {k: f["load_avg_1min"] for k, f in
                          (("sequential", seq), ("concurrent", con), ("staggered", stag), ("transformers_serve", peer))
                          if f},
        "max_client_cpu_fraction": max(f["client_cpu_fraction"] for f in [seq, con, stag] + ([peer] if peer else [])),
        "ready_s": {"ours": round(ours_ready, 1), "transformers_serve": round(peer_ready, 1) if peer else None},
        "config": {**config, "params_m": round(params_m, 2)},
    }
    targets = {
        "concurrent/sequential tok/s >= 5": result["throughput_ratio"] >= 5,
        "concurrent p99 TTFT <= 1.0 s": con["p99_ttft_s"] <= 1.0,
        "staggered p99 TTFT <= 0.1 x median latency": stag_ratio <= 0.1,
        "texts of (a) and (b) identical": identical,
    }
    if peer:
        targets["ours/transformers serve tok/s >= 2"] = result["vs_transformers_serve_ratio"] >= 2
        targets["p99 TTFT below transformers serve's"] = con["p99_ttft_s"] < peer["p99_ttft_s"]
    print(json.dumps({"sequential": seq, "concurrent": con, "staggered": stag, "transformers_serve": peer},
                     indent=2), file=sys.stderr)
    for name, met in targets.items():
        print(f"target {'met   ' if met else 'MISSED'}  {name}", file=sys.stderr)
    result["targets_met"] = f"{sum(targets.values())}/{len(targets)}"
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    from utils.cli import run

    run(main)
