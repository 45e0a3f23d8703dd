"""The dashboard's prompt box against a real served instance, in a real headless Chromium: it
types a prompt, sees the answer arrive chunk by chunk (server-sent events from
/v1/chat/completions), and shows the live ms/token next to the plan's. Skips, saying why, only
where no Chromium is installed."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.api.test_browser import CHROMIUM_ARGS, WAIT_MS, chromium_path
from tests.e2e.test_serve_batching import INSTANCE, TOKEN, served

pytestmark = pytest.mark.browser
__all__ = ["served"]  # the fixture, shared with the batching test

# Records every length the answer passes through, so the test sees it grow (a stream) rather
# than appear at once.
WATCH = """(el) => {
  window.__lengths = [];
  new MutationObserver(() => window.__lengths.push(el.textContent.length))
    .observe(el, { childList: true, characterData: true, subtree: true });
}"""


async def test_prompt_box_streams_an_answer(served: tuple[str, web.Application]) -> None:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium installed (Debian: apt-get install -y chromium)")
    from playwright.async_api import async_playwright, expect

    api_url, _ = served
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(api_url + "/")
            box = page.locator(f'.prompt-box[data-instance-id="{INSTANCE}"]')
            await expect(box).to_be_visible(timeout=WAIT_MS)
            await box.locator(".prompt-token").fill(TOKEN)
            await box.locator(".prompt-input").fill("What is the capital of France?")
            await box.locator(".prompt-answer").evaluate(WATCH)
            await box.locator(".prompt-send").click()
            speed = box.locator(".prompt-speed")
            await expect(speed).to_contain_text("done", timeout=4 * WAIT_MS)
            answer = await box.locator(".prompt-answer").text_content()
            assert answer and answer.strip(), "no answer arrived"
            lengths: list[int] = await page.evaluate("window.__lengths")
            grown = sorted({n for n in lengths if n > 0})
            assert len(grown) >= 3, f"the answer did not stream: lengths seen {lengths}"
            text = await speed.text_content() or ""
            assert "live" in text and "ms/token" in text, text
            assert "plan" in text and "batch 4, M = 2" in text, text
            assert not errors, errors
        finally:
            await browser.close()
