"""The dashboard in a real headless Chromium: every device shown, a value changing live, the
placement form answered and drawn. Skips, saying why, only where no Chromium is installed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from nats.js.kv import KeyValue

from shardplane.bus import codec, keys
from tests.api.fleet import FLEET, instance_from_reply, put_device, write_history

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
WAIT_MS = 30_000  # the longest any step waits for the page (Playwright's expect default: 5 s)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def inclusive(stage: dict[str, Any]) -> str:
    """How the page writes a stage's half-open [layer_start, layer_end): first to last held."""
    first, last = int(stage["layer_start"]), int(stage["layer_end"]) - 1
    return f"L{first}" if first == last else f"L{first}\u2013{last}"


def chromium_path() -> str | None:
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def test_dashboard_live_in_chromium(api_url: str, fleet_kv: KeyValue, planner: None) -> None:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium installed (Debian: apt-get install -y chromium)")
    from playwright.async_api import expect

    # No assertion here is about speed: wait up to 30 s (not Playwright's 5 s) for each state.
    expect.set_options(timeout=WAIT_MS)
    try:
        await _dashboard_live(api_url, fleet_kv, executable)
    finally:
        expect.set_options(timeout=None)  # back to Playwright's default for any later test


async def _dashboard_live(api_url: str, fleet_kv: KeyValue, executable: str) -> None:
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            # Minutes of history for the charts: the fixture's samples are stamped now, so they
            # are removed first (the API drops a device's ring with its key).
            for gpu in FLEET:
                await fleet_kv.delete(keys.device_key(gpu.node, gpu.index))
            await write_history(fleet_kv)
            page = await browser.new_page(viewport={"width": 1500, "height": 1400})
            page.set_default_timeout(WAIT_MS)  # actions (fill, click) and navigation
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(api_url + "/")
            # Every simulated device has its row, and the stream is live.
            for gpu in FLEET:
                await expect(
                    page.locator(f'#fleet-body tr[data-device-id="{gpu.node}/{gpu.index}"]')
                ).to_be_visible()
            await expect(page.locator("#conn")).to_have_text("live")
            await expect(page.locator("#topology svg g.gpu")).to_have_count(len(FLEET))
            await expect(page.locator("#topology svg .nvlink")).to_have_count(1)

            # A value changes in the KV; the page shows it without a reload.
            gpu = FLEET[1]
            row = page.locator(f'#fleet-body tr[data-device-id="{gpu.node}/{gpu.index}"]')
            await expect(row.locator("td.temp")).not_to_have_text("88 °C")
            await put_device(fleet_kv, gpu, seq=2, temperature_c=88.0, utilization_gpu_pct=93.0)
            await expect(row.locator("td.temp")).to_have_text("88 °C")
            await expect(row.locator("td.util")).to_contain_text("93 %")

            # An unknown model: the reply is shown in words, not as a crash.
            await page.fill("#f-model", "no-such-model")
            await page.click("#f-submit")
            await expect(page.locator("#place-result .err")).to_contain_text(
                "does not know this model"
            )

            # A real placement through the real planner, drawn layer by layer.
            await page.fill("#f-model", "llama-3.1-8b")
            async with page.expect_response("**/api/placements", timeout=2 * WAIT_MS) as answer:
                await page.click("#f-submit")
            reply = await (await answer.value).json()
            assert reply["ok"], reply
            result = page.locator("#place-result")
            await expect(result.locator(".ok")).to_contain_text("Placed llama-3.1-8b")
            await expect(result.locator("#reply-plan .layers > i")).to_have_count(32)
            # Ranges read inclusively, so neighbours never seem to share a layer: the wire's
            # half-open [0, 16) and [16, 32) show as L0 to 15 and L16 to 31, not 0-16, 16-32.
            ranges = [inclusive(st) for st in reply["stages"]]
            assert ranges[0].startswith("L0") and ranges[-1].endswith("31"), ranges
            await expect(result.locator("#reply-plan .stages .range")).to_have_text(ranges)
            await expect(result.locator("table td.range")).to_have_text(ranges)

            # The projector's view of that instance (written as the projector would): the
            # placements panel draws it layer by layer with each stage's status.
            inst = instance_from_reply(reply, ("loaded", "loading", "pending"))
            await fleet_kv.put(keys.instance_key(inst.instance_id), codec.encode(inst))
            drawn = page.locator(f'#placements .placement[data-instance-id="{inst.instance_id}"]')
            await expect(drawn.locator(".layers > i")).to_have_count(32)
            await expect(drawn.locator(".stages > div")).to_have_count(len(inst.stages))
            await expect(drawn.locator(".stages .range")).to_have_text(ranges)
            await expect(drawn.locator(".stages .st-loaded").first).to_be_visible()
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not errors, errors
        finally:
            await browser.close()
