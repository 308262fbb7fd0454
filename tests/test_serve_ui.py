"""The browser chat UI (``serve.py --ui``), driven in headless Chromium against the real server on stories260K.

The UI's answers are checked against the server's own OpenAI API: with temperature 0 both decode greedily, so the
chat must show exactly what ``/v1/chat/completions`` answers for the same conversation.
"""

from __future__ import annotations

import http.client
import json
import urllib.request
from pathlib import Path

import pytest

from conftest import STORIES
from serving import start_server

CHROMIUM = Path("/usr/bin/chromium")
MAX_TOKENS = 48
# The last assistant message, as the browser renders it.
LAST_BOT = "(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]'); " \
           "return b.length ? b[b.length - 1].innerText : null; })()"
# True once the chat shows `n` assistant messages and its event has finished (gradio hides the status tracker).
DONE = "(n) => document.querySelectorAll('#chatbot [data-testid=bot]').length >= n && " \
       "document.querySelector('#chatbot [data-testid=status-tracker]').classList.contains('hide')"
# Records every distinct text of the last assistant message as it changes, in the page, so that no streamed step
# is missed between two polls from here.
RECORD = """() => {
  window.__seen = [];
  if (window.__observer) window.__observer.disconnect();
  const last = () => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');
                       return b.length ? b[b.length - 1].innerText : null; };
  window.__observer = new MutationObserver(() => { const t = last();
    if (t && window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t); });
  window.__observer.observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``serve.py --ui`` on stories260K as a subprocess on a free port; yields its base URL."""
    # A conversation template (stories260K has none of its own), so that a second turn renders the first.
    with start_server("--base_model", str(STORIES), "--ui", "--prompt_template", "vicuna_v1.1", timeout=180,
                      log_dir=tmp_path_factory.mktemp("serve_ui")) as served:
        yield served.url


def _api_answer(base: str, messages: list[dict]) -> str:
    """The greedy answer of ``/v1/chat/completions`` for ``messages``: the reference the UI must match."""
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
        model = json.load(r)["data"][0]["id"]
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def _words(text: str) -> str:
    # The chat renders markdown, which folds runs of spaces and newlines; compare the words.
    return " ".join(text.split())


def _set_slider(page, elem_id: str, value: int | float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    assert float(page.locator(f"#{elem_id} input[type=range]").input_value()) == value, elem_id


def _ask(page, question: str, turn: int) -> list[str]:
    """Send ``question`` with Enter and wait until answer number ``turn`` is complete; returns the distinct texts
    the answer showed on the way."""
    page.evaluate(RECORD)
    box = page.locator("#user_input textarea")
    box.fill(question)
    box.press("Enter")
    page.wait_for_function(DONE, arg=turn, timeout=120_000)
    return page.evaluate("window.__seen")


@pytest.mark.slow
def test_ui_streams_multi_turn_greedy_answers_and_clears(server, tmp_path):
    """Drives a real browser against the real server (its start is shared with the probes below): about 15 s on
    2 cores plus the server's start, and nothing smaller shows what a user sees in the page."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    shot = tmp_path / "ui.png"
    first, second = "Once upon a time there was a little dog. What did the dog do?", "And then what happened?"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            # A gradio page keeps connections open, so "networkidle" never comes: wait for load, then the textbox.
            page.goto(server + "/ui/", wait_until="load")
            page.locator("#user_input textarea").wait_for(timeout=60_000)
            _set_slider(page, "max_tokens", MAX_TOKENS)
            _set_slider(page, "temperature", 0)

            seen = _ask(page, first, 1)
            answer = page.evaluate(LAST_BOT)
            expected = _api_answer(server, [{"role": "user", "content": first}])
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}; the first answer showed {len(set(seen))} distinct texts")
            assert _words(answer) == _words(expected), (
                f"first answer differs from the API's:\n{answer!r}\n{expected!r}\n(screenshot {shot})")
            steps = [_words(s) for s in seen if _words(s)]
            assert len(set(steps)) >= 3, f"the answer did not stream: {steps} (screenshot {shot})"
            assert all(_words(expected).startswith(s) for s in steps), f"{steps} (screenshot {shot})"

            _ask(page, second, 2)
            answer2 = page.evaluate(LAST_BOT)
            history = [{"role": "user", "content": first}, {"role": "assistant", "content": expected}]
            expected2 = _api_answer(server, history + [{"role": "user", "content": second}])
            # Otherwise a UI that dropped the history would pass.
            assert expected2 != _api_answer(server, [{"role": "user", "content": second}]), "history changes nothing"
            page.screenshot(path=str(shot), full_page=True)
            assert _words(answer2) == _words(expected2), (
                f"second answer is not the API's for the two turns:\n{answer2!r}\n{expected2!r}\n(screenshot {shot})")

            page.get_by_role("button", name="Clear History").click()
            page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=bot], "
                                   "#chatbot [data-testid=user]')", timeout=10_000)
        finally:
            browser.close()


# The routes that would serve a local file or fetch a URL for the caller, as they are written and encoded.
PROBES = ["/ui/file=/etc/passwd", "/ui/gradio_api/file=/etc/passwd", "/ui/gradio_api/file=../../etc/passwd",
          "/ui/gradio_api/file=..%2F..%2Fetc%2Fpasswd", "/ui/gradio_api/file%3D%2Fetc%2Fpasswd",
          "/ui/gradio_api/file=%2E%2E/%2E%2E/etc/passwd", "/ui/gradio_api/file/etc/passwd",
          "/ui/gradio_api/file=http://169.254.169.254/", "/ui/proxy=http://169.254.169.254/",
          "/ui/gradio_api/proxy=http://169.254.169.254/", "/ui/gradio_api/proxy%3Dhttp%3A%2F%2F169.254.169.254%2F"]


@pytest.mark.slow
def test_ui_file_and_proxy_routes_are_closed(server):
    """Needs the real server with --ui (shared with the browser test); the probes themselves take under a second."""
    assert _get(server + "/ui/") == 200 and _get(server + "/ui/config") == 200, "the UI is not served"
    port = int(server.rsplit(":", 1)[1])
    for probe in PROBES:
        # http.client sends the path as written: no client-side normalisation of ``..`` or of the escapes.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", probe)
        status = conn.getresponse().status
        conn.close()
        assert status in (403, 404), f"{probe} answered {status}"
