"""The chat page in a real browser (Debian's Chromium, driven by Playwright). A module of its own: Playwright's sync
API keeps an event loop running in the test thread while its browser fixture lives, which would break any other
test of the module that runs asyncio (pytest-randomly may order tests so within a module)."""

import os

import httpx
import pytest

from nanochat.serve import create_app
from tests.serve.conftest import chat_prompt, greedy_reply, make_workers, serve, user

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install the chromium package to run the browser tests")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def send_and_wait(page, text, count):
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {count}")
    page.wait_for_function("document.querySelector('#send').textContent === 'Send'", timeout=30000)
    return page.locator(".msg.assistant .bubble").nth(count - 1)


def test_browser_chat_two_models(browser, models, tokenizer, tmp_path):
    app = create_app(make_workers(models, tokenizer, [("gpt_tiny", "gpt", "sft", 1),
                                                       ("alcoholic_tiny", "alcoholic", "sft", 1)]),
                     temperature=0.8, top_k=50, max_tokens=24)
    with serve(app) as url:
        context = browser.new_context(viewport={"width": 1000, "height": 700})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#model option').length === 2")
        assert page.is_visible("#model")  # two models: the picker is shown
        assert page.locator("#model option").all_inner_texts() == ["gpt_tiny", "alcoholic_tiny"]
        # greedy decoding, so the page must show exactly the engine's reply; count the text updates while it streams
        page.evaluate("""() => { const t = document.getElementById('temperature'); t.value = '0';
            t.dispatchEvent(new Event('input')); window.updates = 0;
            new MutationObserver((records) => { window.updates += records.length; })
                .observe(document.getElementById('messages'), {subtree: true, childList: true}); }""")
        assert page.inner_text("#temperature-value") == "0"
        history = [user("Hello! How are you?")]
        expected, n, _ = greedy_reply(models["gpt"], tokenizer, chat_prompt(tokenizer, history), 24)
        assert n >= 5  # a reply long enough to stream in pieces (fixed by the seeds)
        first = send_and_wait(page, history[0]["content"], 1)
        assert first.text_content() == expected
        assert page.evaluate("window.updates") >= 5  # one text update per streamed piece
        assert page.locator(".msg.assistant .meta span").nth(0).inner_text() == "gpt_tiny"
        page.select_option("#model", "alcoholic_tiny")
        history += [{"role": "assistant", "content": expected}, user("What is the capital of France?")]
        expected, _, _ = greedy_reply(models["alcoholic"], tokenizer, chat_prompt(tokenizer, history), 24)
        second = send_and_wait(page, history[2]["content"], 2)
        assert second.text_content() == expected  # the other model answered, with the whole history
        assert page.locator(".msg.assistant .meta span").nth(1).inner_text() == "alcoholic_tiny"
        assert [w["requests"] for w in httpx.get(url + "/stats").json()["workers"]] == [1, 1]
        page.locator(".msg.assistant .copy").nth(1).click()
        page.wait_for_function("document.querySelectorAll('.msg.assistant .copy')[1].textContent === 'Copied'")
        assert page.evaluate("navigator.clipboard.readText()") == second.text_content()
        page.screenshot(path=str(tmp_path / "chat_desktop.png"), full_page=True)
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        assert not errors, errors

        # phone width: no horizontal scrolling, controls still usable
        mobile = browser.new_page(viewport={"width": 375, "height": 740})
        mobile.goto(url)
        mobile.wait_for_function("document.querySelectorAll('#model option').length === 2")
        send_and_wait(mobile, "Once upon a time", 1)
        assert mobile.evaluate("document.documentElement.scrollWidth") <= 375
        for selector in ("#send", "#new-chat", "#model", "#top-k", "#input"):
            box = mobile.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
        mobile.screenshot(path=str(tmp_path / "chat_375px.png"), full_page=True)
        assert (tmp_path / "chat_desktop.png").stat().st_size > 5000
        assert (tmp_path / "chat_375px.png").stat().st_size > 5000
        context.close()
        mobile.close()


def test_browser_shows_errors_and_hides_single_picker(browser, models, tokenizer):
    app = create_app(make_workers(models, tokenizer, [("gpt_tiny", "gpt", "sft", 1)]), max_tokens=8)
    with serve(app) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#model option').length === 1")
        assert not page.is_visible("#model")  # one model: no picker
        page.fill("#input", "capital " * 200)  # longer than the 128-token context
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.error")
        assert "context of 128 tokens" in page.inner_text(".msg.error .bubble")
        assert page.locator(".msg.assistant").count() == 0
        page.close()

