"""The web page at ``/``, driven in a real headless Chromium through Playwright.

Needs Debian's ``chromium`` (``/usr/bin/chromium``); skipped, with the reason shown in
the test summary, where it is absent. ``.ci/run`` installs it.
"""

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from twostage.recommender import Recommender
from twostage.serving import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Chromium is not installed (apt-get install chromium chromium-driver)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(models_dir: Path) -> Iterator[str]:
    app = create_app(ServeSettings(models=str(models_dir), poll_seconds=0))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="warning"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    instance.should_exit = True
    thread.join(timeout=10)


#: Screenshots of the page go here (kept by CI as test artefacts).
ARTIFACTS = Path(os.environ.get("TWOSTAGE_TEST_ARTIFACTS", "test-artifacts"))


@pytest.mark.slow
def test_page_shows_history_recommendations_and_similar_items(
    server: str, small_recommender: Recommender
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server + "/")
            # Useful from the first paint: a sample user's answer, without a click.
            page.wait_for_selector("#recs li")
            first = small_recommender.user_vocab.values[0]
            assert page.input_value("#user") == str(first)
            # How the query reads the history; a model that reads some takes sessions.
            assert "pooling query" in page.inner_text("#model-info")
            assert page.is_enabled("#session")
            page.screenshot(
                path=str(ARTIFACTS / "page-first-paint.png"), full_page=True
            )

            page.fill("#user", "3")
            page.fill("#k", "5")
            page.click("#recommend")
            page.wait_for_function("document.querySelectorAll('#recs li').length === 5")
            expected = small_recommender.recommend(3, 5).items
            shown = page.eval_on_selector_all(
                "#recs li", "items => items.map(li => li.dataset.itemId)"
            )
            assert shown == [str(item["item_id"]) for item in expected]
            assert "personalised" in page.inner_text("#path")
            # The "not" box leaves items out; an unknown ID is named.
            page.fill("#exclude", f"{expected[0]['item_id']}, 99999")
            page.click("#recommend")
            page.wait_for_function(
                "document.querySelector('#path').textContent.includes('99999')"
            )
            left = small_recommender.recommend(
                3, 5, exclude=[expected[0]["item_id"], 99999]
            ).items
            shown = page.eval_on_selector_all(
                "#recs li", "items => items.map(li => li.dataset.itemId)"
            )
            assert shown == [str(item["item_id"]) for item in left]
            page.fill("#exclude", "")
            page.click("#recommend")
            page.wait_for_function(
                "!document.querySelector('#path').textContent.includes('99999')"
            )
            # "Because you watched ..." names one of the user's history items.
            history = small_recommender.history(3)
            labels = {str(h.get("label") or f"item {h['item_id']}") for h in history}
            because = page.inner_text("#recs li >> nth=0 >> .because")
            assert because.removeprefix("because you watched ") in labels
            shown_history = page.eval_on_selector_all(
                "#history li", "items => items.length"
            )
            assert shown_history == len(history) > 0
            # The history box scrolls instead of growing with the history.
            height = page.eval_on_selector("#history", "el => el.clientHeight")
            assert height <= 22 * 16 + 4

            page.click("#recs li >> nth=0")
            page.wait_for_selector("#similar li")
            similar = page.eval_on_selector_all(
                "#similar li", "items => items.map(li => li.dataset.itemId)"
            )
            wanted = small_recommender.similar_items(expected[0]["item_id"], 10)
            assert similar == [str(item["item_id"]) for item in wanted]

            # Title search offers items to pick; a pick shows the similar items.
            label = str(wanted[0].get("label") or "")
            if label:
                page.fill("#search", label[:4])
                page.wait_for_selector("#found li")
                found = page.inner_text("#found")
                assert label[:4].lower() in found.lower()

            # An anonymous session is a query of its own.
            page.fill("#user", "")
            page.fill("#session", ", ".join(str(h["item_id"]) for h in history[:3]))
            page.click("#recommend")
            page.wait_for_function(
                "document.querySelector('#path').textContent.includes('session')"
            )
            page.fill("#session", "")
            # Typed IDs keep their text unless they are plain integers: an ISBN's
            # leading zero and a 20-digit ID's last digits were lost to Number().
            typed = page.evaluate(
                "['42', '-5', '0829433244', '12345678901234567890', 'a1'].map(typedId)"
            )
            assert typed == [42, -5, "0829433244", "12345678901234567890", "a1"]
            # A new user described by features gets the cold-start answer.
            page.click("#features-box summary")
            page.fill("#features input[name=age]", "30")
            page.click("#recommend")
            page.wait_for_function(
                "document.querySelector('#path').textContent.includes('cold start')"
            )
            # A bad request shows the server's message and clears the stale lists.
            page.fill("#k", "1000")
            page.click("#recommend")
            page.wait_for_selector("#error:not([hidden])")
            assert "`k` should be between 1 and 100" in page.inner_text("#error")
            assert page.eval_on_selector_all("#recs li", "l => l.length") == 0
            assert errors == []

            # Usable on a 390 px phone: nothing wider than the screen.
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(server + "/")
            phone.wait_for_selector("#recs li")
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, width
            phone.screenshot(path=str(ARTIFACTS / "page-390px.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_docs_page_renders_offline(server: str) -> None:
    """Swagger UI comes from the server: the page renders with no other host."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            outside: list[str] = []
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(server)
                    else (outside.append(route.request.url), route.abort())
                ),
            )
            page.goto(server + "/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            assert "/v1/recommend" in page.inner_text("body")
            assert outside == []
            page.screenshot(path=str(ARTIFACTS / "docs.png"))
        finally:
            browser.close()
