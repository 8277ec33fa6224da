"""The playground page in a real headless Chromium: load it, submit an input, and see the base model
and the chosen adapters answer side by side, streamed, with what the API gives for the same input."""

import re
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")
pytest.importorskip("playwright", reason="Playwright (the test extra) is not installed")

import httpx
from playwright.sync_api import sync_playwright

from flantune.serve import load_service_model

from .test_serve import adapters_of_one_base, live_server, make_app

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)",
)
TOKEN = "playground-token"


def test_page_shows_base_and_adapters_side_by_side(tmp_path_factory):
    _, finals = adapters_of_one_base(tmp_path_factory)
    loaded = load_service_model(None, {name: str(path) for name, path in finals.items()}, device="cpu")
    text = "reverse: red green blue"
    with live_server(make_app(loaded, token=TOKEN)) as (_, _, url), sync_playwright() as p:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        api = {
            name: httpx.post(f"{url}/v1/generate", headers=auth, timeout=30,
                             json={"adapter": name, "inputs": [text], "max_new_tokens": 12}).json()["outputs"][0]
            for name in (None, "alpha", "beta", "gamma")
        }  # fmt: skip
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            # The server asks a browser for the token as a Basic password; Playwright answers for us.
            page = browser.new_context(http_credentials={"username": "me", "password": TOKEN}).new_page()
            page.goto(url)
            boxes = page.locator("#adapters input[type=checkbox]")
            boxes.first.wait_for()
            assert boxes.count() == 3
            # Three boxes start ticked: a fourth could not be; untick gamma to compare base, alpha, beta.
            page.uncheck("#adapters input[value=gamma]")
            page.fill("#input", text)
            page.fill("#max-new-tokens", "12")
            page.click("#submit")
            page.wait_for_function("document.querySelectorAll('#answers .answer.done').length === 3")
            cards = {card.locator("h2").inner_text(): card for card in page.locator("#answers .answer").all()}
            assert list(cards) == ["base", "alpha", "beta"]
            for title, card in cards.items():
                name = None if title == "base" else title
                assert "error" not in (card.get_attribute("class") or "")
                assert card.locator(".output").inner_text() == api[name]
                assert re.match(
                    r"\d+ ms · first text after \d+ ms · \d+ tokens", card.locator(".latency").inner_text()
                )
            # Streamed: the answers arrived in pieces, not as one block each.
            assert max(int(card.get_attribute("data-pieces")) for card in cards.values()) > 1
            assert len(set(api.values())) == 4  # the cards could not all agree by chance
            assert re.match(r"all answers in \d+ ms", page.inner_text("#status"))
        finally:
            browser.close()
