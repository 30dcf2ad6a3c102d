"""The arena page in real Chromium (Playwright, like test_web_browser.py): two tiny models stream
their answers side by side without their names, a vote is saved to the log, then the names show.

Skipped only when Chromium is not installed; with LMFORGE_REQUIRE_BROWSER=1 that is a failure.
"""
from __future__ import annotations

import pytest

from arena_support import PROMPT, REPLIES, arena_models
from lmforge.eval.arena_web import build_arena_app
from lmforge.eval.battle_log import BattleLog
from lmforge.infer import SamplingParams
from lmforge.serve.server import free_port
from lmforge.serve.web import launch
from test_web_browser import CHROMIUM_ARGS, chromium_path
from threads import one_thread

# Textarea values are properties, not DOM text, so a MutationObserver cannot see them: poll fast.
RECORD_ANSWERS = """() => {
    window.answers = [];
    const read = () => [document.querySelector('#answer-a textarea').value,
                        document.querySelector('#answer-b textarea').value];
    window.answerTimer = setInterval(() => {
        const now = read(), seen = window.answers, last = seen[seen.length - 1];
        if ((now[0] || now[1]) && (!last || last[0] !== now[0] || last[1] !== now[1])) seen.push(now);
    }, 10);
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def arena_page(tmp_path_factory):
    """The page for the two tiny models; yields (url, log)."""
    with one_thread():
        poet, clerk = arena_models()
        log = BattleLog(tmp_path_factory.mktemp("arena") / "battles.sqlite")
        # A short max_new_tokens would cut the replies; greedy replays them exactly.
        app = build_arena_app(poet, clerk, log, SamplingParams(max_new_tokens=60, temperature=0.0),
                              prompts=[PROMPT], seed=0)
        port = free_port()
        launch(app, host="127.0.0.1", port=port, block=False)
        try:
            yield f"http://127.0.0.1:{port}/", log
        finally:
            app.close()


def open_page(browser, url):
    page = browser.new_page()
    outside: list[str] = []

    def only_localhost(route):
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_localhost)
    page.goto(url)
    page.wait_for_selector("#arena-prompt textarea")
    return page, outside


def battle(page) -> list[list[str]]:
    """Type PROMPT, press Battle, wait until both answers are done; returns the answers' snapshots."""
    page.evaluate(RECORD_ANSWERS)
    page.fill("#arena-prompt textarea", PROMPT)
    page.click("#battle-button")
    page.wait_for_selector("#vote-a:not([disabled])", timeout=60_000)
    page.wait_for_timeout(200)
    page.evaluate("clearInterval(window.answerTimer)")
    return page.evaluate("window.answers")


def test_battle_vote_reveal_in_chromium(browser, arena_page):
    url, log = arena_page
    before = len(log)
    page, outside = open_page(browser, url)
    try:
        assert page.is_disabled("#vote-a") and page.is_disabled("#vote-both-bad")   # nothing to vote on yet
        snapshots = battle(page)
        answer_a = page.input_value("#answer-a textarea")
        answer_b = page.input_value("#answer-b textarea")
        assert {answer_a, answer_b} == set(REPLIES.values())
        # Anonymous until the vote: no model name anywhere in the page.
        content = page.content()
        assert not any(name in content for name in REPLIES), "a model's name showed before the vote"
        # Both answers streamed: the page showed part of each answer before the whole of it, and every
        # state was a prefix of the final text. (How many partial states the 10 ms poll catches
        # depends on the machine's load: at least one is what streaming guarantees.)
        for side, final in ((0, answer_a), (1, answer_b)):
            states = list(dict.fromkeys(s[side] for s in snapshots))
            partial = [state for state in states if state and state != final]
            assert partial, f"answer {'AB'[side]} did not stream: {states}"
            assert all(final.startswith(state) for state in states)

        page.click("#vote-b")
        page.wait_for_function("document.querySelector('#reveal').innerText.includes('Model A')", timeout=15_000)
        reveal = page.inner_text("#reveal")
        name_a = next(name for name, reply in REPLIES.items() if reply == answer_a)
        name_b = next(name for name, reply in REPLIES.items() if reply == answer_b)
        assert f"Model A: {name_a}" in reveal and f"Model B: {name_b}" in reveal and "B is better" in reveal
        page.wait_for_selector("#vote-a[disabled]", timeout=10_000)                # one vote per battle
        assert not outside, f"the page tried to reach the network: {outside}"
    finally:
        page.close()
    [record] = log.records()[before:]
    assert (record.model_a, record.model_b, record.winner) == (name_a, name_b, "b")
    assert (record.answer_a, record.answer_b, record.prompt, record.judge) == (answer_a, answer_b, PROMPT, "human")
    assert f"battle #{record.id} saved" in reveal


def test_two_voters_at_once(browser, arena_page):
    """Two pages battle and vote at the same time; both votes are saved."""
    url, log = arena_page
    before = len(log)
    pages = [open_page(browser, url)[0] for _ in range(2)]
    try:
        for page in pages:
            page.fill("#arena-prompt textarea", PROMPT)
        for page in pages:
            page.click("#battle-button")
        for page, vote in zip(pages, ("#vote-tie", "#vote-both-bad")):
            page.wait_for_selector(f"{vote}:not([disabled])", timeout=60_000)
            page.click(vote)
            page.wait_for_function("document.querySelector('#reveal').innerText.includes('saved')", timeout=15_000)
    finally:
        for page in pages:
            page.close()
    assert sorted(r.winner for r in log.records()[before:]) == ["both_bad", "tie"]


def test_random_prompt_button(browser, arena_page):
    url, _ = arena_page
    page, _ = open_page(browser, url)
    try:
        page.click("#random-prompt")
        page.wait_for_function(f"document.querySelector('#arena-prompt textarea').value === {PROMPT!r}",
                               timeout=10_000)
    finally:
        page.close()
