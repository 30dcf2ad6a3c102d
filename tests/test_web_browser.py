"""Browser test of the web demo: Debian's Chromium, driven by Playwright, chats with the page.

For both backends (a model in process, and a live `lmforge serve`), it opens the page, sets the
temperature slider to 0, sends a message, and checks that the assistant's reply appears and
grows while it streams, that it ends as the model's exact reply, and that the page's controls
reached the backend.

Skipped only when Chromium is not installed; with LMFORGE_REQUIRE_BROWSER=1 (set by .ci/run) a
missing Chromium is a failure. Browsers are never downloaded (no `playwright install`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer, free_port
from lmforge.serve.web import build_web_app, launch
from lmforge.serve.web_backends import ChatBackend, LocalBackend, RemoteBackend
from threads import one_thread
from web_support import MODEL_NAME, PROMPT, REPLY, tiny_chat_engine, train_tiny_chat_model

# Root in a container needs --no-sandbox; the rest keeps Chromium from reaching the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records every text the last assistant message shows, as the DOM changes (polling could miss
# the intermediate states of a fast stream).
RECORD_REPLY_TEXTS = """() => {
    window.replyTexts = [];
    const chatbot = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const replies = chatbot.querySelectorAll('[data-testid="bot"]');
        if (!replies.length) return;
        const text = replies[replies.length - 1].innerText.trim();
        const seen = window.replyTexts;
        if (text && seen[seen.length - 1] !== text) seen.push(text);
    }).observe(chatbot, {subtree: true, childList: true, characterData: true});
}"""


def find_chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def chromium_path() -> str:
    """Chromium's path; otherwise a skip, or a failure when LMFORGE_REQUIRE_BROWSER=1."""
    found = find_chromium()
    if found:
        return found
    message = "Chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("LMFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message}, and LMFORGE_REQUIRE_BROWSER=1 requires the browser test to run")
    pytest.skip(f"{message}; set LMFORGE_REQUIRE_BROWSER=1 to make this a failure")


@pytest.mark.parametrize("required, outcome", [("1", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_chromium_skips_unless_required(monkeypatch, required, outcome):
    monkeypatch.setattr(f"{__name__}.find_chromium", lambda: None)
    monkeypatch.setenv("LMFORGE_REQUIRE_BROWSER", required)
    with pytest.raises(outcome, match="Chromium is not installed"):
        chromium_path()


class RecordingBackend(ChatBackend):
    """Passes everything through to a real backend and remembers what the page asked for."""

    def __init__(self, inner: ChatBackend) -> None:
        self.inner = inner
        self.name, self.max_concurrency, self.context_length = inner.name, inner.max_concurrency, inner.context_length
        self.requests: list[tuple[list[dict], object]] = []

    def stream_reply(self, messages, settings):
        self.requests.append((messages, settings))
        yield from self.inner.stream_reply(messages, settings)

    def model_info(self) -> str:
        return self.inner.model_info()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny_chat():
    with one_thread():
        yield train_tiny_chat_model()


def serve_page(backend: ChatBackend):
    """Launch the app for `backend` on a free localhost port; returns (app, url)."""
    app = build_web_app(backend)
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    return app, f"http://127.0.0.1:{port}/"


def chat_once(page: Page, url: str, system_prompt: str = "") -> list[str]:
    """Open the page, set temperature 0 (and a system prompt), send PROMPT; returns the reply's texts."""
    outside: list[str] = []

    def only_localhost(route):
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_localhost)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea")
    page.fill("#temperature input[type=number]", "0")
    page.press("#temperature input[type=number]", "Enter")
    if system_prompt:
        page.fill("#system-prompt textarea", system_prompt)
    page.evaluate(RECORD_REPLY_TEXTS)
    page.fill("#chat-input textarea", PROMPT)
    page.press("#chat-input textarea", "Enter")
    page.wait_for_selector('#chatbot [data-testid="user"]', timeout=15_000)
    # While the reply streams, the input is disabled and its submit button hidden; both come back
    # when it is done. Waiting for the first reply text first avoids seeing them before they go.
    page.wait_for_function("window.replyTexts.length > 0", timeout=30_000)
    page.wait_for_selector('#chat-input [data-testid="submit-button"]', timeout=30_000)
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=30_000)
    page.wait_for_timeout(300)   # let the last update render
    assert page.inner_text('#chatbot [data-testid="user"]').strip() == PROMPT
    assert not outside, f"the page tried to reach the network: {outside}"
    return page.evaluate("window.replyTexts")


def check_streamed(texts: list[str]) -> None:
    assert texts[-1] == REPLY, f"final reply {texts[-1]!r} != the model's {REPLY!r}"
    assert len(texts) >= 3, f"the reply did not stream, the page only showed {texts}"
    for shorter, longer in zip(texts, texts[1:]):
        assert len(shorter) < len(longer) and REPLY.startswith(shorter), f"{shorter!r} then {longer!r}"


def test_chat_streams_from_a_local_model(browser, tiny_chat):
    backend = RecordingBackend(LocalBackend(tiny_chat_engine(*tiny_chat), MODEL_NAME))
    app, url = serve_page(backend)
    page = browser.new_page()
    try:
        check_streamed(chat_once(page, url))
        info = page.inner_text("#model-info")
        assert MODEL_NAME in info and "parameters:" in info and "context length: 128 tokens" in info
    finally:
        page.close()
        app.close()
    [(messages, settings)] = backend.requests
    assert messages == [{"role": "user", "content": PROMPT}]
    assert settings.temperature == 0.0 and settings.top_p == 0.95 and settings.max_new_tokens == 63


def test_chat_streams_through_lmforge_serve(browser, tiny_chat):
    with BackgroundServer(create_app(tiny_chat_engine(*tiny_chat), MODEL_NAME)) as server:
        backend = RecordingBackend(RemoteBackend(server.url + "/v1"))
        app, url = serve_page(backend)
        page = browser.new_page()
        try:
            texts = chat_once(page, url, system_prompt="Be brief.")
            info = page.inner_text("#model-info")
            assert f"served by {server.url}/v1" in info and "context_length: 128" in info
        finally:
            page.close()
            app.close()
    [(messages, settings)] = backend.requests
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    assert settings.temperature == 0.0
    # The system prompt changes the conversation the model was trained on, so only the streaming
    # is checked here, not the exact text.
    assert len(texts) >= 3 and all(len(a) < len(b) for a, b in zip(texts, texts[1:]))
