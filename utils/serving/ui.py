"""The browser chat UI: a gradio Blocks app mounted on the server's own FastAPI app (``serve.py --ui``).

In the spirit of ChatGLM's ``web_demo.py``: a multi-turn chat whose answers stream in as they are decoded, with
"Maximum length", "Top P" and "Temperature" sliders, a Stop and a Clear History button. It is never launched on its
own: our uvicorn server serves it, on the host and port the server binds. gradio is an optional dependency, so it
is imported only when the UI is mounted.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

# gradio routes this UI has no use for, relative to the mount path. They are answered 404 before gradio sees them:
# ``file=`` serves local paths and fetches URLs, ``proxy=`` forwards requests and ``upload`` stores files on disk,
# and every one of them is reachable with or without the ``gradio_api/`` prefix.
_DENIED = ("file=", "file/", "proxy=", "upload")


def mount_ui(app, backend, *, path: str = "/ui", auth: tuple[str, str] | None = None, max_queue: int = 16,
             concurrency: int = 4) -> None:
    """Build the chat UI and mount it on ``app`` at ``path``; call it before the server starts.

    Args:
        app: the server's FastAPI app (gradio wraps its lifespan, so it must not have started yet).
        backend: the model side, with ``model_names`` (the first is the default), ``defaults`` (``max_tokens``,
            ``top_p``, ``temperature``), ``max_tokens_limit`` and ``stream_chat(model, messages, max_tokens, top_p,
            temperature)``, an async iterator of text deltas that raises ``ValueError`` for a request it refuses.
        path: where the UI is served, e.g. ``/ui``.
        auth: ``(user, password)`` that gradio asks for before showing the page; None for no login.
        max_queue: requests that may wait for a free slot; later ones are told the queue is full.
        concurrency: answers streamed at the same time.
    """
    import gradio as gr
    from fastapi.responses import PlainTextResponse

    path = "/" + path.strip("/")
    demo = _build(gr, backend, concurrency)
    demo.queue(max_size=max_queue, api_open=False)

    def deny(_request):
        return PlainTextResponse("Not Found", status_code=404)

    # Registered before gradio's mount, so these win on every method; the router matches the percent-decoded path,
    # so encoded spellings of the same route are denied as well.
    for prefix in ("", "gradio_api/"):
        for route in _DENIED:
            app.add_route(f"{path}/{prefix}{route}{{rest:path}}", deny, include_in_schema=False)
    gr.mount_gradio_app(
        app, demo, path=path, auth=auth, footer_links=[], run_history=False, ssr_mode=False, mcp_server=False,
        enable_monitoring=False, pwa=False,
        # Unexpected errors show as a plain "Error": their text may name server paths; the log has them.
        show_error=False,
        # Local fonts only: the server runs offline and the default theme would fetch Google Fonts.
        theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
    )


def _build(gr, backend, concurrency: int):
    """The Blocks app: chat, sliders and buttons, wired to ``backend``."""
    names = list(backend.model_names)
    defaults = backend.defaults
    with gr.Blocks(title="Chat", analytics_enabled=False) as demo:
        gr.Markdown(f"### Chat with {names[0]}" if len(names) == 1 else "### Chat")
        # allow_tags=False: model output is sanitised to standard HTML; markdown renders code fences and CJK as is.
        chatbot = gr.Chatbot(label="Chat", height=520, feedback_options=None, allow_tags=False,
                             buttons=["copy", "copy_all"], elem_id="chatbot")
        with gr.Row():
            textbox = gr.Textbox(show_label=False, placeholder="Type a message and press Enter", lines=1,
                                 max_lines=8, scale=8, elem_id="user_input")
            submit = gr.Button("Submit", variant="primary", scale=1)
        with gr.Row():
            stop = gr.Button("Stop")
            clear = gr.Button("Clear History")
        with gr.Row():
            model = gr.Dropdown(names, value=names[0], label="Model") if len(names) > 1 else gr.State(names[0])
            max_tokens = gr.Slider(1, backend.max_tokens_limit, value=defaults["max_tokens"], step=1,
                                   label="Maximum length", info="new tokens", elem_id="max_tokens")
            top_p = gr.Slider(0.01, 1, value=defaults["top_p"], step=0.01, label="Top P", elem_id="top_p")
            temperature = gr.Slider(0, 2, value=defaults["temperature"], step=0.01, label="Temperature",
                                    info="0 decodes greedily", elem_id="temperature")

        async def respond(message: str, history: list[dict], model_name: str, n: float, p: float, t: float):
            """Append the user's message and stream the answer into the last assistant message."""
            if not message.strip():
                yield gr.skip(), gr.skip()
                return
            history = _text_history(history)
            turn = history + [_message("user", message), _message("assistant", "")]
            yield "", turn
            answer = ""
            try:
                deltas = await _stream(backend, model_name, _openai(turn[:-1]), int(n), p, t)
                async with contextlib.aclosing(deltas):
                    async for delta in deltas:
                        answer += delta
                        turn[-1] = _message("assistant", answer)
                        yield gr.skip(), turn
            except ValueError as err:
                # A refused request: give the message back to edit, drop the unanswered turn, say why.
                gr.Warning(str(err))
                yield message, history

        event = gr.on([textbox.submit, submit.click], respond,
                      [textbox, chatbot, model, max_tokens, top_p, temperature], [textbox, chatbot],
                      concurrency_limit=concurrency, show_progress="minimal", api_visibility="private")
        # Cancelling closes respond's generator, whose aclosing() closes the backend's stream (frees its rows).
        stop.click(None, None, None, cancels=[event], queue=False)
        clear.click(lambda: [], None, chatbot, cancels=[event], queue=False, api_visibility="private")
    return demo


async def _stream(backend, model: str, messages: list[dict], max_tokens: int, top_p: float, temperature: float):
    """``backend.stream_chat``'s iterator, whether it is an async generator or a coroutine that returns one
    (which may refuse the request before the first token)."""
    deltas = backend.stream_chat(model, messages, max_tokens, top_p, temperature)
    return await deltas if inspect.isawaitable(deltas) else deltas


def _message(role: str, text: str) -> dict:
    # Content as a text part, not a bare string: gradio runs inspect.cleandoc on bare strings, which strips the
    # indentation of code and the leading space of an answer.
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _text_history(history: list[dict[str, Any]]) -> list[dict]:
    """The chat as the browser sent it, reduced to its text parts (nothing else is ours to send back)."""
    out = []
    for m in history or []:
        parts = m["content"] if isinstance(m["content"], list) else [m["content"]]
        text = "".join(p if isinstance(p, str) else p.get("text", "") for p in parts
                       if isinstance(p, str) or p.get("type") == "text")
        if m["role"] in ("user", "assistant", "system"):
            out.append(_message(m["role"], text))
    return out


def _openai(history: list[dict]) -> list[dict]:
    """OpenAI-style messages for the model. A turn stopped before its first token (an empty answer) is left out,
    so that the conversation the template renders still alternates user and assistant."""
    messages = [{"role": m["role"], "content": m["content"][0]["text"]} for m in history]
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and not m["content"] and out and out[-1]["role"] == "user":
            out.pop()
        else:
            out.append(m)
    return out
