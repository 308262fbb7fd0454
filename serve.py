"""Serving stage: an OpenAI-compatible HTTP server (and an optional browser chat) for any artifact the suite makes.

Serves a base model, a finetune.py output folder, a base plus a LoRA / DoRA / prefix / p-tuning /
prompt-tuning adapter (unmerged), a merged export, or a bitsandbytes 8-bit / 4-bit load: the same loader and
flags as generate.py. One process serves one base model plus any number of adapters of it
(``--adapters tuned=out/lora,pt=out/prefix``), each listed in ``/v1/models`` and picked by the request's
``model``; the base weights are loaded once.

Routes: ``POST /v1/chat/completions`` (messages rendered with the artifact's own template), ``POST
/v1/completions`` (text or token-id prompts; ``echo`` + ``logprobs`` for lm-eval), both with SSE streaming;
``GET /v1/models``; ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``; ``GET /health``, ``GET
/metrics`` (Prometheus); ``POST /`` (ChatGLM-6B api.py's body, stateless); ``/ui`` with ``--ui``.

Requests decode together (continuous batching: a new request joins the running batch at the next step), in
one engine thread that owns the model. Safe by default: binds 127.0.0.1; another address needs ``--api_key``
(or ``--insecure``); keys are compared in constant time and never logged; invalid requests get a 400 naming
the field; bounded batch and queue (429 beyond), body size (413), request time (504); SIGTERM drains.

Examples:
    python serve.py --base_model ../shared/models/stories260K/hf
    python serve.py --lora_weights runs/lora --adapters pt=runs/prefix --port 8001 --ui
    python serve.py --lora_weights runs/lora --host 0.0.0.0 --api_key_file keys.txt
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.cli import run
from utils.errors import SuiteError, UsageError
from utils.inference.options import Loading, Prompting, plan_loading
from utils.serving.models import Artifact, parse_adapters, same_base

_NOT_AN_OUTPUT = "serve.py writes no artifact: nothing is fingerprinted"


@dataclass(frozen=True)
class ServerFlags(Group):
    """Where the server listens, who may call it, and its bounds."""

    adapters: str = unfingerprinted("", why=_NOT_AN_OUTPUT)
    host: str = unfingerprinted("127.0.0.1", why=_NOT_AN_OUTPUT)
    port: int = unfingerprinted(8000, why=_NOT_AN_OUTPUT)
    model_name: str = unfingerprinted("", why=_NOT_AN_OUTPUT)
    api_key: str = unfingerprinted("", why=_NOT_AN_OUTPUT)
    api_key_file: str = unfingerprinted("", why=_NOT_AN_OUTPUT)
    max_batch_size: int = unfingerprinted(16, why=_NOT_AN_OUTPUT)
    max_queue: int = unfingerprinted(64, why=_NOT_AN_OUTPUT)
    max_model_len: int = unfingerprinted(0, why=_NOT_AN_OUTPUT)
    max_n: int = unfingerprinted(4, why=_NOT_AN_OUTPUT)
    max_body_mb: float = unfingerprinted(4.0, why=_NOT_AN_OUTPUT)
    request_timeout: float = unfingerprinted(600.0, why=_NOT_AN_OUTPUT)
    shutdown_timeout: float = unfingerprinted(30.0, why=_NOT_AN_OUTPUT)
    ui: bool = unfingerprinted(False, why=_NOT_AN_OUTPUT)
    ui_auth: str = unfingerprinted("", why=_NOT_AN_OUTPUT)
    cors_origins: str = unfingerprinted("", why=_NOT_AN_OUTPUT)
    insecure: bool = unfingerprinted(False, why=_NOT_AN_OUTPUT)

    def keys(self) -> list[str]:
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file and Path(self.api_key_file).is_file():
            lines = Path(self.api_key_file).read_text(encoding="utf-8").splitlines()
            keys += [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        return keys

    def problems(self) -> list[str]:
        p = []
        if not 0 <= self.port <= 65535:
            p.append(f"--port must be in 0..65535 (0: any free port), got {self.port}")
        for flag in ("max_batch_size", "max_queue", "max_n"):
            if getattr(self, flag) < (0 if flag == "max_queue" else 1):
                p.append(f"--{flag} must be >= {0 if flag == 'max_queue' else 1}, got {getattr(self, flag)}")
        if self.max_model_len < 0:
            p.append(f"--max_model_len must be >= 1 (0: the model's context), got {self.max_model_len}")
        for flag in ("max_body_mb", "request_timeout", "shutdown_timeout"):
            if not getattr(self, flag) > 0:
                p.append(f"--{flag} must be > 0, got {getattr(self, flag)}")
        if self.api_key_file:
            if not Path(self.api_key_file).is_file():
                p.append(f"--api_key_file {self.api_key_file}: no such file")
            elif not self.keys() or (self.api_key and len(self.keys()) == 1):
                p.append(f"--api_key_file {self.api_key_file}: no key in it (one key per line)")
        if self.ui_auth and (":" not in self.ui_auth or not all(self.ui_auth.partition(":")[::2])):
            p.append("--ui_auth must be USER:PASSWORD")
        if self.ui_auth and not self.ui:
            p.append("--ui_auth goes with --ui")
        if not loopback(self.host):
            if not self.keys() and not self.insecure:
                p.append(f"--host {self.host} is reachable from other machines: set --api_key or --api_key_file "
                         "(or pass --insecure to serve without a key)")
            if self.ui and not self.ui_auth:
                p.append(f"--ui on --host {self.host} needs --ui_auth USER:PASSWORD")
        p += parse_adapters(self.adapters)[1]
        return p


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeArgs(StageArgs):
    STAGE = "serve"

    loading: Loading
    prompting: Prompting
    server: ServerFlags


Args = ServeArgs


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    adapters: str = "",
    prompt_template: str = "",
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "",
    api_key: str = "",
    api_key_file: str = "",
    max_batch_size: int = 16,
    max_queue: int = 64,
    max_model_len: int = 0,
    max_n: int = 4,
    max_body_mb: float = 4.0,
    request_timeout: float = 600.0,
    shutdown_timeout: float = 30.0,
    ui: bool = False,
    ui_auth: str = "",
    cors_origins: str = "",
    insecure: bool = False,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    device: str = "auto",
    device_map: Literal["auto", "balanced", "sequential"] | None = None,
    max_memory: str | None = None,
    fast: Literal["auto", "on", "off"] = "auto",
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    allow_base_mismatch: bool = False,
) -> None:
    """Serve a model, an adapter or a finetune.py output folder over the OpenAI API (and a web chat with --ui).

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base, adapter and template are used).
        lora_weights: An adapter folder (LoRA, DoRA, prefix, p-tuning, prompt tuning) or a finetune.py output
            folder; its base model is read from its metadata unless --base_model is given.
        adapters: More adapters of the same base, NAME=PATH,NAME2=PATH2; each is a model id of its own.
        prompt_template: Template name or JSON path for chat requests; default: the one the artifact was trained
            with (alpaca if it carries none).
        host: Address to bind. 127.0.0.1 by default; any other needs --api_key (or --insecure).
        port: Port to bind (0: any free port, printed when ready).
        model_name: The model id in /v1/models (default: the artifact folder's name).
        api_key: A key clients must send as "Authorization: Bearer KEY" (every route but /health).
        api_key_file: A file of keys, one per line (lines starting with # are ignored).
        max_batch_size: Sequences decoding together (a request with n choices takes n).
        max_queue: Requests that may wait for room in the batch; beyond that, 429 with Retry-After.
        max_model_len: Most tokens of prompt + completion (0: the model's context).
        max_n: Most choices per request (and at most --max_batch_size: a request's rows decode together).
        max_body_mb: Largest request body, in MiB (413 beyond, never read whole).
        request_timeout: Seconds a request may take, waiting included (504, or an error event when streaming).
        shutdown_timeout: Seconds in-flight requests may take to finish after SIGTERM / SIGINT.
        ui: Serve a browser chat at /ui (gradio, in this process, on this host and port).
        ui_auth: USER:PASSWORD the browser chat asks for (required on a non-loopback --host).
        cors_origins: Comma-separated origins allowed to call the API from a browser (none by default; never
            with credentials).
        insecure: Allow a non-loopback --host without an API key.
        load_8bit: Load the base model in 8-bit (bitsandbytes).
        load_4bit: Load the base model in 4-bit NF4 (bitsandbytes).
        dtype: auto (fp32 on CPU, bf16 or fp16 on GPUs), fp32, bf16 or fp16 (not on CPU).
        device: auto, cpu, cuda, cuda:N or mps.
        device_map: Spread the model over all GPUs by layer: auto / balanced or sequential.
        max_memory: Memory per device for --device_map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.
        fast: The lean decode path for Llama-shaped models: auto (where it applies), on (required) or off.
        trust_remote_code: Allow custom model code from the model folder to run.
        allow_pickle_weights: Accept pytorch_model.bin / adapter_model.bin (loaded with weights_only=True).
        allow_base_mismatch: Apply an adapter to a base whose fingerprint differs from the one it was trained on.
    """
    args = ServeArgs.from_flags(dict(locals()))
    artifacts = plan(args)
    serve(args, artifacts)


def plan(args: ServeArgs) -> list[Artifact]:
    """Every check before anything heavy: flags, then each artifact's folder, tokenizer and template (no weights
    read). The served model ids, the primary first."""
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    loading, flags = args.loading, args.server
    primary = plan_loading(loading, args.prompting, stage="serve")
    name = flags.model_name or primary.info["model_id"]
    artifacts = [Artifact(name, primary, is_base=not primary.source.adapter)]
    errors = []
    for adapter_name, path in parse_adapters(flags.adapters)[0]:
        try:
            sub = plan_loading(dataclasses.replace(loading, base_model=primary.source.base, lora_weights=path),
                               args.prompting, stage="serve")
        except SuiteError as exc:
            errors.append(f"--adapters {adapter_name}={path}: {exc}")
            continue
        if not sub.source.adapter:
            errors.append(f"--adapters {adapter_name}={path}: not an adapter folder (serve a full model on its own)")
        elif not same_base(sub.source.base, primary.source.base):
            errors.append(f"--adapters {adapter_name}={path}: an adapter of {sub.source.base}, not of "
                          f"{primary.source.base}")
        artifacts.append(Artifact(adapter_name, sub))
    if primary.source.adapter or len(artifacts) > 1:
        base_name = Path(primary.source.base).resolve().name
        if all(a.name != base_name for a in artifacts):
            base_plan = dataclasses.replace(primary, source=dataclasses.replace(primary.source, adapter=None))
            artifacts.append(Artifact(base_name, base_plan, is_base=True))
    names = [a.name for a in artifacts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        errors.append(f"model ids given twice: {', '.join(dup)} (rename with --model_name or NAME= in --adapters)")
    if errors:
        raise UsageError("\n".join(errors))
    return artifacts


def serve(args: ServeArgs, artifacts: list[Artifact]) -> None:
    import uvicorn

    from utils.serving.app import Served, ServeConfig, Service, create_app, sampling_defaults
    from utils.serving.models import load_engine
    from utils.serving.worker import Worker

    flags = args.server
    config = ServeConfig(host=flags.host, port=flags.port, max_batch_size=flags.max_batch_size,
                         max_queue=flags.max_queue, max_model_len=flags.max_model_len or None,
                         max_n=min(flags.max_n, flags.max_batch_size),
                         max_body_mb=flags.max_body_mb, request_timeout=flags.request_timeout,
                         shutdown_timeout=flags.shutdown_timeout, api_keys=tuple(flags.keys()),
                         cors_origins=tuple(o.strip() for o in flags.cors_origins.split(",") if o.strip()))
    fast = {"auto": None, "on": True, "off": False}[args.loading.fast]
    models = {a.name: Served(a.name, a.name, a.plan.template, {}) for a in artifacts}
    tokenizer = artifacts[0].plan.tokenizer
    failure: list[BaseException] = []
    server_box: list = []

    def load():
        engine, variants = load_engine(artifacts, fast, log=lambda m: print(m, file=sys.stderr))
        for a in artifacts:
            models[a.name].variant = variants[a.name]
            models[a.name].defaults = sampling_defaults(engine.variants[variants[a.name]].model)
        return engine

    def ready(engine) -> None:
        service.on_loaded(engine)
        server = server_box[0]
        for _ in range(200):  # a tiny model can load before uvicorn has bound its socket
            if server.started:
                break
            time.sleep(0.05)
        port = flags.port
        if server.servers and server.servers[0].sockets:
            port = server.servers[0].sockets[0].getsockname()[1]
        served = ", ".join(f"{m.name} ({_describe(a)}, {m.context_len} tokens)"
                           for m, a in zip(models.values(), artifacts))
        extras = (" + web UI at /ui" if flags.ui else "") + (" (API key required)" if config.api_keys else "")
        print(f"serve: serving {served} on the {engine.runner.name} path at http://{_url_host(flags.host)}:{port}"
              f"{extras}", file=sys.stderr, flush=True)

    def failed(exc: BaseException) -> None:
        failure.append(exc)
        server_box[0].should_exit = True

    worker = Worker(load, config.max_batch_size, on_ready=ready, on_error=failed)
    service = Service(config, models, worker, tokenizer)
    app = create_app(service)
    if flags.ui:
        from utils.serving.ui import mount_ui
        from utils.serving.app import ChatBackend

        user, _, password = flags.ui_auth.partition(":")
        mount_ui(app, ChatBackend(service, _context_of(artifacts[0])), auth=(user, password) if flags.ui_auth else None,
                 max_queue=config.max_queue, concurrency=config.max_batch_size)
    uv_config = uvicorn.Config(app, host=flags.host, port=flags.port, log_level="warning", access_log=False,
                               http="h11", h11_max_incomplete_event_size=1024 * 1024, timeout_graceful_shutdown=5,
                               lifespan="on" if flags.ui else "off")
    server = draining_server(uv_config, service)
    server_box.append(server)
    worker.start()
    server.run()
    worker.stop()
    if failure:
        exc = failure[0]
        if isinstance(exc, SuiteError):
            raise exc
        raise SuiteError(f"loading failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    if not server.started and not server.drain_started:
        raise SuiteError(f"could not listen on {flags.host}:{flags.port} (in use, or not an address of this machine)")


def _context_of(artifact: Artifact) -> int:
    """The base model's context from its config.json (the UI is built before the weights are read)."""
    try:
        cfg = json.loads((Path(artifact.plan.source.base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2048
    return int(cfg.get("max_position_embeddings") or 2048)


def _describe(artifact: Artifact) -> str:
    src = artifact.plan.source
    what = f"{src.method or 'adapter'} adapter of {Path(src.base).name}" if src.adapter else f"model {src.base}"
    q = artifact.plan.info.get("quantization")
    return what + (f", {q}" if q else "") + f", {artifact.plan.info['dtype']}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def draining_server(config, service):
    """uvicorn's server with our SIGTERM / SIGINT handling: stop taking requests (503), let in-flight ones finish
    for up to --shutdown_timeout, end the rest with an error, then exit 0. A second signal exits at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def __init__(self):
            super().__init__(config)
            self.service = service
            self.drain_started = False
            self.loop = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            # Not recorded as captured: uvicorn would re-raise it at exit, and the process would end by the
            # signal (status 143) instead of 0 after a clean drain.
            if self.drain_started or self.loop is None or not self.service.ready:
                self.should_exit = True
                if self.drain_started:
                    self.force_exit = True
                return
            self.drain_started = True
            self.service.draining = True
            print("serve: draining (new requests get 503)", file=sys.stderr, flush=True)
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self):
            deadline = time.monotonic() + self.service.config.shutdown_timeout
            gate = self.service.gate
            while (gate.holders or gate.waiting) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left = self.service.abort_all()
            if left:
                print(f"serve: {left} request(s) still running after --shutdown_timeout: ended with an error",
                      file=sys.stderr, flush=True)
                for _ in range(40):  # let them send their error event and [DONE]
                    if not gate.holders and not gate.waiting:
                        break
                    await asyncio.sleep(0.05)
            self.should_exit = True

    return DrainingServer()


if __name__ == "__main__":
    run(main)
